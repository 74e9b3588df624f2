"""Parity of ``rcsd eval --scoring loglik`` with lm-evaluation-harness's own tasks, bench by bench.

    python -m venv /tmp/lmeval
    /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api]==0.4.13" "transformers<5.20" accelerate
    python benchmarks/lm_eval_parity.py --lm-eval /tmp/lmeval/bin/lm_eval --limit 200
    python benchmarks/lm_eval_parity.py --lm-eval /tmp/lmeval/bin/lm_eval --served --bench arc-easy

``--served``: lm-eval's ``local-completions`` model scores the items through ``rcsd serve`` (started here on the
same model; token ids, ``echo`` and ``logprobs``, the field's way of evaluating a served model) instead of loading
the model itself.

For each bench the items are rcsd's selection (seeded shuffle, ``--limit``), written with the dataset's
own fields to a local JSONL. lm-eval runs offline in its own venv with a task file that ``include``s
its own task YAML (arc_easy, arc_challenge, sciq, openbookqa; mmlu's default template with the
per-subject description) and only points the data at that file: the prompts, choices and targets
are lm-eval's. Prints one table (acc, acc_norm, seconds of both tools, model load included);
nothing else should run on the machine meanwhile.
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

from serve_concurrency import start as start_server  # this folder's own helper: rcsd serve at a free port

from rcsd_cli.configs.eval import EvalConfig
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.evaluation.benchmarks import benchmark, select
from rcsd_cli.models import resolve_model
from rcsd_cli.stages.eval import run_eval

# bench -> (lm-eval task file inside lm_eval/tasks, extra task keys)
TASKS = {
    "arc-easy": ("arc/arc_easy.yaml", ""),
    "arc-challenge": ("arc/arc_challenge.yaml", ""),
    "sciq": ("sciq/sciq.yaml", ""),
    "openbookqa": ("openbookqa/openbookqa.yaml", ""),
    "mmlu-stem": ("mmlu/default/_default_template_yaml",
                  'description: "The following are multiple choice questions (with answers) about '
                  "{{subject.replace('_', ' ')}}.\\n\\n\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
}
TASK = """include: {include}
task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
training_split: null
validation_split: null
test_split: test
fewshot_split: null
{extra}"""


def lm_eval_tasks_dir(lm_eval: str) -> Path:
    python = Path(lm_eval).with_name("python")
    out = subprocess.run([str(python), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out) / "tasks"


def parity(bench: str, args, tasks_dir: Path, work: Path) -> dict:
    items = select(benchmark(bench).load(None, args.seed), args.seed, 0, args.limit)
    raw = benchmark(bench).raw()
    data = work / f"{bench}.jsonl"
    data.write_text("".join(json.dumps(raw[it.id]) + "\n" for it in items))
    include, extra = TASKS[bench]
    name = f"rcsd_parity_{bench.replace('-', '_')}"
    (work / f"{name}.yaml").write_text(TASK.format(include=tasks_dir / include, name=name, data=data, extra=extra))
    t0 = time.perf_counter()
    ours = run_eval(EvalConfig(bench=bench, model=args.model, limit=args.limit, seed=args.seed, scoring="loglik",
                               generation=GenerationConfig(batch_size=args.batch_size)),
                    work / f"{bench}.parquet", show=False)
    rcsd_seconds = time.perf_counter() - t0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    path = resolve_model(args.model)
    model = ["--model", "hf", "--model_args", f"pretrained={path},dtype=float32"]
    server = None
    if args.served:
        server, url = start_server(path)
        model = ["--model", "local-completions", "--model_args",
                 f"model={path},base_url={url}/completions,tokenizer={path},tokenized_requests=True,num_concurrent=4"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([args.lm_eval, *model, "--tasks", name, "--include_path", str(work), "--batch_size",
                               str(args.batch_size), "--device", "cpu", "--output_path", str(work / "lm_eval" / bench)],
                              capture_output=True, text=True, env=env)
    finally:
        if server is not None:
            server.kill()
    lm_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lm-eval failed on {bench}:\n{proc.stderr[-3000:]}")
    result = json.loads(sorted((work / "lm_eval" / bench).rglob("results_*.json"))[-1].read_text())
    theirs = result["results"][name]
    task = "mmlu_<subject>, 0-shot" if bench == "mmlu-stem" else Path(include).stem
    return {"bench": bench, "task": task, "items": len(items), "rcsd_acc": ours["accuracy"],
            "lm_acc": theirs["acc,none"], "rcsd_acc_norm": ours["acc_norm"], "lm_acc_norm": theirs["acc_norm,none"],
            "rcsd_seconds": rcsd_seconds, "lm_seconds": lm_seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-eval", default="lm_eval", help="The lm_eval executable (its own venv).")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bench", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--served", action="store_true", help="lm-eval's local-completions against rcsd serve")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rcsd-parity-"))
    tasks_dir = lm_eval_tasks_dir(args.lm_eval)
    rows = [parity(bench, args, tasks_dir, work) for bench in args.bench]
    how = "lm-eval's local-completions through rcsd serve" if args.served else "lm-eval's hf model"
    print(f"{args.model}, fp32 CPU, rcsd's seed-{args.seed} selection, lm-eval 0.4.13's own task prompts, {how}\n")
    print("| bench (lm-eval task) | items | acc rcsd / lm-eval | acc_norm rcsd / lm-eval | difference (points) "
          "| seconds rcsd / lm-eval |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['bench']} (`{r['task']}`) | {r['items']} | {r['rcsd_acc']:.4f} / {r['lm_acc']:.4f} | "
              f"{r['rcsd_acc_norm']:.4f} / {r['lm_acc_norm']:.4f} | "
              f"{100 * (r['rcsd_acc'] - r['lm_acc']):+.2f} / {100 * (r['rcsd_acc_norm'] - r['lm_acc_norm']):+.2f} | "
              f"{r['rcsd_seconds']:.0f} / {r['lm_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
