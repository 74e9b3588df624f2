"""One training step, phase by phase: rcsd with HF vs vLLM rollouts, and TRL's SDFTTrainer.

The same work for every setting: the embedded SmolLM2-135M-Instruct (fp32 weights; the bf16-mixed
and TRL bf16 settings compute under bf16 autocast), 8 prompts per step,
1 rollout each of exactly --tokens tokens (EOS ignored), temperature 1.2 / top-p 0.95 / top-k 20,
frozen initial-weights teacher with privileged context (rubric + reference), top-20 forward KL,
AdamW lr 5e-6, one optimizer step per batch. Each setting runs in a fresh process (so peak RSS is
its own); settings are alternated round by round; step 1 is a warm-up and the figures are medians
over the later steps of all rounds. rcsd's phases come from its metrics.parquet; TRL's rollout
time from wrapping its ``_generate`` and its step time from a callback.

    python benchmarks/bench_train_step.py --python .venv-vllm/bin/python --trl-python /path/to/trl-venv/bin/python

``--python``: interpreter for rcsd (needs vLLM for the vllm settings); ``--trl-python``: one with
trl==1.16.0 installed (TRL settings are skipped without it). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "data.jsonl"

TRL_CHILD = r"""
import json, sys, time, torch
from pathlib import Path
spec = json.loads(sys.argv[1])
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.sdft import SDFTConfig, SDFTTrainer
sys.path.insert(0, spec["root"])
from rcsd_cli.train.phases import _reset_rss_peak, _rss_peak_gib

tok = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
ds = Dataset.from_list(spec["rows"])
args = SDFTConfig(
    output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
    num_generations=1, max_steps=spec["steps"], learning_rate=5e-6, lr_scheduler_type="constant",
    max_completion_length=spec["tokens"], temperature=1.2, top_p=0.95, top_k=20,
    distillation_mode="topk_logits", distillation_topk=20, distillation_alpha=0.0,
    gradient_checkpointing=spec["gc"], use_vllm=spec["vllm"], vllm_mode="colocate",
    generation_kwargs={"ignore_eos": True} if spec["vllm"] else {"min_new_tokens": spec["tokens"]},
    logging_steps=1, save_strategy="no", report_to=[], bf16=spec["bf16"], use_cpu=not torch.cuda.is_available(),
    seed=0, dataloader_num_workers=0, disable_tqdm=True,
)
trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
steps, rollout = [], [0.0]
gen = trainer._generate
def timed_generate(*a, **k):
    t = time.perf_counter(); out = gen(*a, **k); rollout[0] += time.perf_counter() - t; return out
trainer._generate = timed_generate
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k):
        _reset_rss_peak(); rollout[0] = 0.0; self.t = time.perf_counter()
    def on_step_end(self, *a, **k):
        steps.append({"seconds": time.perf_counter() - self.t, "rollout_seconds": rollout[0],
                      "peak_rss_gib": _rss_peak_gib()})
trainer.add_callback(Clock())
trainer.train()
Path(spec["result"]).write_text(json.dumps(steps))
"""


def _env() -> dict:
    """This checkout first on the path, keeping what the caller put there."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def rcsd_settings(python: str) -> dict:
    return {
        "rcsd hf": dict(kind="rcsd", python=python, extra={}),
        "rcsd hf +gc": dict(kind="rcsd", python=python, extra={"gradient_checkpointing": True}),
        "rcsd vllm": dict(kind="rcsd", python=python, extra={"rollout_backend": "vllm"}),
        "rcsd vllm +gc": dict(kind="rcsd", python=python, extra={"rollout_backend": "vllm",
                                                                  "gradient_checkpointing": True}),
        "rcsd hf bf16-mixed": dict(kind="rcsd", python=python, extra={"precision": "bf16-mixed"}),
        "rcsd hf bf16-mixed +gc": dict(kind="rcsd", python=python, extra={"precision": "bf16-mixed",
                                                                           "gradient_checkpointing": True}),
        "rcsd vllm bf16-mixed": dict(kind="rcsd", python=python, extra={"rollout_backend": "vllm",
                                                                         "precision": "bf16-mixed"}),
    }


def trl_settings(python: str) -> dict:
    return {
        "TRL hf": dict(kind="trl", python=python, gc=False, vllm=False, bf16=False),
        "TRL hf +gc": dict(kind="trl", python=python, gc=True, vllm=False, bf16=False),
        "TRL vllm": dict(kind="trl", python=python, gc=False, vllm=True, bf16=False),
        "TRL hf bf16": dict(kind="trl", python=python, gc=False, vllm=False, bf16=True),
        "TRL hf bf16 +gc": dict(kind="trl", python=python, gc=True, vllm=False, bf16=True),
    }


