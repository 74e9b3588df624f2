"""CUDA check of the whole pipeline on one GPU, with timings; prints a Markdown table.

Weights cannot be downloaded on every GPU box, so the models are random, built from a real
tokenizer: a tiny 2-layer Llama for the functional checks and one with SmolLM2-360M's shape
(32 layers, hidden 960) for step timings. Random weights never emit end-of-sequence, so every
rollout runs to ``--max-new-tokens``: the timings are worst-case generation lengths.

    python benchmarks/gpu_check.py --tokenizer ~/.cache/rcsd/models/smollm2-135m-instruct -o gpu-check

Runs, each a real ``rcsd`` subprocess: gen-rubrics, sample, eval (rubric bench), train with
rcsd/grpo/sft on the tiny model; then rcsd training of the 360M-shaped model in one process
(replicated) and under ``torchrun --nproc_per_node 1 --sharding full-shard`` (FSDP2 on NCCL).

``--quick`` instead measures the GPU path's figures of issue 26 on Qwen3-8B-shaped random weights
(``benchmarks/gpu_quick.py`` says what and how; budget about 8 minutes on one H200):

    python benchmarks/gpu_check.py --quick -o gpu-quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_llama(out: Path, tokenizer_dir: Path, hidden: int, layers: int, heads: int, kv_heads: int,
                 intermediate: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def rcsd(args: list, log: Path, launcher: list | None = None) -> float:
    """Run one rcsd command, append its output to ``log``; returns wall seconds (raises on failure)."""
    cmd = (launcher or [sys.executable]) + ["-m", "rcsd_cli", *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    with log.open("a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode}, {seconds:.1f}s]\n")
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, args[:1]))} (see {log})\n{proc.stderr[-2000:]}")
    return seconds


def random_model(out: Path, tokenizer_dir: Path, shape: str, layers: int | None = None) -> Path:
    """A random model of a published shape (vocabulary from the tokenizer; ``layers`` can shorten it)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    if shape == "smollm2-360m":
        cfg = LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=layers or 32,
                          num_attention_heads=15, num_key_value_heads=5, **ids)
        model = LlamaForCausalLM(cfg)
    else:  # qwen3-0.6b
        cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers or 28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, **ids)
        model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def metrics(folder: Path):
    from rcsd_cli.data.artifacts import read_artifact

    rows, _ = read_artifact(folder / "metrics.parquet", "metrics")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, help="Tokenizer folder (the full check; --quick needs none).")
    ap.add_argument("-o", "--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="Layers of the SmolLM2-360M-shaped model.")
    ap.add_argument("--skip-pipeline", action="store_true", help="Only the two timed training runs.")
    ap.add_argument("--allow-cpu", action="store_true", help="Dry run without a GPU (for testing this script).")
    ap.add_argument("--quick", action="store_true", help="The GPU path's figures (benchmarks/gpu_quick.py).")
    ap.add_argument("--scale", choices=("qwen3-8b", "tiny"), default="qwen3-8b",
                    help="--quick: model shapes (tiny: to test the script on CPU with --allow-cpu).")
    args = ap.parse_args()
    import torch

    if not (torch.cuda.is_available() or args.allow_cpu):
        raise SystemExit("no CUDA device")
    if args.quick:
        from benchmarks.gpu_quick import quick

        quick(args.out, args.scale)
        return
    if args.tokenizer is None:
        raise SystemExit("--tokenizer is required for the full check")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    tiny = random_llama(out / "tiny", args.tokenizer, 64, 2, 4, 2, 128)
    mid = random_llama(out / f"llama-360m-shape-{args.layers}", args.tokenizer, 960, args.layers, 15, 5, 2560)
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?",
                                        "choices": [str(2 * i), str(2 * i + 1), str(i), str(3 * i)],
                                        "answer": "A"}) + "\n" for i in range(16)))
    rows = []
    rub = out / "rubrics.parquet"
    rows.append(("gen-rubrics (reference)", rcsd(["gen-rubrics", data, "-o", rub, "--generator", "reference",
                                                  "--overwrite"], log)))
    pipeline = [
        ("sample tiny, 16x2", ["sample", rub, "-o", out / "samples.parquet", "--model", tiny, "--n", 2,
                               "--max-new-tokens", 32]),
        ("eval tiny, rubric bench", ["eval", "--bench", "rubric", "--data", rub, "--model", tiny,
                                     "-o", out / "eval.parquet", "--max-new-tokens", 32]),
    ]
    for method in ("rcsd", "grpo", "sft"):
        group = ["--group-size", 2] if method == "grpo" else []
        pipeline.append((f"train tiny {method}, 2 steps", ["train", "--rubrics", rub, "-o", out / f"tiny-{method}",
                                                           "--model", tiny, "--method", method, "--steps", 2,
                                                           "--batch-size", 4, "--max-new-tokens", 16, *group]))
    for name, command in [] if args.skip_pipeline else pipeline:
        rows.append((name, rcsd([*command, "--overwrite"], log)))
    common = ["--rubrics", rub, "--model", mid, "--steps", args.steps, "--batch-size", args.batch_size,
              "--micro-batch-size", 4, "--max-new-tokens", args.max_new_tokens, "--lr", 1e-5, "--overwrite"]
    rows.append(("train 360M-shape rcsd, replicate", rcsd(["train", *common, "-o", out / "mid-replicate"], log)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    rows.append(("train 360M-shape rcsd, torchrun full-shard",
                 rcsd(["train", *common, "-o", out / "mid-fsdp", "--sharding", "full-shard", "--save-every", 2],
                      log, torchrun)))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch {torch.__version__}, {args.layers} layers")
    print("\n| command | wall seconds |\n| --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print("\n| run | step | loss | grad norm | completion tokens | step seconds | tokens/s |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for run in ("mid-replicate", "mid-fsdp"):
        for m in metrics(out / run):
            print(f"| {run} | {m.step} | {m.loss:.5f} | {m.grad_norm:.4f} | {m.completion_tokens} | "
                  f"{m.seconds:.2f} | {m.tokens_per_second:.0f} |")


if __name__ == "__main__":
    main()
