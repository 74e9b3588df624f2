"""Static batches vs continuous batching on the demo's own generation: its eval (greedy) and its sample
(temperature 1.0, top-p 0.95, top-k 20) prompts, 128 new tokens, 16 rows, the default model.

Both loops run in this one process on the same prompts and seeds, alternating round by round so that machine
noise hits each alike; every round must give the same tokens from both (checked). Prints the median wall time
and generated tokens per second of each, the decode steps (forwards of the live rows) and the share of
row-steps that carried a row still generating, then the speed-up as the ratio of medians.

    python benchmarks/bench_continuous.py --rounds 3 > benchmarks/results/bench_continuous_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    import torch

    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.modeling.continuous import DecodeStats
    from rcsd_cli.modeling.generation import _static_batches, generate
    from rcsd_cli.modeling.sampling import item_seed
    from rcsd_cli.models import DEFAULT_MODEL, load_model
    from rcsd_cli.rubrics.prompts import student_prompt
    from rcsd_cli.stages.eval import load_eval_items

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--bench", default="arc-easy")
    ap.add_argument("--items", type=int, default=100, help="Prompts per workload (the demo: 80 sampled, 100 eval).")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(args.model, device=torch.device("cpu"))
    model, tok = lm.model, lm.tokenizer
    train = [p for p, _ in load_eval_items(args.bench, None, 0, 0, 80)]
    held_out = [p for p, _ in load_eval_items(args.bench, None, 0, 80, args.items)]
    workloads = {
        "eval (greedy)": (held_out, GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0,
                                                     batch_size=args.rows)),
        "sample (t=1.0)": (train, GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95,
                                                   top_k=20, batch_size=args.rows)),
    }
    print(f"# Continuous batching vs static batches ({args.model}, {args.rows} rows, {args.new_tokens} new tokens)\n")
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} alternating "
          f"rounds, {time.strftime('%Y-%m-%d')}; medians\n")
    print("| workload | loop | items | tokens | decode steps | live row-steps | seconds | tokens/s | speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (problems, cfg) in workloads.items():
        prompts = [student_prompt(tok, p, style="answer-line") for p in problems]
        seeds = [item_seed(0, p.id, 0) for p in problems]
        times = {"static": [], "continuous": []}
        outputs, steps = {}, {}
        for _ in range(args.rounds):
            for loop in times:
                t0 = time.perf_counter()
                if loop == "static":
                    gens = _static_batches(model, tok, prompts, cfg, seeds)
                else:
                    stats = DecodeStats()
                    gens = generate(model, tok, prompts, cfg, 0, seeds=seeds, stats=stats)
                times[loop].append(time.perf_counter() - t0)
                outputs[loop] = [g.token_ids for g in gens]
                if loop == "static":  # a batch steps until its longest row is done
                    lengths = [len(t) for t in outputs[loop]]
                    n = sum(max(lengths[s:s + cfg.batch_size]) - 1 for s in range(0, len(lengths), cfg.batch_size))
                    steps[loop] = (n, sum(x - 1 for x in lengths) / (n * cfg.batch_size))
                else:
                    steps[loop] = (stats.steps, stats.occupancy)
            if outputs["static"] != outputs["continuous"]:
                raise SystemExit(f"{name}: the two loops gave different tokens")
        tokens = sum(len(t) for t in outputs["static"])
        base = statistics.median(times["static"])
        for loop, seconds in times.items():
            median = statistics.median(seconds)
            print(f"| {name} | {loop} | {len(prompts)} | {tokens} | {steps[loop][0]} | {steps[loop][1]:.0%} | "
                  f"{median:.1f} | {tokens / median:.1f} | {base / median:.2f}x |")
    print("\nSame tokens from both loops in every round (checked).")


if __name__ == "__main__":
    main()
