"""Parity of ``rcsd eval --scoring loglik`` with lm-evaluation-harness on the same model and items.

    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 lm-eval==0.4.13 "transformers<5.20"
    python examples/lm_eval_parity.py --lm-eval /tmp/lmeval/bin/lm_eval --bench arc-easy --limit 200

The items are rcsd's selection (seeded shuffle, ``--limit``), written to a local JSONL and served to
lm-eval through a task file with ARC's own prompt (``Question: {{question}}\\nAnswer:``, choices as
continuations); lm-eval runs offline in its own venv. Prints one table: acc, acc_norm, both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rcsd_cli.data.inputs import LETTERS
from rcsd_cli.data.schemas import EvalConfig, GenerationConfig
from rcsd_cli.evaluation.benchmarks import load_bench, select
from rcsd_cli.models import resolve_model
from rcsd_cli.stages.eval import run_eval

TASK = """task: rcsd_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-eval", default="lm_eval", help="The lm_eval executable (its own venv).")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bench", default="arc-easy")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rcsd-parity-"))
    items = select(load_bench(args.bench), args.seed, 0, args.limit)
    with open(work / "items.jsonl", "w") as fh:
        for it in items:
            fh.write(json.dumps({"id": it.id, "question": it.question.strip(), "choices": it.choices,
                                 "label": LETTERS.index(it.answer)}) + "\n")
    (work / "task.yaml").write_text(TASK.format(data=work / "items.jsonl"))
    model_dir = resolve_model(args.model)
    t0 = time.perf_counter()
    ours = run_eval(EvalConfig(bench=args.bench, model=args.model, limit=args.limit, seed=args.seed,
                               scoring="loglik", generation=GenerationConfig(batch_size=args.batch_size)),
                    work / "rcsd.parquet", show=False)
    rcsd_seconds = time.perf_counter() - t0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([args.lm_eval, "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                           "--tasks", "rcsd_parity", "--include_path", str(work), "--batch_size",
                           str(args.batch_size), "--device", "cpu", "--output_path", str(work / "lm_eval")],
                          capture_output=True, text=True, env=env)
    lm_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    result_file = sorted((work / "lm_eval").rglob("results_*.json"))[-1]
    theirs = json.loads(result_file.read_text())["results"]["rcsd_parity"]
    print(f"{args.bench}, {len(items)} items (seed {args.seed}), {args.model}, fp32 CPU\n")
    print("| metric | rcsd eval --scoring loglik | lm-eval 0.4.13 | difference (points) |")
    print("| --- | --- | --- | --- |")
    for name, mine in (("acc", ours["accuracy"]), ("acc_norm", ours["acc_norm"])):
        other = theirs[f"{name},none"]
        print(f"| {name} | {mine:.4f} | {other:.4f} | {100 * (mine - other):+.2f} |")
    print(f"\nseconds: rcsd {rcsd_seconds:.0f}, lm-eval {lm_seconds:.0f} (model load included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
