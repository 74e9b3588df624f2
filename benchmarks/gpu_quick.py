"""``gpu_check.py --quick``: issue 26's GPU figures in one process (plus one torchrun), random weights of real
shapes, no downloads, token ids only (no tokenizer). Needs torch, transformers, peft, accelerate and rcsd's
own light dependencies (pydantic, pyarrow: carry their wheels to a bare GPU box).

Measured, each printed as a table and written to OUT/gpu_quick.json:
- decoding of a Qwen3-8B-shaped model (36 layers, hidden 4096, vocabulary 151,936), plain vs compiled loop:
  16 prompts x 512 tokens x 256 new, then widths 480/512/544 and 16 + 5 prompts (seconds, new dynamo graphs);
  host syncs per token of each loop, counted in shapes already compiled (``torch.cuda.set_sync_debug_mode``);
  the first position where compiled and plain greedy tokens differ; peak memory of prefill at 16 x 2,048;
- the loss at the model's real hidden states: KL, clip share and top-1 agreement with bf16 logits (the old
  path) vs rcsd's fp32 logits;
- one training step's allocated/reserved peak against ``memory.estimate``: LoRA r16 on the 36-layer shape
  with gradient checkpointing, full fine-tuning of an 8-layer model, both bf16-mixed;
- ``torchrun --nproc_per_node 1`` of tests/train/sharded_worker.py on CUDA (offload, shard-grad-op teacher
  reshard, weight-push and checkpoint seconds, the devices of optimizer.pt's tensors);
- determinism: one generation and one loss computed twice.

``--allow-cpu --scale tiny`` runs the same code on CPU with small shapes (to test this script, not to measure).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # (layers, hidden, intermediate, heads, kv heads, head dim, vocabulary)
    "qwen3-8b": (36, 4096, 12288, 32, 8, 128, 151936),
    "tiny": (2, 64, 128, 4, 2, 16, 4096),
}


def qwen3(shape: str, layers: int | None = None, dtype=torch.bfloat16, device="cuda"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    n, h, inter, heads, kv, hd, vocab = SHAPES[shape]
    cfg = Qwen3Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers or n, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, vocab_size=vocab, max_position_embeddings=8192,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg).to(dtype)
    return model.eval()


def ids_only(vocab: int):
    """What generation asks of a tokenizer, for token ids that are never read as text."""
    return SimpleNamespace(pad_token_id=0, eos_token_id=1, decode=lambda ids, **_: "")


def prompts(n: int, width: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, width), generator=g).tolist()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def host_syncs(fn, device) -> int:
    """Synchronizing CUDA calls made by ``fn`` (each a warning under sync debug mode)."""
    if device.type != "cuda":
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def decoding(model, device, scale: str) -> dict:
    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.modeling.generation import generate

    vocab = model.config.vocab_size
    tok = ids_only(vocab)
    big = scale != "tiny"
    rows, width, new = (16, 512, 256) if big else (4, 24, 16)
    results: dict = {"rows": rows, "prompt": width, "new_tokens": new, "runs": []}
    for loop in ("plain", "compiled"):
        cfg = GenerationConfig(max_new_tokens=new, temperature=0.0, ignore_eos=True, batch_size=rows,
                               compile_decoding=loop == "compiled")
        for label, batch in (("warm-up 512", prompts(rows, width, vocab)),
                             ("512", prompts(rows, width, vocab, 1)),
                             ("480", prompts(rows, width - width // 16, vocab, 2)),
                             ("544", prompts(rows, width + width // 16, vocab, 3)),
                             # a short last batch, padded to the others' rows: no new graph
                             ("512 + batch of 5", prompts(rows + 5, width, vocab, 4))):
            before = graphs()
            out, seconds = timed(lambda: generate(model, tok, batch, cfg, 0), device)
            results["runs"].append({"loop": loop, "batch": label, "seconds": round(seconds, 3),
                                    "tokens_per_s": round(len(batch) * new / seconds, 1),
                                    "new_graphs": graphs() - before})
            if label == "512":
                results.setdefault("tokens", {})[loop] = [g.token_ids for g in out]
        # the shapes of the timed "512" row, already compiled: no compile inside the count
        syncs = host_syncs(lambda: generate(model, tok, prompts(rows, width, vocab, 1), cfg, 0), device)
        results[f"host_syncs_per_token_{loop}"] = None if syncs < 0 else round(syncs / cfg.max_new_tokens, 3)
    tokens = results.pop("tokens")
    results["first_divergent_token"] = [next((i for i, (a, b) in enumerate(zip(p, c, strict=True)) if a != b), None)
                                        for p, c in zip(tokens["plain"], tokens["compiled"], strict=True)]
    # prefill of 16 x 2,048 (1 x 64 tiny): one position of logits is kept
    n, w = (16, 2048) if big else (2, 64)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    cfg = GenerationConfig(max_new_tokens=1, temperature=0.0, batch_size=n, compile_decoding=False)
    _, seconds = timed(lambda: generate(model, tok, prompts(n, w, vocab, 5), cfg, 0), device)
    results["prefill"] = {"rows": n, "width": w, "seconds": round(seconds, 3)}
    if device.type == "cuda":
        results["prefill"]["peak_gib_above_weights"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        results["prefill"]["full_logits_would_be_gib"] = round(n * w * vocab * 2 / 2**30, 2)
    return results


def loss_precision(model, device, scale: str) -> dict:
    """KL/clip/top-1 at real hidden states: bf16 logits (the old path) vs the fp32 logits rcsd uses."""
    from rcsd_cli.configs.groups import LossConfig
    from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
    from rcsd_cli.modeling.logprobs import upcast
    from rcsd_cli.train.chunked_loss import TeacherSide, chunked_distill_loss
    from rcsd_cli.train.losses import token_loss

    vocab = model.config.vocab_size
    n, p, c = (4, 256, 256) if scale != "tiny" else (2, 16, 16)
    student = prompts(n, p, vocab, 6)
    teacher = [s[: p // 2] + prompts(1, p, vocab, 7 + i)[0] for i, s in enumerate(student)]  # longer, different
    completions = prompts(n, c, vocab, 9)
    pb = build_pair_batch(student, teacher, completions, 0)
    head = model.get_output_embeddings()
    cfg = LossConfig()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        hs, ht = aligned_hidden(model, pb.student), aligned_hidden(model, pb.teacher)
        mask, targets = pb.mask.to(device), pb.targets.to(device)
        out = {}
        sums = chunked_distill_loss(hs, head, TeacherSide(ht, head), mask, targets, cfg)
        loss, kl, agree = sums.loss, sums.kl, sums.agree
        tokens = float(mask.sum())
        out["fp32_logits"] = {"loss": float(loss) / tokens, "kl": float(kl) / tokens, "top1": float(agree) / tokens}
        s_logits, t_logits = upcast(head(hs)), upcast(head(ht))  # bf16 logits, upcast afterwards
        terms = token_loss(s_logits, t_logits, targets, cfg)
        m = mask.float()
        out["bf16_logits"] = {"loss": float((terms.loss * m).sum()) / tokens,
                              "kl": float((terms.forward_kl * m).sum()) / tokens,
                              "clip_share": float((terms.clip_share * m).sum()) / tokens,
                              "top1": float(((s_logits.argmax(-1) == t_logits.argmax(-1)).float() * m).sum()) / tokens}
        out["fp32_logits"]["clip_share"] = float(sums.health["clip_share"]) / tokens  # summed on the device
        again = chunked_distill_loss(hs, head, TeacherSide(ht, head), mask, targets, cfg).loss
        out["same_loss_twice"] = bool(torch.equal(again, loss))
    return out


def step_memory(device, scale: str) -> list[dict]:
    """One bf16-mixed training step's peak CUDA memory against ``memory.estimate`` (prompt 512, 512 new)."""
    from peft import LoraConfig, get_peft_model

    from rcsd_cli.configs.groups import LossConfig
    from rcsd_cli.configs.train import TrainConfig
    from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
    from rcsd_cli.train.chunked_loss import TeacherSide, chunked_distill_loss
    from rcsd_cli.train.memory import estimate

    rows = []
    p, c, micro = (512, 512, 1) if scale != "tiny" else (16, 16, 1)
    for name, layers, lora in (("LoRA r16 + gradient checkpointing", None, True), ("full, 8 layers", 8, False)):
        if scale == "tiny":
            layers = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = qwen3(scale if scale == "tiny" else "qwen3-8b", layers, torch.bfloat16 if lora else torch.float32,
                      device.type)
        vocab = model.config.vocab_size
        if lora:
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-6)
        pb = build_pair_batch(prompts(micro, p, vocab, 1), prompts(micro, p + 64, vocab, 2),
                              prompts(micro, c, vocab, 3), 0)
        head = model.get_output_embeddings()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad(), (model.disable_adapter() if lora else torch.autocast(device.type, enabled=True)):
                ht = aligned_hidden(model, pb.teacher)
            hs = aligned_hidden(model, pb.student)
            weighted = chunked_distill_loss(hs, head, TeacherSide(ht, head), pb.mask.to(device),
                                            pb.targets.to(device), LossConfig()).weighted
        weighted.backward()
        opt.step()
        sync(device)
        seconds = time.perf_counter() - t0
        cfg = TrainConfig(model="x", precision="bf16-mixed", micro_batch_size=micro, batch_size=micro,
                          gradient_checkpointing=lora, teacher={"kind": "frozen"},
                          lora={"rank": 16 if lora else 0, "targets": "q_proj,v_proj"},
                          generation={"max_new_tokens": c, "batch_size": micro})
        config = (model.get_base_model() if lora else model).config
        plan = estimate(cfg, config, student_tokens=p + c, teacher_tokens=p + 64 + c, device_type=device.type)
        training_terms = {k: v for k, v in plan.items() if k not in ("rollout_kv_cache", "sampling_logits", "total",
                                                                     "teacher_copy", "runtime")}
        row = {"run": name, "layers": config.num_hidden_layers, "step_seconds": round(seconds, 2),
               "estimate_gib_without_rollout_and_runtime": round(sum(training_terms.values()), 2)}
        if device.type == "cuda":
            row["allocated_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["reserved_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        rows.append(row)
        del model, opt, params, hs, ht, weighted
    return rows


def sharded_worker(out: Path, device) -> dict:
    """tests/train/sharded_worker.py under torchrun (1 process on the GPU): reshard, push dtype, resume on the host."""
    from tests.conftest import make_tiny_llama  # noqa: F401 - only to check the tests are importable

    tok_dir = out / "tiny-model"
    rubrics = out / "rubrics.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = (f"from pathlib import Path; from tests.conftest import make_tiny_llama; "
              f"from rcsd_cli.models import default_model_dir; make_tiny_llama(Path({str(tok_dir)!r}), "
              f"default_model_dir())")
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if made.returncode != 0:
        return {"skipped": "no tokenizer to build the tiny model with: " + made.stderr.strip().splitlines()[-1]}
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)})
                            + "\n" for i in range(8)))
    subprocess.run([sys.executable, "-m", "rcsd_cli", "gen-rubrics", str(data), "-o", str(rubrics), "--generator",
                    "reference", "--overwrite"], check=True, capture_output=True, env=env)
    results = {}
    for offload in ("none", "full"):
        folder = out / f"sharded-{offload}"
        folder.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        worker = ROOT / "tests" / "train" / "sharded_worker.py"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               str(worker), str(tok_dir), str(rubrics), str(folder), offload],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "Error" in line and "ChildFailed" not in line]
            results[offload] = {"failed": errors[0] if errors else proc.stderr[-500:]}
            continue
        report = json.loads((folder / "rank0.json").read_text())
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        saved = torch.load(folder / "checkpoint-1" / "optimizer.pt", weights_only=True)  # no map_location: as saved
        report["optimizer_pt_devices"] = sorted({str(v.device) for s in saved["optimizer"]["state"].values()
                                                for v in s.values() if torch.is_tensor(v)})
        results[offload] = report
    return results


