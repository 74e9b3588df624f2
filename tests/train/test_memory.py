"""``train --dry-run``'s memory plan: exact parameter counts by hand, and within 25% of the peak RSS
that real training runs measure on CPU."""

import re

import pytest
from transformers import AutoConfig

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact, write_artifact
from rcsd_cli.data.options import with_options
from rcsd_cli.train.memory import GIB, estimate
from tests.conftest import make_tiny_llama
from tests.train.test_trainer import rubric_rows


def test_terms_by_hand(tiny_model):
    """The tiny Llama: vocab 49152 x hidden 32 tied embedding + 2 layers of q,k,v,o (32x32, 32x16 x2, 32x32)
    and an MLP (3 x 32x64) and norms."""
    mc = AutoConfig.from_pretrained(tiny_model)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    n = mc.vocab_size * 32 + 2 * per_layer + 32
    cfg = TrainConfig(model=str(tiny_model), precision="fp32")
    plan = estimate(cfg, mc, student_tokens=100, teacher_tokens=200)
    assert plan["weights"] * GIB == pytest.approx(4 * n)
    assert plan["adamw_moments"] * GIB == pytest.approx(8 * n) and plan["teacher_copy"] * GIB == pytest.approx(4 * n)
    mixed = estimate(cfg.model_copy(update={"precision": "bf16-mixed"}), mc, student_tokens=100, teacher_tokens=200)
    assert mixed["weights"] == plan["weights"] and mixed["teacher_copy"] == plan["teacher_copy"] / 2
    lora = estimate(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": 4})}), mc, student_tokens=100,
                    teacher_tokens=200)
    # r 4 on q_proj (32 -> 32) and v_proj (32 -> 16) of 2 layers, fp32 adapters; no teacher copy
    assert lora["gradients"] * GIB == pytest.approx(4 * 2 * 4 * ((32 + 32) + (32 + 16)))
    assert lora["teacher_copy"] == 0
    sharded = estimate(with_options(cfg, sharding="full-shard"), mc, student_tokens=100, teacher_tokens=200,
                       world=4)
    assert sharded["weights"] == pytest.approx(plan["weights"] / 4)
    ckpt = estimate(cfg.model_copy(update={"gradient_checkpointing": True}), mc, student_tokens=100,
                    teacher_tokens=200)
    assert ckpt["activations"] < plan["activations"]
    offloaded = estimate(with_options(cfg, sharding="full-shard", offload="full"), mc, student_tokens=100,
                         teacher_tokens=200, world=2, device_type="cuda", device_gib=80)
    assert "weights" not in offloaded and offloaded["host_weights"] == pytest.approx(plan["weights"] / 2)
    assert offloaded["total"] == pytest.approx(sum(v for k, v in offloaded.items()
                                                   if k not in ("total",) and not k.startswith("host_")))
    # the rollout's KV cache: 4 rows (the step's prompts) x 100 tokens x 2 layers x kv width 16, fp32 keys and values
    assert plan["rollout_kv_cache"] * GIB == pytest.approx(4 * 100 * 2 * 16 * 8)
    # bf16-mixed over fp32 weights: fp32 rotary keys, bf16 values (plain loop); the compiled loop's static cache
    # stores both in autocast's bf16 and pads the prompt (60 tokens here) to its bucket (64)
    assert mixed["rollout_kv_cache"] * GIB == pytest.approx(4 * 100 * 2 * 16 * 6)
    compiled = estimate(cfg.model_copy(update={"precision": "bf16-mixed", "generation": cfg.generation.model_copy(
        update={"compile_decoding": True, "max_new_tokens": 40})}), mc, student_tokens=100, teacher_tokens=200)
    assert compiled["rollout_kv_cache"] * GIB == pytest.approx(4 * (64 + 40) * 2 * 16 * 4)
    # autocast keeps a bf16 copy of the weights it casts (not with LoRA's bf16 base, not under FSDP's policy)
    assert mixed["autocast_weight_copies"] * GIB == pytest.approx(2 * n) and plan["autocast_weight_copies"] == 0
    assert lora["autocast_weight_copies"] == 0
    # sharded HF generation gathers the rest of the model on each process
    assert sharded["gathered_for_generation"] * GIB == pytest.approx(4 * n * 3 / 4)
    assert "gathered_for_generation" not in plan and "gathered_root_unit" not in plan
    n_root = mc.vocab_size * 32 + 32  # tied embedding/head and the final norm, gathered; its full fp32 gradient
    assert sharded["gathered_root_unit"] * GIB == pytest.approx(4 * n_root * 3 / 4 + 4 * n_root)
    assert sharded["load_before_sharding"] * GIB == pytest.approx((4 * n + 4 * n) * 3 / 4)  # student + teacher
    assert plan["sampling_logits"] * GIB == pytest.approx(4 * mc.vocab_size * (4 + 16 + 8))