def run_rcsd(setting: dict, rubrics: Path, work: Path, args) -> list[dict]:
    cfg = {"rubrics": str(rubrics), "model": args.model, "steps": args.steps, "batch_size": args.batch,
           "micro_batch_size": args.batch, "lr": 5e-6, "lr_schedule": "constant", "loss_top_k": 20,
           "prompt_style": "answer-line", "teacher": "frozen", "teacher_context": "rubric+reference",
           "generation": {"max_new_tokens": args.tokens, "temperature": 1.2, "top_p": 0.95, "top_k": 20,
                          "batch_size": args.batch, "ignore_eos": True}, **setting["extra"]}
    config = work / "config.json"
    config.write_text(json.dumps(cfg))
    out = work / "out"
    proc = subprocess.run([setting["python"], "-m", "rcsd_cli", "train", "--config", str(config), "-o", str(out),
                           "--overwrite"], capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise SystemExit(f"rcsd run failed:\n{proc.stderr[-3000:]}")
    import pyarrow.parquet as pq

    return pq.read_table(out / "metrics.parquet").to_pylist()


def run_trl(setting: dict, rows: list[dict], work: Path, args) -> list[dict]:
    from rcsd_cli.models import resolve_model

    spec = {"root": str(ROOT), "model": resolve_model(args.model), "rows": rows, "out": str(work / "trl"),
            "batch": args.batch, "steps": args.steps, "tokens": args.tokens, "gc": setting["gc"],
            "vllm": setting["vllm"], "bf16": setting["bf16"], "result": str(work / "trl.json")}
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([setting["python"], "-c", TRL_CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        print(f"  TRL run failed (skipped): {proc.stderr.strip().splitlines()[-1][:200]}", file=sys.stderr)
        return []
    return json.loads((work / "trl.json").read_text())


def trl_rows(rubrics: Path) -> list[dict]:
    """TRL's dataset: the same student prompt rcsd uses, the rubric + reference as privileged context."""
    from rcsd_cli.data.artifacts import read_artifact
    from rcsd_cli.rubrics.prompts import rubric_json, student_message

    rows, _ = read_artifact(rubrics, "rubrics")
    return [{"prompt": [{"role": "user", "content": student_message(r, "answer-line")}],
             "privileged_context": f"Rubric:\n{rubric_json(r.rubric)}\n\nReference answer:\n{r.reference_answer}"}
            for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter for rcsd (with vLLM for the vllm rows)")
    ap.add_argument("--trl-python", help="interpreter with trl==1.16.0 (TRL rows skipped without it)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="steps per run; step 1 is a warm-up")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--only", help="comma-separated setting names")
    ap.add_argument("--json", help="also write the raw per-step figures here")
    args = ap.parse_args()

    settings = rcsd_settings(args.python) | (trl_settings(args.trl_python) if args.trl_python else {})
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="rcsd-bench-"))
    rubrics = work / "rubrics.parquet"
    subprocess.run([sys.executable, "-m", "rcsd_cli", "-q", "gen-rubrics", str(DATA), "--generator", "reference", "-o",
                    str(rubrics)], check=True, env=_env())
    rows = trl_rows(rubrics)
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name, setting in settings.items():
            t0 = time.perf_counter()
            run_dir = work / f"{name.replace(' ', '_')}-{r}"
            run_dir.mkdir()
            steps = run_rcsd(setting, rubrics, run_dir, args) if setting["kind"] == "rcsd" else \
                run_trl(setting, rows, run_dir, args)
            results[name] += steps[1:]
            print(f"round {r + 1} {name}: {len(steps)} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results, args)


def _median(steps, key):
    values = [s[key] for s in steps if s.get(key) is not None]
    return statistics.median(values) if values else None


def print_table(results: dict, args) -> None:
    tokens = args.batch * args.tokens
    cols = [("step s", "seconds"), ("rollout s", "rollout_seconds"), ("teacher s", "teacher_seconds"),
            ("student fwd+bwd s", "student_seconds"), ("optimizer s", "optimizer_seconds"),
            ("push s", "push_seconds")]
    print(f"\n{args.batch} prompts x {tokens // args.batch} tokens per step, medians of steps 2-{args.steps} over "
          f"{args.rounds} round(s)\n")
    print("| setting | " + " | ".join(c for c, _ in cols) + " | rollout tok/s | peak RSS GiB | steps |")
    print("| --- " * (len(cols) + 4) + "|")
    for name, steps in results.items():
        if not steps:
            print(f"| {name} | " + " | ".join("n/a" for _ in cols) + " | n/a | n/a | 0 |")
            continue
        cells = []
        for _, key in cols:
            v = _median(steps, key)
            cells.append("–" if v is None else f"{v:.2f}")
        roll = _median(steps, "rollout_seconds")
        peak = max(s["peak_rss_gib"] for s in steps)
        gpu = [s["peak_gpu_gib"] for s in steps if s.get("peak_gpu_gib") is not None]
        if gpu:
            name = f"{name} (peak CUDA {max(gpu):.2f} GiB)"
        print(f"| {name} | " + " | ".join(cells) + f" | {tokens / roll:.0f} | {peak:.2f} | {len(steps)} |"
              if roll else f"| {name} | " + " | ".join(cells) + f" | – | {peak:.2f} | {len(steps)} |")


if __name__ == "__main__":
    main()
