"""``rcsd eval``: generative evaluation with answer extraction, accuracy with a 95% interval,
avg@n (the mean accuracy over n samples per item), unbiased pass@k for k <= n, and the rubric score
of every completion (the item's own rubric for ``--bench rubric``,
the reference rubric built from the gold answer otherwise)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from rcsd_cli.backends import open_backend
from rcsd_cli.backends.resume import ResumableGenerator
from rcsd_cli.configs.eval import EvalConfig
from rcsd_cli.data.artifacts import ensure_writable, write_artifact
from rcsd_cli.data.rows import EvalItem, Rubric
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.answers import RULES, STRICT_RULE, grade_texts
from rcsd_cli.evaluation.benchmarks import Benchmark, benchmark, select
from rcsd_cli.evaluation.judging import judge_and_score
from rcsd_cli.evaluation.loglik import choice_logprobs, grade
from rcsd_cli.evaluation.scoring import JUDGE_REPLY
from rcsd_cli.evaluation.stats import mean_interval, pass_at_k, wilson_interval
from rcsd_cli.rubrics.prompts import student_prompt
from rcsd_cli.rubrics.rubric_gen import reference_rubric
from rcsd_cli.ui import progress, results


def load_eval_items(bench: Benchmark, data: str | None, seed: int, offset: int, limit: int | None):
    """(problem, rubric) pairs of a benchmark split: a rubrics file's items keep their own rubric, the others
    get the reference rubric built from their gold answer."""
    pairs = [(p, p.rubric if isinstance(p, Rubric) else reference_rubric(p)) for p in bench.load(data, seed)]
    return select(pairs, seed, offset, limit)


def summarise(items: list[EvalItem], n: int, seconds: float) -> dict:
    graded = [it.accuracy for it in items if it.accuracy is not None]
    if not graded:
        acc, lo, hi = None, None, None
    elif n == 1:
        acc = sum(graded) / len(graded)
        lo, hi = wilson_interval(sum(graded), len(graded))
    else:
        acc, lo, hi = mean_interval(graded)
    scores = [it.rubric_score for it in items if it.rubric_score is not None]
    rs, rlo, rhi = mean_interval(scores) if scores else (None, None, None)
    tokens = [t for it in items for t in it.completion_tokens]
    graded_items = [it for it in items if it.accuracy is not None]
    pass_at = {k: sum(pass_at_k(n, sum(bool(c) for c in it.correct), k) for it in graded_items) / len(graded_items)
               for k in (1, 2, 4, 8, 16, n) if k <= n and graded_items}
    return {"items": len(items), "graded_items": len(graded), "n": n, "accuracy": acc, "accuracy_ci": [lo, hi],
            "pass_at": {str(k): v for k, v in sorted(pass_at.items())}, "rubric_score": rs,
            "rubric_score_ci": [rlo, rhi], "mean_completion_tokens": sum(tokens) / max(len(tokens), 1),
            "seconds": seconds}


def run_loglik(cfg: EvalConfig, problems, output: Path, overwrite: bool, trust_remote_code: bool,
               show: bool) -> dict:
    """``--scoring loglik``: lm-eval's multiple-choice protocol, same item selection as generative eval."""
    if any(not p.choices for p in problems):
        raise RcsdError(f"--scoring loglik needs multiple-choice items; {cfg.bench} has open answers")
    bench = benchmark(cfg.bench)
    protocol = bench.loglik_protocol(cfg.num_fewshot)
    shots = bench.shots(cfg.num_fewshot)
    t0 = time.perf_counter()
    engine = open_backend(cfg.backend, cfg.model, trust_remote_code)
    if not hasattr(engine, "continuation_logprobs"):
        raise RcsdError(f"--scoring loglik needs a backend that scores given tokens (hf), not {engine.name}")
    with progress(f"loglik {cfg.bench} (choices)", sum(len(p.choices) for p in problems)) as advance:
        scores = choice_logprobs(engine, problems, protocol, cfg.generation.batch_size, shots, on_done=advance)
    items = []
    for p, s in zip(problems, scores, strict=True):
        g = grade(p, s, protocol)
        items.append(EvalItem(id=p.id, bench=cfg.bench, question=p.question, choices=p.choices, gold=p.answer,
                              completions=[], completion_tokens=[], predictions=[g["prediction"]],
                              correct=[None if g["acc"] is None else bool(g["acc"])], accuracy=g["acc"],
                              rubric_scores=[], rubric_score=None, choice_logprobs=s, acc_norm=g["acc_norm"],
                              gold_logprob=g["gold_logprob"]))
    summary = summarise(items, 1, time.perf_counter() - t0)
    norm = [it.acc_norm for it in items if it.acc_norm is not None]
    gold = [it.gold_logprob for it in items if it.gold_logprob is not None]
    summary.update(scoring="loglik", protocol={"lm_eval_task": protocol.name, "version": protocol.version,
                                               "num_fewshot": cfg.num_fewshot},
                   acc_norm=sum(norm) / len(norm) if norm else None,
                   acc_norm_ci=list(wilson_interval(sum(norm), len(norm))) if norm else [None, None],
                   gold_logprob=mean_interval(gold)[0] if gold else None,
                   gold_logprob_ci=list(mean_interval(gold)[1:]) if gold else [None, None])
    write_artifact(output, "eval", items, stage="eval", config=cfg, model_id=cfg.model,
                   inputs=[cfg.data] if cfg.data else [], overwrite=overwrite, extra={"summary": summary})
    if show:
        results.print(f"{cfg.bench} ({len(items)} items, log-likelihood, {protocol.name}): "
                      f"acc {summary['accuracy']:.4f}  "
                      f"acc_norm {summary['acc_norm']:.4f}  gold log-prob {summary['gold_logprob']:.4f}")
    return summary


