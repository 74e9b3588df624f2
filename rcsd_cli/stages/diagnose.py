"""``rcsd diagnose``: does the rubric-conditioned teacher carry a signal, before any compute is spent?

Self-distillation can only help when the privileged teacher is better than the student. On a
seeded sample of items, with the prompts ``train`` would use, this measures:

- the *teacher advantage*: the teacher's own answers (from its privileged prompt) against the
  student's rollouts, in accuracy and rubric score, paired per item with 95% intervals;
- on the student's rollouts, what training would apply: the mean per-token loss (``losses.token_loss``
  with the same ``--loss`` options as ``train``), the share of loss terms at the clip, teacher–student top-1
  agreement, and the teacher's log-probability of the gold answer line after the student's own
  reasoning against the student's (a continuous signal that small models still show);
- the same under ablated teachers: ``reference`` (OPSD's context), ``shuffled`` (another item's
  rubric) and ``none`` (no privileged context: the zero point), which separates "the rubric helps"
  from "any extra context helps";
- ``contrast``: train's ``--teacher-contrast`` teacher, logits (1+w) z_rubric - w z_control, scored on
  the same rollouts and answering with the same contrast applied at every decoding step.

One row per (item, condition) goes to Parquet; the summary table is printed and stored in metadata.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch

from rcsd_cli.backends import open_backend
from rcsd_cli.configs.diagnose import DiagnoseConfig
from rcsd_cli.data.artifacts import ensure_writable, read_artifact, write_artifact
from rcsd_cli.data.rows import DiagnoseRow, Rubric
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.benchmarks import select
from rcsd_cli.evaluation.scoring import score_completion
from rcsd_cli.evaluation.stats import mean_interval
from rcsd_cli.modeling.generation import generate, item_seed
from rcsd_cli.modeling.logprobs import continuation_logits, contrast_logits
from rcsd_cli.models import load_model, load_tokenizer
from rcsd_cli.rubrics.ablations import ablate
from rcsd_cli.rubrics.prompts import text_ids
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.train.losses import token_diagnostics, token_loss
from rcsd_cli.ui import info, progress, results


def gold_suffix(row: Rubric, style: str) -> str | None:
    """The answer line a correct rollout would end with, in the prompt style's own format."""
    if not row.answer:
        return None
    return f"\n\nThe final answer is \\boxed{{{row.answer}}}." if style == "paper" else f"\nAnswer: {row.answer}"


def condition_prompt(view: PromptView, tok, row: Rubric, partner: Rubric, condition: str) -> list[int]:
    """The teacher prompt of one condition; ``partner`` lends its rubric to ``shuffled``; ``generic``
    (a contrast control only) is the authors' generic rubric; ``none`` is the student's prompt rendered
    with the teacher's thinking."""
    if condition == "generic":
        return condition_prompt(view, tok, ablate([row], "generic", 0)[0], partner, "rubric")
    if condition == "none":
        return replace(view, student_thinking=view.teacher_thinking).student_ids(tok, row)
    if condition == "shuffled":
        row = row.model_copy(update={"rubric": partner.rubric})
    return replace(view, method="opsd" if condition == "reference" else "rcsd").teacher_ids(tok, row)


def _paired(values: list[tuple[float, float]]) -> dict:
    diffs = [a - b for a, b in values]
    if not diffs:
        return {"mean": None, "ci": [None, None], "n": 0}
    mean, lo, hi = mean_interval(diffs)
    return {"mean": mean, "ci": [lo, hi], "n": len(diffs)}


def summarise(rows: list[DiagnoseRow], conditions: list[str]) -> dict:
    out = {}
    for cond in conditions:
        rs = [r for r in rows if r.condition == cond]
        out[cond] = {
            "accuracy_gain": _paired([(float(r.teacher_correct), float(r.student_correct)) for r in rs
                                      if r.teacher_correct is not None and r.student_correct is not None]),
            "score_gain": _paired([(r.teacher_score, r.student_score) for r in rs
                                   if r.teacher_score is not None and r.student_score is not None]),
            "gold_logprob_gain": _paired([(r.gold_logprob_teacher, r.gold_logprob_student) for r in rs
                                          if r.gold_logprob_teacher is not None
                                          and r.gold_logprob_student is not None]),
            "mean_loss": sum(r.mean_loss for r in rs) / len(rs),
            "clip_share": sum(r.clip_share for r in rs) / len(rs),
            "top1_agreement": sum(r.top1_agreement for r in rs) / len(rs),
        }
    return out