@pytest.mark.slow  # trains a 44M-parameter model twice per case
@pytest.mark.parametrize("extra", [
    [],  # full fine-tuning in fp32 with a frozen teacher copy
    ["--lora-rank", "16", "--lora-targets", "all-linear", "--gradient-checkpointing", "--precision", "bf16-mixed"],
])
def test_estimate_within_a_quarter_of_measured_peak_rss(run_cli, tmp_path, tokenizer_dir, extra):
    model = make_tiny_llama(tmp_path / "m", tokenizer_dir, hidden=512, heads=8, layers=8)  # ~44M parameters
    rubrics = write_artifact(tmp_path / "r.parquet", "rubrics", rubric_rows(), stage="test")
    args = ["train", "--rubrics", rubrics, "--model", model, "--steps", "2", "--batch-size", "4",
            "--micro-batch-size", "4", "--max-new-tokens", "64", *extra]
    shown = run_cli(*args, "--dry-run", check=True).stdout
    total = float(re.search(r"^total\s+([\d.]+) GiB per device$", shown, re.M).group(1))
    run_cli(*args, "-o", tmp_path / "out", check=True)
    metrics, _ = read_artifact(tmp_path / "out" / "metrics.parquet", "metrics")
    measured = max(m.peak_rss_gib for m in metrics)
    assert total == pytest.approx(measured, rel=0.25), (total, measured, shown)


@pytest.mark.slow  # two sharded processes train a 44M-parameter model
def test_estimate_holds_for_two_sharded_processes_generating_gathered(run_cli, tmp_path, tokenizer_dir):
    """full-shard over 2 gloo processes, HF rollouts: each process gathers the whole model to generate."""
    import subprocess
    import sys

    from tests.train.test_distributed import dist_env

    model = make_tiny_llama(tmp_path / "m", tokenizer_dir, hidden=512, heads=8, layers=8)
    rubrics = write_artifact(tmp_path / "r.parquet", "rubrics", rubric_rows(), stage="test")
    args = ["train", "--rubrics", str(rubrics), "--model", str(model), "--steps", "2", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-new-tokens", "64", "--sharding", "full-shard"]
    env = {**dist_env(), "WORLD_SIZE": "2"}  # the plan per process of a 2-process launch
    shown = subprocess.run([sys.executable, "-m", "rcsd_cli", *args, "--dry-run"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert re.search(r"^gathered_for_generation\s+[\d.]+ GiB$", shown.stdout, re.M), shown.stdout
    total = float(re.search(r"^total\s+([\d.]+) GiB per device$", shown.stdout, re.M).group(1))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "rcsd_cli", *args, "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          env={k: v for k, v in dist_env().items() if k != "WORLD_SIZE"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, _ = read_artifact(tmp_path / "out" / "metrics.parquet", "metrics")
    measured = max(m.peak_rss_gib for m in metrics)
    assert total == pytest.approx(measured, rel=0.25), (total, measured, shown.stdout)
