"""``train --dry-run``'s memory plan: exact parameter counts by hand, and within 25% of the peak RSS
that real training runs measure on CPU."""

import re

import pytest
from transformers import AutoConfig

from rcsd_cli.data.artifacts import read_artifact, write_artifact
from rcsd_cli.data.schemas import TrainConfig
from rcsd_cli.train.memory import GIB, estimate
from tests.conftest import make_tiny_llama
from tests.test_trainer import rubric_rows


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
    sharded = estimate(cfg.model_copy(update={"sharding": "full-shard"}), mc, student_tokens=100, teacher_tokens=200,
                       world=4)
    assert sharded["weights"] == pytest.approx(plan["weights"] / 4)
    ckpt = estimate(cfg.model_copy(update={"gradient_checkpointing": True}), mc, student_tokens=100,
                    teacher_tokens=200)
    assert ckpt["activations"] < plan["activations"]
    offloaded = estimate(cfg.model_copy(update={"sharding": "full-shard", "offload": "full"}), mc, student_tokens=100,
                         teacher_tokens=200, world=2, device_type="cuda", device_gib=80)
    assert "weights" not in offloaded and offloaded["host_weights"] == pytest.approx(plan["weights"] / 2)
    assert offloaded["total"] == pytest.approx(sum(v for k, v in offloaded.items()
                                                   if k not in ("total",) and not k.startswith("host_")))


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