def verdict(summary: dict) -> str:
    """One line: is the rubric teacher measurably better than the student (an interval excluding zero)?"""
    cond = "rubric" if "rubric" in summary else next(iter(summary))
    s = summary[cond]
    better = [name for name in ("accuracy_gain", "score_gain", "gold_logprob_gain")
              if s[name]["ci"][0] is not None and s[name]["ci"][0] > 0]
    worse = [name for name in ("accuracy_gain", "score_gain", "gold_logprob_gain")
             if s[name]["ci"][1] is not None and s[name]["ci"][1] < 0]
    if better:
        return f"the {cond} teacher is measurably better than the student ({', '.join(better)}: 95% interval > 0)"
    if worse:
        return f"the {cond} teacher is measurably worse than the student ({', '.join(worse)}: 95% interval < 0)"
    return (f"the {cond} teacher is not measurably better than the student (every 95% interval includes 0): "
            "expect little from self-distillation here")


def run_diagnose(cfg: DiagnoseConfig, output: Path, *, overwrite: bool = False,
                 trust_remote_code: bool = False) -> dict:
    ensure_writable(output, overwrite)
    conditions = cfg.conditions.split(",")
    rubrics, _ = read_artifact(cfg.rubrics, "rubrics")
    view = PromptView.for_diagnose(cfg)
    dropped = 0
    if cfg.max_teacher_prompt_tokens:  # as train's filter, on the rubric condition's exact ids

        tok = load_tokenizer(cfg.model, trust_remote_code)
        rubrics, dropped = view.within_teacher_prompt_limit(rubrics, tok, cfg.max_teacher_prompt_tokens)
        info(f"dropped {dropped} of {dropped + len(rubrics)} items: teacher prompt over "
             f"{cfg.max_teacher_prompt_tokens} tokens")
    items: list[Rubric] = select(rubrics, cfg.seed, 0, cfg.limit)
    if len(items) < 2:
        raise RcsdError(f"{cfg.rubrics}: diagnose needs at least 2 items, found {len(items)}")
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)
    partner = {items[order[i]].id: items[order[(i + 1) % len(items)]] for i in range(len(items))}  # never itself
    engine = open_backend(cfg.backend, cfg.model, trust_remote_code)
    if hasattr(engine, "model"):  # hf: the engine's own weights score the tokens too
        model, tok = engine.model, engine.tokenizer
    else:
        lm = load_model(cfg.model, trust_remote_code)
        model, tok = lm.model, lm.tokenizer

    def answer(what: str, prompts: list[list[int]], seeds: list[int], controls=None):
        with progress(f"diagnose: {what}", len(prompts)) as advance:
            if controls is None:
                return engine.generate(prompts, cfg.generation, cfg.seed, seeds=seeds,
                                       on_done=lambda _, b: advance(len(b)))
            return generate(model, tok, prompts, cfg.generation, cfg.seed, seeds=seeds, controls=controls,
                            contrast_weight=cfg.teacher.contrast_weight, on_done=lambda _, b: advance(len(b)))

    def prompts(cond: str) -> list[list[int]]:
        return [condition_prompt(view, tok, r, partner[r.id], cond) for r in items]

    s_prompts = [view.student_ids(tok, r) for r in items]
    t_prompts = {cond: prompts("rubric" if cond == "contrast" else cond) for cond in conditions}
    c_prompts = prompts(cfg.teacher.contrast) if "contrast" in conditions else None
    rollouts = answer("student rollouts", s_prompts, [item_seed(cfg.seed, "diagnose-student", r.id) for r in items])
    def teacher_seeds(cond: str) -> list[int]:
        return [item_seed(cfg.seed, "diagnose-teacher", cond, r.id) for r in items]

    answers = {cond: answer(f"{cond} teacher", t_prompts[cond], teacher_seeds(cond))
               for cond in conditions if cond != "contrast"}
    if hasattr(engine, "close"):  # an idle vLLM engine would spin beside the in-process work below
        engine.close()
    if c_prompts is not None:
        answers["contrast"] = answer("contrast teacher", t_prompts["contrast"], teacher_seeds("contrast"), c_prompts)
    suffixes = [text_ids(tok, s) if (s := gold_suffix(r, cfg.prompt_style)) else [] for r in items]
    conts = [g.token_ids + suf for g, suf in zip(rollouts, suffixes, strict=True)]
    s_logits = continuation_logits(model, s_prompts, conts, tok.pad_token_id)
    s_scores = [score_completion(r.id, r, r.rubric, g.text) for r, g in zip(items, rollouts, strict=True)]
    rows: list[DiagnoseRow] = []
    kept: dict[str, list[torch.Tensor]] = {}  # the rubric teacher's logits, when the contrast condition reuses them
    for cond in conditions:
        if cond == "contrast" and "rubric" in kept:
            t_logits = kept["rubric"]
        else:
            t_logits = continuation_logits(model, t_prompts[cond], conts, tok.pad_token_id)
        if cond == "rubric" and "contrast" in conditions:
            kept["rubric"] = t_logits
        if cond == "contrast":
            assert c_prompts is not None  # built whenever the contrast condition is asked for
            c_logits = continuation_logits(model, c_prompts, conts, tok.pad_token_id)
            t_logits = [contrast_logits(t, c, cfg.teacher.contrast_weight) for t, c in zip(t_logits, c_logits,
                                                                                          strict=True)]
        for i, r in enumerate(items):
            n = len(rollouts[i].token_ids)
            terms = token_loss(s_logits[i][:n], t_logits[i][:n], torch.tensor(conts[i][:n]), cfg.loss)
            _, agree = token_diagnostics(s_logits[i][:n], t_logits[i][:n], cfg.loss, terms)
            loss, clipped = terms.loss, terms.clip_share
            gold_t = gold_s = None
            if suffixes[i]:
                target = torch.tensor(suffixes[i])
                gold_t = torch.log_softmax(t_logits[i][n:], -1).gather(-1, target[:, None]).mean().item()
                gold_s = torch.log_softmax(s_logits[i][n:], -1).gather(-1, target[:, None]).mean().item()
            t_score = score_completion(r.id, r, r.rubric, answers[cond][i].text)
            rows.append(DiagnoseRow(
                id=r.id, condition=cond, student_correct=s_scores[i].correct, teacher_correct=t_score.correct,
                student_score=s_scores[i].score, teacher_score=t_score.score, tokens=n,
                mean_loss=loss.mean().item() if n else 0.0, clip_share=clipped.mean().item() if n else 0.0,
                top1_agreement=agree.mean().item() if n else 1.0, gold_logprob_teacher=gold_t,
                gold_logprob_student=gold_s, student_completion=rollouts[i].text,
                teacher_completion=answers[cond][i].text))
    summary = summarise(rows, conditions)
    line = verdict(summary)
    write_artifact(output, "diagnose", rows, stage="diagnose", config=cfg, model_id=cfg.model,
                   inputs=[cfg.rubrics], overwrite=overwrite, extra={"summary": summary, "verdict": line,
                                                                   "dropped_long_teacher_prompts": dropped})
    results.print(summary_table(summary, f"{len(items)} items of {cfg.rubrics}, {cfg.prompt_style} prompts"))
    results.print(f"verdict: {line}")
    info(f"wrote {len(rows)} rows to {output}")
    return {"summary": summary, "verdict": line}


def summary_table(summary: dict, title: str):
    from rich.table import Table

    def fmt(s):
        if s["mean"] is None:
            return "n/a"
        return f"{s['mean']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"

    table = Table(title=title)
    for col in ("teacher", "accuracy gain", "rubric score gain", "gold log-prob gain", "loss/token", "at clip",
                "top-1 agree"):
        table.add_column(col, justify="left" if col == "teacher" else "right")
    for cond, s in summary.items():
        table.add_row(cond, fmt(s["accuracy_gain"]), fmt(s["score_gain"]), fmt(s["gold_logprob_gain"]),
                      f"{s['mean_loss']:.4f}", f"{s['clip_share']:.3f}", f"{s['top1_agreement']:.3f}")
    return table
