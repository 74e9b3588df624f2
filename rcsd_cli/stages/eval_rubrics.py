"""``rcsd eval-rubrics``: how good are generated rubrics next to reference ones, by the authors' protocol.

Items are matched by question text (whitespace collapsed, lower case), as the authors match them;
the judge gets their system prompt and user message verbatim (``rubrics.prompts``), rendered under
its chat template, and scores both rubrics on six dimensions (``evaluation.rubric_quality``). An
unusable reply is asked again; an item that never gets one is kept as unjudged with the reason.
Output: one row per item, and per dimension each rubric's mean score and win rate (95% intervals).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rich.table import Table

from rcsd_cli.backends import open_backend
from rcsd_cli.backends.resume import ResumableGenerator
from rcsd_cli.configs.eval_rubrics import EvalRubricsConfig
from rcsd_cli.data.artifacts import ensure_writable, read_artifact, write_artifact
from rcsd_cli.data.inputs import load_problems, question_key
from rcsd_cli.data.rows import Problem, RubricQualityRow
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.rubric_quality import METRICS, parse_quality_reply, win_counts
from rcsd_cli.evaluation.stats import mean_interval, wilson_interval
from rcsd_cli.rubrics.prompts import RUBRIC_QUALITY_SYSTEM, chat_prompt_ids, rubric_quality_message
from rcsd_cli.ui import progress, results

REFERENCE_NAME = "GT"


def rubric_rows(path: str) -> list[tuple[Problem, list]]:
    """(problem, rubric) per row with a non-empty rubric: an rcsd rubrics file, or any problems file."""
    try:
        rows, _ = read_artifact(path, "rubrics")
        pairs = [(r, r.rubric) for r in rows]
    except RcsdError:
        pairs = [(r.problem, r.rubric) for r in load_problems(path)]
    return [(p, rubric) for p, rubric in pairs if rubric]


def matched_items(cfg: EvalRubricsConfig) -> list[tuple[Problem, list, list]]:
    """(reference problem, reference rubric, generated rubric) for the questions in both files."""
    reference = {question_key(p.question): (p, r) for p, r in rubric_rows(cfg.reference)}
    generated = {question_key(p.question): r for p, r in rubric_rows(cfg.generated)}
    keys = [k for k in reference if k in generated]  # the reference's order
    if not keys:
        raise RcsdError(f"{cfg.generated}: no question also appears (with a rubric) in {cfg.reference}")
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(keys)
    return [(*reference[k], generated[k]) for k in keys[: cfg.limit]]


def run_eval_rubrics(cfg: EvalRubricsConfig, output: Path, *, overwrite: bool = False,
                     trust_remote_code: bool = False) -> dict:
    ensure_writable(output, overwrite)
    if cfg.name == REFERENCE_NAME:
        raise RcsdError(f"--name: {REFERENCE_NAME} is the reference rubric's name; choose another")
    items = matched_items(cfg)
    names = [REFERENCE_NAME, cfg.name]
    judge = open_backend(cfg.backend, cfg.judge_model, trust_remote_code)
    runner = ResumableGenerator(judge, output, cfg, fresh=overwrite)
    prompts = {p.id: chat_prompt_ids(judge.tokenizer, rubric_quality_message(
        p.question, p.reference_answer or p.answer, {REFERENCE_NAME: ref, cfg.name: gen}),
        cfg.generation.enable_thinking, system=RUBRIC_QUALITY_SYSTEM) for p, ref, gen in items}
    verdicts: dict[str, tuple] = {}
    errors = dict.fromkeys(prompts, f"judge reply unusable ({cfg.judge_retries + 1} attempts)")
    pending = [p.id for p, _, _ in items]
    with progress("eval-rubrics (judge)", len(pending)) as advance:
        for attempt in range(cfg.judge_retries + 1):
            if not pending:
                break
            outs = runner.generate([f"{i}:{attempt}" for i in pending], [prompts[i] for i in pending],
                                   cfg.generation, cfg.seed + 7919 * attempt)
            retry = []
            for item_id, out in zip(pending, outs, strict=True):
                if out.error:  # the client already retried the request: recorded, not asked again
                    errors[item_id] = f"judge request failed: {out.error}"
                    advance(1)
                    continue
                try:
                    verdicts[item_id] = parse_quality_reply(out.text, names)
                    advance(1)
                except ValueError as exc:
                    errors[item_id] = f"judge reply unusable ({attempt + 1} attempts; last: {exc})"
                    retry.append(item_id)
            pending = retry
        advance(len(pending))
    rows = []
    for p, _, _ in items:
        scores, best, reason = verdicts.get(p.id, (None, None, None))
        rows.append(RubricQualityRow(id=p.id, question=p.question, scores=scores, best_rubric=best,
                                     brief_reason=reason, error=None if scores else errors[p.id]))
    summary = summarise(rows, names)
    write_artifact(output, "rubric-quality", rows, stage="eval-rubrics", config=cfg, model_id=cfg.judge_model,
                   inputs=[cfg.generated, cfg.reference], overwrite=overwrite, extra={"summary": summary})
    runner.finish()
    results.print(summary_table(summary, names))
    return summary


def summarise(rows: list[RubricQualityRow], names: list[str]) -> dict:
    """Per metric: each rubric's mean score and win rate with 95% intervals, and the ties."""
    judged = [r.scores for r in rows if r.scores]
    out: dict = {"items": len(rows), "judged": len(judged), "unjudged": len(rows) - len(judged), "metrics": {}}
    for metric in METRICS:
        wins, ties = win_counts(judged, names, metric)
        entry: dict[str, Any] = {"ties": ties, "tie_rate": ties / len(judged) if judged else None}
        for name in names:
            mean, lo, hi = mean_interval([s[name][metric] for s in judged]) if judged else (None, None, None)
            rate = wins[name] / len(judged) if judged else None
            entry[name] = {"mean": mean, "mean_ci": [lo, hi], "wins": wins[name], "win_rate": rate,
                           "win_rate_ci": list(wilson_interval(wins[name], len(judged)))}
        out["metrics"][metric] = entry
    return out


def summary_table(summary: dict, names: list[str]) -> Table:
    gen = names[1]
    table = Table(title=f"rubric quality: {summary['judged']} of {summary['items']} items judged")
    for col in ("metric", f"{REFERENCE_NAME} mean", f"{gen} mean", f"{gen} win rate [95% CI]",
                f"{REFERENCE_NAME} win rate", "ties"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, e in summary["metrics"].items():
        if e[gen]["win_rate"] is None:
            table.add_row(metric, "n/a", "n/a", "n/a", "n/a", "0")
            continue
        lo, hi = e[gen]["win_rate_ci"]
        table.add_row(metric, f"{e[REFERENCE_NAME]['mean']:.2f}", f"{e[gen]['mean']:.2f}",
                      f"{e[gen]['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]", f"{e[REFERENCE_NAME]['win_rate']:.3f}",
                      str(e["ties"]))
    return table