def release(model) -> None:
    """Drop what decoding keeps alive beyond ``del model``: the compiled step (it holds the bound forward), the
    static KV cache, and dynamo's and the CUDA graph trees' records (their memory pool holds the weights)."""
    model.__dict__.pop("_rcsd_decode_step", None)
    model.__dict__.pop("_rcsd_static_caches", None)
    torch._dynamo.reset()


def table(title: str, rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"\n{title}", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def quick(out: Path, scale: str = "qwen3-8b") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "scale": scale}
    t0 = time.perf_counter()
    model = qwen3(scale, device=device.type)
    report["decoding"] = decoding(model, device, scale)
    report["loss_precision"] = loss_precision(model, device, scale)
    release(model)  # the next measurement starts without this model's weights, caches and graphs
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report["step_memory"] = step_memory(device, scale)
    report["sharded"] = sharded_worker(out, device)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_quick.json").write_text(json.dumps(report, indent=1))
    print(f"device: {report['device']}, torch {report['torch']}, shapes {scale}, {report['seconds']} s")
    dec = report["decoding"]
    print(table(f"decoding {dec['rows']} x {dec['prompt']} + {dec['new_tokens']} new", dec["runs"]))
    print(table("host syncs per token, first divergent greedy token (compiled vs plain), prefill",
                [{"plain": dec["host_syncs_per_token_plain"], "compiled": dec["host_syncs_per_token_compiled"],
                  "first divergent": dec["first_divergent_token"], **dec["prefill"]}]))
    lp = report["loss_precision"]
    print(table("loss at real hidden states", [{"logits": k, **v} for k, v in lp.items() if isinstance(v, dict)]))
    print(table("one bf16-mixed step", report["step_memory"]))
    print(table("torchrun, 1 process", [{"offload": k, **{kk: vv for kk, vv in v.items() if kk != "rank"}}
                                        for k, v in report["sharded"].items() if isinstance(v, dict)]))
    return report
