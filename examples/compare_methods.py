"""Reproduce the paper's comparison on your machine: base, SFT, GRPO, OPSD and RCSD.

Every method trains the same model on the same rubric-carrying training split, with the same
budget of rollout tokens (SFT uses none: it trains on reference answers for the same number of
steps RCSD took), and is evaluated greedily on one held-out split per seed. Accuracy and rubric
score are reported as mean ± 95% interval over seeds (normal approximation, t would be wider
with 3 seeds), with rollout tokens and wall time. Finished (method, seed) runs are skipped
on a rerun, so an interrupted comparison resumes.

    python examples/compare_methods.py --out compare                 # CPU default, < 90 min
    python examples/compare_methods.py --out compare --model Qwen/Qwen3-1.7B --bench sciq \\
        --train-items 2000 --eval-items 1000 --rollout-tokens 2000000 --batch-size 64 --max-new-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rcsd_cli.configs.eval import EvalConfig
from rcsd_cli.configs.gen_rubrics import GenRubricsConfig
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.options import build_config, read_config_file
from rcsd_cli.evaluation.stats import Z95
from rcsd_cli.stages.eval import run_eval
from rcsd_cli.stages.gen_rubrics import run_gen_rubrics
from rcsd_cli.stages.train import run_train
from rcsd_cli.ui import quiet_libraries

METHODS = ("base", "sft", "grpo", "opsd", "rcsd")
TEACHER_ONLY = ("teacher", "teacher_context", "teacher_thinking", "analysis_by", "analysis_temperature",
                "analysis_top_p", "analysis_top_k", "analysis_max_new_tokens")


def mean_ci(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return m, half


def run_one(method: str, seed: int, args, root: Path) -> dict:
    run = root / f"{method}-seed{seed}"
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    rubrics = root / f"rubrics-seed{seed}.parquet"
    if not rubrics.exists():
        run_gen_rubrics(GenRubricsConfig(data=args.bench, generator="reference", limit=args.train_items, seed=seed),
                        rubrics)
    t0 = time.perf_counter()
    model, rollout_tokens, steps = args.model, 0, 0
    if method != "base":
        # a recipe (option names, like rcsd train --config) sets the defaults; the budget settings win
        values = {**args.recipe_values, "rubrics": str(rubrics), "model": args.model, "lr": args.lr, "seed": seed,
                  "micro_batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                  "temperature": 1.2 if method in ("rcsd", "opsd") else 1.0, "top_p": 0.95, "top_k": 20,
                  "gen_batch_size": 16, "method": method, "steps": args.max_steps, "batch_size": args.batch_size,
                  "prompt_style": args.recipe_values.get("prompt_style", "answer-line")}
        if method in ("grpo", "sft"):  # no teacher: drop the recipe's teacher settings
            values = {k: v for k, v in values.items() if k not in TEACHER_ONLY}
        if method == "sft":
            ref = root / f"rcsd-seed{seed}" / "result.json"
            values["steps"] = json.loads(ref.read_text())["steps"] if ref.exists() else args.max_steps
        else:
            values["max_rollout_tokens"] = args.rollout_tokens
        if method == "grpo":
            values.update(batch_size=max(1, args.batch_size // args.group_size), group_size=args.group_size)
        cfg = build_config(TrainConfig, values, f"{method} run")
        metrics = run_train(cfg, run / "model", overwrite=True)
        model, rollout_tokens, steps = str(run / "model"), metrics[-1].rollout_tokens, len(metrics)
    train_seconds = time.perf_counter() - t0
    eval_cfg = EvalConfig(bench=args.bench, model=model, limit=args.eval_items, offset=args.train_items, seed=seed,
                          prompt_style=args.recipe_values.get("prompt_style", "answer-line"),
                          generation=GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0))
    summary = run_eval(eval_cfg, run / "eval.parquet", overwrite=True, show=False)
    result = {"method": method, "seed": seed, "accuracy": summary["accuracy"], "rubric_score": summary["rubric_score"],
              "rollout_tokens": rollout_tokens, "steps": steps, "train_seconds": train_seconds,
              "eval_seconds": summary["seconds"]}
    done.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict], args) -> str:
    lines = [f"| method | accuracy (mean ± 95% CI, {len(args.seeds)} seeds) | rubric score | rollout tokens / run "
             "| optimizer steps | train seconds / run |", "| --- | --- | --- | --- | --- | --- |"]
    for method in args.methods:
        rs = [r for r in results if r["method"] == method]
        acc, acc_h = mean_ci([r["accuracy"] for r in rs])
        sc, sc_h = mean_ci([r["rubric_score"] for r in rs])
        lines.append(f"| {method} | {acc:.3f} ± {acc_h:.3f} | {sc:.3f} ± {sc_h:.3f} | "
                     f"{statistics.fmean(r['rollout_tokens'] for r in rs):.0f} | "
                     f"{statistics.fmean(r['steps'] for r in rs):.1f} | "
                     f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("compare"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bench", default="arc-easy")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-items", type=int, default=64)
    p.add_argument("--eval-items", type=int, default=80)
    p.add_argument("--rollout-tokens", type=int, default=2000, help="Rollout-token budget per training run.")
    p.add_argument("--max-steps", type=int, default=40, help="Upper bound on steps (the budget usually stops first).")
    p.add_argument("--batch-size", type=int, default=8, help="Rollouts per step (GRPO: prompts x group size).")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--recipe", type=Path, help="A train config (examples/recipes/*.yaml) for the trained methods; "
                   "the budget options above override its values.")
    args = p.parse_args()
    args.recipe_values = read_config_file(args.recipe, TrainConfig) if args.recipe else {}
    quiet_libraries()
    args.out.mkdir(parents=True, exist_ok=True)
    order = [m for m in ("base", "rcsd", "opsd", "grpo", "sft") if m in args.methods]  # sft reuses rcsd's steps
    t0 = time.perf_counter()
    results = [run_one(m, s, args, args.out) for s in args.seeds for m in order]
    text = table(results, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
