"""Watching a run: held-out evaluation during training, the best weights kept, a collapse stopped.

Self-distillation can break a model while its own loss looks fine (the student drifts towards what
the teacher likes on the student's own samples, and greedy generation degrades). ``--eval-every N``
evaluates the live student on held-out items of a bench before the first step and every N steps,
with the code of ``rcsd eval`` (same selection, protocols and grading); the held-out items must
share no id and no question with the training items. ``--keep-best METRIC`` keeps the weights of
the best step in ``OUTPUT/best``; ``--stop-when "METRIC<VALUE"`` ends a run whose metric crossed
the line (``F*start``: a fraction of its first value), with one line saying why.

Every process evaluates every item (same weights, same numbers), so the decisions agree across
processes without a broadcast and sharded modules see the same number of forward passes.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig, parse_stop_rule
from rcsd_cli.data.inputs import question_key
from rcsd_cli.data.rows import MetricsRow, Problem
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.answers import STRICT_RULE, grade_texts
from rcsd_cli.evaluation.benchmarks import benchmark, select
from rcsd_cli.evaluation.loglik import choice_requests, grade, per_problem
from rcsd_cli.modeling.generation import generate
from rcsd_cli.modeling.logprobs import continuation_sums
from rcsd_cli.rubrics.prompts import student_prompt

LOWER_IS_BETTER = {"loss", "kl", "clip_share", "truncated_share"}


def held_out_items(cfg: TrainConfig, rows: list) -> list[Problem]:
    """The bench's items for evaluation during training, refused if any is a training item."""
    m = cfg.monitor
    assert m.bench is not None  # MonitorConfig: --eval-every needs --eval-bench
    items = select(benchmark(m.bench, "--eval-bench").load(None, cfg.seed), cfg.seed, m.offset, m.limit)
    if not items:
        raise RcsdError(f"--eval-bench {m.bench}: no items at --eval-offset {m.offset}")
    ids, questions = {r.id for r in rows}, {question_key(r.question) for r in rows}
    overlap = [p for p in items if p.id in ids or question_key(p.question) in questions]
    if overlap:
        raise RcsdError(f"--eval-bench {m.bench}: {len(overlap)} of {len(items)} held-out items are training items "
                        f"(first: {overlap[0].id!r}); choose another --eval-offset (rcsd gen-rubrics {m.bench} "
                        "takes items from the start of the same seeded shuffle)")
    if m.scoring == "loglik" and any(not p.choices for p in items):
        raise RcsdError(f"--eval-scoring loglik needs multiple-choice items; {m.bench} has open answers")
    return items


@torch.no_grad()
def evaluate(student, tok, items: list[Problem], cfg: TrainConfig, compute=nullcontext) -> dict[str, float]:
    """The live student on the held-out items: eval_* metrics, with dropout off."""
    was_training = student.training
    student.eval()
    try:
        with compute():
            if cfg.monitor.scoring == "loglik":
                protocol = benchmark(cfg.monitor.bench or "").loglik_protocol()
                sums = continuation_sums(student, choice_requests(tok, items, protocol), tok.pad_token_id,
                                         cfg.generation.batch_size)
                graded = [grade(p, s, protocol) for p, s in zip(items, per_problem(sums, items), strict=True)]
                return {name: sum(g[key] for g in graded) / len(graded) for name, key in (
                    ("eval_accuracy", "acc"), ("eval_acc_norm", "acc_norm"), ("eval_gold_logprob", "gold_logprob"))}
            greedy = GenerationConfig(max_new_tokens=cfg.generation.max_new_tokens, temperature=0.0,
                                      batch_size=cfg.generation.batch_size)
            prompts = [student_prompt(tok, p, style=cfg.prompt_style, thinking=cfg.generation.enable_thinking)
                       for p in items]
            texts = [g.text for g in generate(student, tok, prompts, greedy, cfg.seed)]
    finally:
        student.train(was_training)
    correct, strict = [], []
    for p, text in zip(items, texts, strict=True):
        _, (rule,), (ok,) = grade_texts("rcsd", [text], p)
        correct.append(bool(ok))
        strict.append(bool(ok) and rule == STRICT_RULE[cfg.prompt_style])
    return {"eval_accuracy": sum(correct) / len(items), "eval_strict_accuracy": sum(strict) / len(items)}


class Monitor:
    """What ``--eval-every``, ``--keep-best`` and ``--stop-when`` need across the steps of one run."""

    def __init__(self, cfg: TrainConfig, rows: list, notes: dict):
        self.cfg, self.m, self.notes = cfg, cfg.monitor, notes
        self.items = held_out_items(cfg, rows) if self.m.every else []
        self.rule = parse_stop_rule(self.m.stop_when) if self.m.stop_when else None
        self.start: dict[str, float] = {}
        self.best: float | None = None

    def due(self, step: int) -> bool:
        """Evaluate after this (0-based) step?"""
        return bool(self.m.every) and (step + 1) % self.m.every == 0

    def baseline(self, student, tok, compute, log) -> None:
        """The student before training: the ``start`` of relative --stop-when rules."""
        if not self.m.every:
            return
        values = evaluate(student, tok, self.items, self.cfg, compute)
        self.start.update(values)
        self.notes["eval_start"] = {"bench": self.m.bench, "items": len(self.items), **values}
        log(f"held-out {self.m.bench} ({len(self.items)} items) before training: "
            + "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in values.items()))

    def observe(self, row: MetricsRow, save_best) -> str | None:
        """Keep the best weights (``save_best()``) and say why the run must stop, if it must."""
        values = {k: v for k, v in row.model_dump().items() if isinstance(v, (int, float)) and v is not None}
        for name, value in values.items():
            self.start.setdefault(name, value)
        if self.m.keep_best and self.m.keep_best in values:
            value = values[self.m.keep_best]
            lower = self.m.keep_best in LOWER_IS_BETTER
            if self.best is None or (value < self.best if lower else value > self.best):
                self.best = value
                save_best()
                self.notes["best"] = {"metric": self.m.keep_best, "value": value, "step": row.step}
        if self.rule is None or self.rule[0] not in values:
            return None
        name, op, bound, relative = self.rule
        line = bound * self.start[name] if relative else bound
        value = values[name]
        if (value < line) if op == "<" else (value > line):
            self.notes["stopped"] = {"step": row.step, "rule": self.m.stop_when, "value": value, "line": line}
            kept = (f"; the best weights ({self.m.keep_best} {self.best:.4f}, step {self.notes['best']['step']}) "
                    "are in OUTPUT/best") if self.best is not None else ""
            return f"stopping after step {row.step}: {name} {value:.4f} {op} {line:.4f} (--stop-when " \
                   f"{self.m.stop_when}){kept}"
        return None


HEALTH = (("student entropy", "student_entropy"), ("teacher entropy", "teacher_entropy"), ("kl", "kl"),
          ("clip share", "clip_share"), ("distinct-2", "distinct_2"), ("truncated", "truncated_share"))


def health_line(metrics: list[MetricsRow]) -> str:
    """One line: each health figure at the run's first and last step."""
    first, last = metrics[0], metrics[-1]
    parts = [f"{label} {getattr(first, key):.3f} -> {getattr(last, key):.3f}" for label, key in HEALTH
             if getattr(first, key) is not None and getattr(last, key) is not None]
    return f"training health, step {first.step} -> {last.step}: " + ", ".join(parts)


def best_folder(out: Path) -> Path:
    return out / "best"
