"""A comparison built to see an effect at the embedded scale: diagnose first, then train where the teacher helps.

Per seed: ``gen-rubrics`` (reference rubrics) on --train-items ARC-Easy items; ``rcsd diagnose`` on them (rubric
teacher, a shuffled rubric, and the contrastive teacher rubric - shuffled); keep the items on which the rubric
teacher raises the gold answer's log-prob after the student's own reasoning (the signal distillation would
transfer); train OPSD, RCSD (the authors' clip 0.05), RCSD without the clip, RCSD with a tail bucket and no clip,
RCSD with shuffled rubrics and the contrastive RCSD teacher on those items with the same rollout-token budget
(vLLM rollouts); then measure, on the focus items and on --eval-items held-out items, the log-likelihood metrics
(acc, acc_norm and the mean log-prob of the gold choice, lm-eval's protocol) and greedy generative accuracy,
beside each run's health (unclipped KL, clipped objective, clip share, entropies, distinct-2, truncation) at its
first and last steps. Every command is a real ``rcsd`` subprocess of --python; finished runs are skipped on a
rerun, so it resumes.

    python examples/compare_focused.py --python .venv-vllm/bin/python --out focus
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcsd_cli.data.artifacts import read_artifact, write_artifact  # noqa: E402
from rcsd_cli.evaluation.stats import Z95, mean_interval, t_critical  # noqa: E402

METHODS = {"base": None, "opsd": ["--method", "opsd"], "rcsd": ["--method", "rcsd"],
           "rcsd-noclip": ["--method", "rcsd", "--clip", "none"],
           "rcsd-tail": ["--method", "rcsd", "--tail-bucket", "--clip", "none"],
           "rcsd-shuffled": ["--method", "rcsd", "--rubric-ablation", "shuffled"],
           "rcsd-contrast": ["--method", "rcsd", "--teacher-contrast", "shuffled"]}
GEN_TOKENS = 128  # greedy held-out generation
VLLM = ["--vllm-enforce-eager", "--vllm-kv-cache-gib", 1]  # CPU: no graph capture; a small KV cache lets runs share RAM
HEALTH = ("kl", "loss", "clip_share", "student_entropy", "teacher_entropy", "distinct_2", "truncated_share")


def rcsd(args, python: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([python, "-m", "rcsd_cli", *map(str, args)], capture_output=True, text=True, env=env)
    with log.open("a") as f:
        f.write(f"$ rcsd {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr[-4000:]}\n[exit {proc.returncode}]\n")
    if proc.returncode:
        raise SystemExit(f"rcsd {args[0]} failed (see {log}):\n{proc.stderr[-1500:]}")


def focus_items(args, seed: int, root: Path, log: Path) -> tuple[Path, dict]:
    rubrics, diag, focus = (root / f"{name}-seed{seed}.parquet" for name in ("rubrics", "diagnose", "focus"))
    if not rubrics.exists():
        rcsd(["gen-rubrics", args.bench, "--generator", "reference", "--limit", args.train_items, "--seed", seed,
              "-o", rubrics], args.python, log)
    if not diag.exists():
        rcsd(["diagnose", rubrics, "--limit", args.train_items, "--seed", seed,
              "--conditions", args.diagnose_conditions, "--prompt-style", "answer-line",
              *(["--teacher-contrast", "shuffled"] if "contrast" in args.diagnose_conditions else []),
              "--backend", "vllm", *VLLM,
              "--max-new-tokens", args.diagnose_tokens, "-o", diag],
             args.python, log)
    rows, meta = read_artifact(diag, "diagnose")
    helped = {r.id for r in rows if r.condition == "rubric" and r.gold_logprob_teacher is not None
              and r.gold_logprob_teacher > r.gold_logprob_student}
    if not focus.exists():
        items, _ = read_artifact(rubrics, "rubrics")
        write_artifact(focus, "rubrics", [r for r in items if r.id in helped], stage="gen-rubrics",
                       config={"selected_from": str(rubrics), "rule": "rubric teacher raises the gold log-prob"},
                       inputs=[rubrics, diag], overwrite=True)
    return focus, {"summary": meta["summary"], "verdict": meta["verdict"], "focus_items": len(helped),
                   "diagnosed_items": len({r.id for r in rows})}


def gold_logprob(path: Path, ids: set | None = None) -> tuple[float, float, float]:
    """(acc, acc_norm, mean gold-choice log-prob) of a loglik eval file, over ``ids`` if given."""
    rows, _ = read_artifact(path, "eval")
    rows = [r for r in rows if ids is None or r.id in ids]
    return (statistics.fmean(accuracy(r) for r in rows), statistics.fmean(float(r.acc_norm) for r in rows),
            statistics.fmean(r.gold_logprob for r in rows))


def accuracy(row) -> float:
    return statistics.fmean(float(bool(c)) for c in row.correct)


def run_one(method: str, seed: int, focus: Path, args, root: Path, log: Path) -> dict:
    run = root / f"{method}-seed{seed}"
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    model, steps, tokens, t0 = args.model, 0, 0, time.perf_counter()
    finished = (run / "model" / "rcsd_train_config.json").exists()  # written once training has ended
    if METHODS[method] is not None and not finished:
        rcsd(["train", "--config", ROOT / "examples" / "recipes" / "cpu-embedded.yaml", "--rubrics", focus,
              "--model", args.model, *METHODS[method], "--seed", seed, "--steps", args.max_steps,
              "--max-rollout-tokens", args.rollout_tokens, "--lr", args.lr, "--rollout-backend", "vllm", *VLLM,
              "-o", run / "model", "--overwrite"], args.python, log)
    if METHODS[method] is not None:
        metrics, _ = read_artifact(run / "model" / "metrics.parquet", "metrics")
        model, steps, tokens = run / "model", len(metrics), metrics[-1].rollout_tokens
        health = {f"{name}_{when}": statistics.fmean(v) if (v := [getattr(m, name) for m in part
                                                                  if getattr(m, name) is not None]) else None
                  for name in HEALTH for when, part in (("first", metrics[:2]), ("last", metrics[-2:]))}
    else:
        health = {}
    train_seconds = time.perf_counter() - t0
    held = ["--bench", args.bench, "--model", model, "--seed", seed, "--offset", args.train_items,
            "--limit", args.eval_items, "--prompt-style", "answer-line"]
    rcsd(["eval", *held, "--backend", "vllm", *VLLM, "--max-new-tokens", GEN_TOKENS,
          "-o", run / "gen.parquet", "--overwrite"], args.python, log)
    rcsd(["eval", *held, "--scoring", "loglik", "-o", run / "loglik.parquet", "--overwrite"], args.python, log)
    rcsd(["eval", "--bench", args.bench, "--model", model, "--seed", seed, "--limit", args.train_items,
          "--scoring", "loglik", "-o", run / "loglik-train.parquet", "--overwrite"], args.python, log)
    focus_ids = {r.id for r in read_artifact(focus, "rubrics")[0]}
    gen_rows, _ = read_artifact(run / "gen.parquet", "eval")
    acc, acc_norm, gold = gold_logprob(run / "loglik.parquet")
    f_acc, f_norm, f_gold = gold_logprob(run / "loglik-train.parquet", focus_ids)
    result = {"method": method, "seed": seed, "steps": steps, "rollout_tokens": tokens,
              "train_seconds": round(train_seconds, 1),
              "heldout_generative_accuracy": statistics.fmean(accuracy(r) for r in gen_rows),
              "heldout_strict_accuracy": statistics.fmean(float(bool(c)) for r in gen_rows for c in r.strict_correct),
              "heldout_completion_tokens": statistics.fmean(t for r in gen_rows for t in r.completion_tokens),
              "heldout_truncated_share": statistics.fmean(float(t >= GEN_TOKENS) for r in gen_rows
                                                          for t in r.completion_tokens),
              **health,
              "heldout_acc": acc, "heldout_acc_norm": acc_norm, "heldout_gold_logprob": gold,
              "focus_acc": f_acc, "focus_acc_norm": f_norm, "focus_gold_logprob": f_gold}
    done.write_text(json.dumps(result, indent=2))
    return result


def mean_ci(values) -> str:
    """Mean ± the half-width of its 95% t interval over seeds (4.30 standard errors for 3 seeds); one seed has
    no interval and says so."""
    m, lo, hi = mean_interval(list(values))
    if len(values) < 2:
        return f"{m:.3f} (1 seed)"
    return f"{m:.3f} ± {(hi - lo) / 2:.3f}"


def paired(results, method, key, against: str = "base") -> str:
    """Mean difference to ``against`` over seeds (paired by seed), with its 95% t interval."""
    other = {r["seed"]: r[key] for r in results if r["method"] == against}
    diffs = [r[key] - other[r["seed"]] for r in results if r["method"] == method and r["seed"] in other]
    return mean_ci(diffs) if diffs else "n/a"


def diagnose_table(diagnoses) -> str:
    """Each seed's diagnose gains with 95% t intervals over items, recomputed from the stored normal intervals
    (same mean and standard error; t with n - 1 degrees of freedom instead of 1.96)."""
    lines = ["| seed | condition | gold log-prob gain | 95% t interval | items |", "| --- | --- | --- | --- | --- |"]
    for seed, d in sorted(diagnoses.items()):
        for condition, summary in d["summary"].items():
            g = summary.get("gold_logprob_gain")
            if not isinstance(g, dict):
                continue
            half = t_critical(g["n"] - 1) * (g["ci"][1] - g["ci"][0]) / (2 * Z95)  # the stored interval: z
            lines.append(f"| {seed} | {condition} | {g['mean']:+.3f} | [{g['mean'] - half:+.4f}, "
                         f"{g['mean'] + half:+.4f}] | {g['n']} |")
    return "\n".join(lines)


def table(results, args) -> str:
    keys = [("focus gold log-prob", "focus_gold_logprob"), ("focus acc", "focus_acc"),
            ("held-out gold log-prob", "heldout_gold_logprob"), ("held-out acc", "heldout_acc"),
            ("held-out acc_norm", "heldout_acc_norm"), ("held-out generative acc", "heldout_generative_accuracy")]
    lines = ["| method | seeds | " + " | ".join(k for k, _ in keys) + " | steps | rollout tokens |",
             "| --- " * (len(keys) + 4) + "|"]
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if rs:
            lines.append(f"| {method} | {len(rs)} | " + " | ".join(mean_ci([r[k] for r in rs]) for _, k in keys) +
                         f" | {statistics.fmean(r['steps'] for r in rs):.1f} | "
                         f"{statistics.fmean(r['rollout_tokens'] for r in rs):.0f} |")
    lines += ["", "Paired differences to base (same seed), mean ± 95% interval over seeds:", "",
              "| method | " + " | ".join(k for k, _ in keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    for method in [m for m in METHODS if m != "base"]:
        if any(r["method"] == method for r in results):
            lines.append(f"| {method} − base | " + " | ".join(paired(results, method, k) for _, k in keys) + " |")
    for other in ("rcsd-shuffled", "rcsd-contrast"):  # the rubric-specific effect: paired by seed as well
        if any(r["method"] == other for r in results) and any(r["method"] == "rcsd" for r in results):
            lines.append(f"| rcsd − {other} | " + " | ".join(paired(results, "rcsd", k, other) for _, k in keys) +
                         " |")
    return "\n".join(lines + ["", health_table(results)])


def health_table(results) -> str:
    """Each run's health, first two steps -> last two (mean over seeds), and its held-out greedy generation."""
    def first_last(rs, name):
        pairs = [(r[f"{name}_first"], r[f"{name}_last"]) for r in rs if r.get(f"{name}_first") is not None]
        if not pairs:
            return "n/a"
        return f"{statistics.fmean(a for a, _ in pairs):.3f} → {statistics.fmean(b for _, b in pairs):.3f}"

    names = [("unclipped top-k KL", "kl"), ("objective (after clip)", "loss"), ("share of terms at clip",
             "clip_share"), ("student entropy", "student_entropy"), ("distinct-2", "distinct_2"),
             ("rollouts truncated", "truncated_share")]
    gen = [("held-out strict acc", "heldout_strict_accuracy"), ("greedy tokens", "heldout_completion_tokens"),
           ("greedy truncated", "heldout_truncated_share")]
    lines = ["Health (first two steps → last two, mean over seeds) and held-out greedy generation:", "",
             "| method | " + " | ".join(k for k, _ in names + gen) + " |", "| --- " * (len(names) + len(gen) + 1)
             + "|"]
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if rs:
            lines.append(f"| {method} | " + " | ".join(first_last(rs, k) for _, k in names) + " | " +
                         " | ".join(mean_ci([r[k] for r in rs]) for _, k in gen) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="interpreter with vLLM (e.g. .venv-vllm/bin/python)")
    p.add_argument("--out", type=Path, default=Path("focus"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bench", default="arc-easy")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--train-items", type=int, default=64)
    p.add_argument("--eval-items", type=int, default=80)
    p.add_argument("--diagnose-tokens", type=int, default=64, help="student rollout length in diagnose")
    p.add_argument("--diagnose-conditions", default="rubric,shuffled,contrast",
                   help="teacher conditions diagnose compares (the focus rule reads 'rubric'; contrast: the "
                   "rubric teacher minus the shuffled one)")
    p.add_argument("--rollout-tokens", type=int, default=3000, help="rollout-token budget per training run (6 "
                   "runs x 3 seeds fit one afternoon on 2 CPU cores; the 2026-11-27 comparison used 6000)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--table-from", type=Path, help="print the tables of a stored results.json and stop (no runs)")
    args = p.parse_args()
    if args.table_from:
        stored = json.loads(args.table_from.read_text())
        print(table(stored["runs"], args) + "\n\nDiagnose, per seed:\n\n" + diagnose_table(stored["diagnose"]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    t0 = time.perf_counter()
    results, diagnoses = [], {}
    for seed in args.seeds:
        focus, diagnoses[seed] = focus_items(args, seed, args.out, log)
        print(f"seed {seed}: {diagnoses[seed]['focus_items']} of {diagnoses[seed]['diagnosed_items']} items "
              f"helped; {diagnoses[seed]['verdict']}", file=sys.stderr)
        for method in args.methods:
            results.append(run_one(method, seed, focus, args, args.out, log))
            print(f"seed {seed} {method}: done ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr)
    text = table(results, args)
    (args.out / "results.json").write_text(json.dumps({"diagnose": diagnoses, "runs": results}, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