def strict_summary(items: list[EvalItem], strict_rule: str) -> dict:
    """How answers were found: accuracy counting only the format the prompt asked for (simple-evals and
    lighteval's strict reading), and how many answers each extraction rule produced."""
    graded = [it for it in items if it.accuracy is not None]
    strict = [sum(bool(c) for c in it.strict_correct) / len(it.strict_correct) for it in graded if it.strict_correct]
    counts = {rule: 0 for rule in RULES}
    for it in items:
        for rule in it.extraction_rules or []:
            counts[rule or "none"] = counts.get(rule or "none", 0) + 1
    return {"strict_rule": strict_rule, "strict_accuracy": sum(strict) / len(strict) if strict else None,
            "extraction_rules": counts}


def summary_table(rows: dict[str, dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("model", "items", "accuracy [95% CI]", "strict acc", "rubric score [95% CI]", "tokens/answer",
                "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, s in rows.items():
        lo, hi = s["accuracy_ci"]
        acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
        rs = "n/a" if s["rubric_score"] is None else (
            f"{s['rubric_score']:.3f} [{s['rubric_score_ci'][0]:.3f}, {s['rubric_score_ci'][1]:.3f}]")
        strict = "n/a" if s.get("strict_accuracy") is None else f"{s['strict_accuracy']:.3f}"
        table.add_row(name, str(s["items"]), acc, strict, rs, f"{s['mean_completion_tokens']:.0f}",
                      f"{s['seconds']:.0f}")
    return table


def run_eval(cfg: EvalConfig, output: Path, *, overwrite: bool = False, trust_remote_code: bool = False,
             show: bool = True) -> dict:
    """Generate answers for a benchmark split, grade them, write per-item Parquet; returns the summary."""
    ensure_writable(output, overwrite)
    bench, data, model, n, limit, offset, seed = cfg.bench, cfg.data, cfg.model, cfg.n, cfg.limit, cfg.offset, cfg.seed
    judge_model, generation = cfg.judge_model, cfg.generation
    pairs = load_eval_items(benchmark(bench), data, seed, offset, limit)
    if not pairs:
        raise RcsdError(f"{bench}: no items selected (offset {offset}, limit {limit})")
    if cfg.scoring == "loglik":
        return run_loglik(cfg, [p for p, _ in pairs], output, overwrite, trust_remote_code, show)
    if cfg.grader == "simple-evals" and any(not p.choices for p, _ in pairs):
        raise RcsdError(f"--grader simple-evals grades multiple-choice answers only (its math grader is an LLM "
                        f"equality check); {bench} has open answers")
    t0 = time.perf_counter()
    engine = open_backend(cfg.backend, model, trust_remote_code)
    runner = ResumableGenerator(engine, output, cfg, fresh=overwrite)
    prompts = [student_prompt(engine.tokenizer, p, style=cfg.prompt_style, thinking=generation.enable_thinking)
               for p, _ in pairs for _ in range(n)]
    keys = [f"{p.id}:{k}" for p, _ in pairs for k in range(n)]
    with progress(f"eval {bench}", len(prompts)) as advance:
        gens = runner.generate(keys, prompts, generation, seed, on_done=advance)
    scored = [(f"{p.id}:{k}", p, rubric, gens[i * n + k].text) for i, (p, rubric) in enumerate(pairs)
              for k in range(n) if rubric and not gens[i * n + k].error]
    scores = {s.sample_id: s for s in judge_and_score(scored, judge_model, JUDGE_REPLY, seed=seed,
                                                      trust_remote_code=trust_remote_code, backend=cfg.backend,
                                                      resume=(output, cfg, overwrite))}
    items = []
    for i, (p, rubric) in enumerate(pairs):
        g = gens[i * n:(i + 1) * n]
        sc = [scores.get(f"{p.id}:{k}") for k in range(n)]
        preds, rules, correct = grade_texts(cfg.grader, [x.text for x in g], p)
        strict = [None if c is None else bool(c and r == STRICT_RULE[cfg.prompt_style])
                  for c, r in zip(correct, rules, strict=True)]
        rscores = [s.score if s else None for s in sc]
        known = [x for x in rscores if x is not None]
        items.append(EvalItem(id=p.id, bench=bench, question=p.question, choices=p.choices, gold=p.answer,
                              completions=[x.text for x in g], completion_tokens=[len(x.token_ids) for x in g],
                              predictions=preds, correct=correct,
                              accuracy=None if p.answer is None else sum(correct) / n,
                              rubric_scores=rscores, rubric_score=sum(known) / len(known) if known else None,
                              extraction_rules=rules, strict_correct=strict,
                              errors=[x.error for x in g] if any(x.error for x in g) else None))
    summary = summarise(items, n, time.perf_counter() - t0)
    summary.update(strict_summary(items, STRICT_RULE[cfg.prompt_style]))
    write_artifact(output, "eval", items, stage="eval", config=cfg, model_id=model,
                   inputs=[data] if data else [], overwrite=overwrite, extra={"summary": summary})
    runner.finish()
    if show:
        results.print(summary_table({model: summary}, f"{bench}: {len(items)} items, avg@{n}"))
    return summary

