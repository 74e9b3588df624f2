"""Precision on CPU in the GPU's semantics: bf16-mixed keeps fp32 master weights that every step
moves, pure bf16 loses small updates (and says so), checkpoints keep the master, final weights are
saved in the dtype asked for."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rcsd_cli.configs.groups import LossConfig
from rcsd_cli.data.artifacts import read_artifact, write_artifact
from rcsd_cli.modeling import precision
from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.models import load_model
from rcsd_cli.train.checkpoints import prune_checkpoints
from rcsd_cli.train.chunked_loss import TeacherSide, chunked_distill_loss
from rcsd_cli.train.trainer import train
from tests.train.test_trainer import assert_resumes_exactly, config, rubric_rows

CPU = torch.device("cpu")


def test_vanishing_threshold_by_hand():
    # bf16: 1.0 has an ulp of 2^-7; an update under half of it (2^-8 = 1/256) rounds away
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    assert one + 0.9 / 256 == one and one + 1.1 / 256 != one
    assert precision.vanishing_below(5e-6) == 2.0 ** -9  # the binade above 256 * 5e-6 = 1.28e-3
    w = torch.tensor([1.2e-3, 1.9e-3, 2.0e-3, 0.5], dtype=torch.bfloat16)
    assert (w + 5e-6 != w).tolist() == [True, True, False, False]


def test_resolve_and_dtypes():
    assert precision.resolve(None, "cuda") == "bf16-mixed"
    assert precision.resolve(None, "cpu") == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"
    assert precision.param_dtype("bf16-mixed") == torch.float32
    assert precision.param_dtype("bf16") == torch.bfloat16
    assert precision.frozen_dtype("bf16-mixed") == torch.bfloat16 and precision.frozen_dtype("fp32") == torch.float32


def test_moved_share_counts_only_entries_with_a_gradient():
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.tensor([1.0] * 4 + [0.0] * 6)
    before = precision.snapshot([p])
    with torch.no_grad():
        p[:2] += 1  # two of the four with a gradient move; entries without one do not count
        p[8] += 1
    assert precision.moved_share([p], before) == pytest.approx(0.5)

    big = torch.nn.Parameter(torch.zeros(3 * 2**16 + 7))  # sampled: a strided subset, never out of bounds
    big.grad = torch.ones_like(big)
    before = precision.snapshot([big])
    with torch.no_grad():
        big[: big.numel() // 4] += 1
    assert precision.moved_share([big], before) == pytest.approx(0.25, abs=0.01)


def bf16_share_moved_by(weights: dict, step: float) -> float:
    """Share of entries whose bf16 value changes when moved by ``step``: AdamW's first update is about
    lr x sign(gradient) per entry, so in pure bf16 only entries below ~256 x lr in magnitude move."""
    moved = total = 0
    for w in weights.values():
        b = w.to(torch.bfloat16)
        moved += int(((b.float() - step).to(torch.bfloat16) != b).sum())
        total += b.numel()
    return moved / total


@pytest.mark.parametrize("choice", ["fp32", "bf16-mixed", "bf16"])
def test_one_step_at_the_papers_lr_moves_the_weights(tiny_model, tmp_path, choice):
    """The 1% trap: pure bf16 at lr 5e-6 leaves most weights where they were (the share bf16 rounding predicts
    from the initial weights, 7.8% for this model); a master copy moves every weight that has a gradient."""
    metrics = train(config(tiny_model, steps=1, lr=5e-6, precision=choice), rubric_rows(), tmp_path)
    if choice == "bf16":
        predicted = bf16_share_moved_by(load_file(tiny_model / "model.safetensors"), 5e-6)
        assert 0.02 < predicted < 0.2
        assert metrics[0].weights_moved == pytest.approx(predicted, rel=0.2)
    else:
        assert metrics[0].weights_moved > 0.99
    meta = read_artifact(tmp_path / "metrics.parquet", "metrics")[1]
    assert meta["config"]["precision"] == choice
    card = (tmp_path / "README.md").read_text()
    assert f"precision | `{choice}`" in card


def test_bf16_mixed_matches_fp32_loss_and_gradient(tiny_model):
    """The student under bf16-mixed: same loss and gradient as fp32 within bf16 rounding; master weights and
    gradients stay fp32. The teacher's hidden states are the same for both runs: its own bf16 forward moves
    them by bf16 rounding (0.4% here), which this tiny random model's KL amplifies to a 1% loss change that
    depends on the CPU's bf16 kernels (AVX2 vs AVX512-BF16), not on rcsd."""
    lm = load_model(str(tiny_model), device=CPU)
    teacher = load_model(str(tiny_model), device=CPU).model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pb = build_pair_batch([[1, 5, 6], [1, 9, 9, 9]], [[1, 2, 3, 5, 6], [1, 9]],
                          [[11, 12, 13, 14, 15], [21, 22, 23]], pad_id=0)
    head_s, head_t = lm.model.get_output_embeddings(), teacher.get_output_embeddings()
    t_hidden = aligned_hidden(teacher, pb.teacher).detach()
    with precision.compute("bf16-mixed", "cpu"):
        t_bf16 = aligned_hidden(teacher, pb.teacher).float()
    assert 0 < (t_bf16 - t_hidden).norm() / t_hidden.norm() < 0.01  # the teacher's own forward: bf16 rounding
    results = {}
    for choice in ("fp32", "bf16-mixed"):
        lm.model.zero_grad()
        with precision.compute(choice, "cpu"):
            sums = chunked_distill_loss(aligned_hidden(lm.model, pb.student), head_s, TeacherSide(t_hidden, head_t),
                                        pb.mask, pb.targets, LossConfig(clip=None))
        loss = sums.loss
        sums.weighted.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in lm.model.parameters()])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lm.model.parameters())
        results[choice] = (loss.item(), grad)
    (l32, g32), (lmix, gmix) = results["fp32"], results["bf16-mixed"]
    assert l32 > 0 and lmix == pytest.approx(l32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(g32, gmix, dim=0) > 0.995
    assert (gmix - g32).norm() / g32.norm() < 0.05


def test_bf16_mixed_holds_on_a_cpu_without_bf16_instructions(tiny_model):
    """The same check with torch's kernels limited to AVX2 (what an AVX2-only CPU runs: no AVX512-BF16)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           f"{__file__}::test_bf16_mixed_matches_fp32_loss_and_gradient"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_bf16_mixed_resumes_exactly_from_its_fp32_master(tiny_model, tmp_path, capsys):
    rows = rubric_rows()
    full = tmp_path / "full"
    cfg = config(tiny_model, steps=3, save_every=1, precision="bf16-mixed", save_dtype="fp32")
    full.mkdir()
    train(cfg, rows, full)
    ckpt = load_file(full / "checkpoint-1" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in ckpt.values())
    assert_resumes_exactly(cfg, rows, full, tmp_path / "resumed", 1, capsys)


def test_pure_bf16_warns_and_saves_in_the_asked_dtype(run_cli, tiny_model, tmp_path):
    rubrics = write_artifact(tmp_path / "r.parquet", "rubrics", rubric_rows(), stage="test")
    out = tmp_path / "bf16"
    proc = run_cli("train", "--rubrics", rubrics, "-o", out, "--model", tiny_model, "--steps", "1", "--batch-size",
                   "2", "--max-new-tokens", "6", "--precision", "bf16", "--save-dtype", "bf16", check=True)
    warning = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "--precision bf16: only" in warning[0] and "bf16-mixed" in warning[0]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    out = tmp_path / "mixed"  # auto: the dtype the model declares (the tiny model: float32); no warning
    proc = run_cli("train", "--rubrics", rubrics, "-o", out, "--model", tiny_model, "--steps", "1", "--batch-size",
                   "2", "--max-new-tokens", "6", "--precision", "bf16-mixed", "--attn-implementation", "eager",
                   check=True)
    assert "warning:" not in proc.stderr
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    card = (out / "README.md").read_text()
    assert "precision | `bf16-mixed`" in card and "attention `eager`" in card


def test_attn_implementation_reaches_the_model(tiny_model):
    for kind in ("eager", "sdpa"):
        assert load_model(str(tiny_model), device=CPU, attn_implementation=kind).model.config._attn_implementation \
            == kind


def test_save_total_limit_keeps_the_newest_and_the_resumed_one(tmp_path):
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-6.tmp").mkdir()  # being written: not a checkpoint yet
    deleted = prune_checkpoints(tmp_path, 2, keep=tmp_path / "checkpoint-1")
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4", "checkpoint-5",
                                                          "checkpoint-6.tmp"]
    assert prune_checkpoints(tmp_path, None, keep=None) == []


def test_save_total_limit_in_a_run_then_resume(tiny_model, tmp_path):
    rows = rubric_rows()
    cfg = config(tiny_model, steps=5, save_every=1, save_total_limit=2, lr_schedule="constant")
    train(cfg.model_copy(update={"steps": 3}), rows, tmp_path)  # a run stopped after step 3
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    train(cfg, rows, tmp_path, resume=True)  # resumes from checkpoint-2: kept while newer ones come and go
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3",
                                                                     "checkpoint-4"]
    straight = tmp_path.parent / "straight"
    straight.mkdir()
    train(cfg, rows, straight)
    a, b = load_file(straight / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three 30-step runs beside an uninterrupted one
def test_kill_nine_twice_and_mid_write_then_resume_is_bit_identical(tiny_model, tmp_path):
    """Real SIGKILLs of a running ``rcsd train`` (with --save-total-limit), plus the half-written
    ``.tmp`` folder a kill during a save leaves: the resumed run ends on the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    rubrics = write_artifact(tmp_path / "r.parquet", "rubrics", rubric_rows(), stage="test")
    args = ["train", "--rubrics", rubrics, "--model", tiny_model, "--steps", "30", "--batch-size", "3",
            "--max-new-tokens", "12", "--lr", "1e-3", "--save-every", "5", "--save-total-limit", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "rcsd_cli", *map(str, args), "-o", str(out), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill_after(proc, checkpoint):
        deadline = time.monotonic() + 300
        while not (checkpoint / "trainer_state.json").is_file():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None  # still training when killed
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    straight = start(tmp_path / "straight")
    killed = tmp_path / "killed"
    kill_after(start(killed), killed / "checkpoint-10")
    kill_after(start(killed, "--resume"), killed / "checkpoint-20")
    newest = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*") if "." not in p.name)
    half = killed / f"checkpoint-{newest + 5}.tmp"  # what a kill in the middle of the next save leaves
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    final = start(killed, "--resume")
    assert final.wait(timeout=600) == 0, final.stderr.read()[-2000:]
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in killed.glob("checkpoint-*"))
    assert len(kept) <= 3 and not any(name.endswith(".tmp") for name in kept), kept


def test_lora_under_bf16_mixed_keeps_a_bf16_base_and_fp32_adapters(tiny_model, tmp_path):
    """As HF Trainer + peft with bf16=True: the frozen base needs no master copy; the adapters are fp32 and move."""
    metrics = train(config(tiny_model, steps=1, lr=5e-6, precision="bf16-mixed", lora_rank=4, lora_dropout=0.0),
                    rubric_rows(), tmp_path)
    assert metrics[0].weights_moved >= 0.99  # lora_B (lora_A gets no gradient while B is zero)
    assert {v.dtype for v in load_file(tmp_path / "adapter_model.safetensors").values()} == {torch.float32}
    assert "weights in bfloat16, adapters in float32" in (tmp_path / "README.md").read_text()
