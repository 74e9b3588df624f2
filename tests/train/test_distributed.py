"""Two CPU processes (torchrun or accelerate launch, gloo) train like one process on the same global batch.

Replicated and FSDP2-sharded runs are compared with a one-process run: same per-step loss and
gradient norm, same final weights, and checkpoints that resume on another number of processes.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rcsd_cli.data.artifacts import read_artifact
from tests.conftest import ROOT, assert_resumed, shared, weights_gap, write_jsonl

PROBLEMS = [{"id": f"p{i}", "question": f"What is {i} + {i}?", "choices": [str(2 * i), str(2 * i + 1)],
             "answer": "A"} for i in range(8)]


def train_args(model, rubrics, out, *extra):
    # Greedy rollouts make the comparison exact up to floating-point summation order. The default linear
    # lr decay makes the weights after a resume depend on the restored schedule as well as on AdamW's moments.
    return ["train", "--rubrics", str(rubrics), "-o", str(out), "--model", str(model), "--steps", "3",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "6", "--temperature", "0",
            "--lr", "1e-3", *extra]


# GRPO needs rollouts that differ within a group: sampled (seeded per item, so the same on any number of
# processes) from the answering model, whose answers vary, under the real rubric reward.
GRPO = ["--method", "grpo", "--group-size", "2", "--temperature", "1", "--top-k", "3"]


def torchrun(n, args, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "rcsd_cli", *args], capture_output=True, text=True, env=env, timeout=600)


def accelerate_launch(config, n, args, env):
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "--num_processes", str(n), "--main_process_port", "0", "-m", "rcsd_cli", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def launch_failure(proc) -> str:
    """What a failed launch says: each rank's first error lines (a rank that aborts is often not the last to
    write), then the end of the output."""
    ranks = {}
    for line in proc.stderr.splitlines():
        found = re.match(r"\[rank(\d+)\]:(.*)", line)
        if found and re.search(r"Error|error|terminate|Abort|what\(\)", found.group(2)):
            ranks.setdefault(found.group(1), []).append(found.group(2).strip())
    firsts = "\n".join(f"rank {r}: {' | '.join(lines[:3])}" for r, lines in sorted(ranks.items()))
    return f"{firsts}\n...\n{proc.stderr[-2000:]}"


def dist_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def rubrics(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist-data")
    write_jsonl(folder / "p.jsonl", PROBLEMS)
    out = folder / "r.parquet"
    proc = subprocess.run([sys.executable, "-m", "rcsd_cli", "gen-rubrics", str(folder / "p.jsonl"), "-o", str(out),
                           "--generator", "reference"], capture_output=True, text=True, env=dist_env())
    assert proc.returncode == 0, proc.stderr
    return shared("rubrics", out)


def assert_same_run(one_dir, two_dir, world_size=2):
    """Per-step loss within 1e-4 relative, gradient norm within 1e-3, final weights within 1e-5."""
    one, _ = read_artifact(one_dir / "metrics.parquet", "metrics")
    two, meta = read_artifact(two_dir / "metrics.parquet", "metrics")
    assert meta["world_size"] == world_size
    assert [m.completion_tokens for m in two] == [m.completion_tokens for m in one]
    for a, b in zip(one, two, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-7)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-3, abs=1e-7)
    assert weights_gap(one_dir, two_dir) < 1e-5
    return one, two


def resume_folder(checkpoint, folder):
    """A fresh output folder holding only ``checkpoint``, for ``--resume`` to pick up."""
    folder.mkdir()
    shutil.copytree(checkpoint, folder / checkpoint.name)
    return folder


@pytest.mark.parametrize("method", ["rcsd", "grpo"])
def test_two_processes_match_one(run_cli, tiny_model, answering_model, tmp_path, rubrics, method):
    model, extra = (answering_model, GRPO) if method == "grpo" else (tiny_model, [])
    run_cli(*train_args(model, rubrics, tmp_path / "one", *extra), check=True)
    p = torchrun(2, train_args(model, rubrics, tmp_path / "two", *extra, "--save-every", "2"), dist_env())
    assert p.returncode == 0, launch_failure(p)
    one, _ = assert_same_run(tmp_path / "one", tmp_path / "two")
    assert sorted(x.name for x in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-2"]
    assert weights_gap(tmp_path / "one", model) > 1e-4  # the update moved the weights
    if method == "grpo":  # ... driven by rewards that differ within a group
        assert one[0].grad_norm > 0 and 0 < one[0].reward < 1
    if method == "rcsd":
        # a checkpoint written by two processes resumes in one process
        resumed = resume_folder(tmp_path / "two" / "checkpoint-2", tmp_path / "resumed")
        p = run_cli(*train_args(model, rubrics, resumed, *extra, "--resume"), check=True)
        assert_resumed(p.stderr, resumed, tmp_path / "two", 2, rel=1e-4, atol=1e-5)


def test_fsdp_full_shard_matches_one_process_and_resumes_unsharded(run_cli, tiny_model, tmp_path, rubrics):
    # reason-first: the sharded teacher also generates (its analysis) before scoring
    extra = ["--teacher-context", "reason-first", "--analysis-max-new-tokens", "8"]  # sampled: seeds per item
    run_cli(*train_args(tiny_model, rubrics, tmp_path / "one", *extra), check=True)
    p = torchrun(2, train_args(tiny_model, rubrics, tmp_path / "fsdp", *extra, "--sharding", "full-shard",
                               "--save-every", "2"), dist_env())
    assert p.returncode == 0, launch_failure(p)
    assert "FSDP2 full-shard over 2 processes" in p.stderr
    assert_same_run(tmp_path / "one", tmp_path / "fsdp")
    # the sharded run's checkpoint holds full weights and a by-name optimizer state: one process resumes it
    resumed = resume_folder(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "resumed")
    p = run_cli(*train_args(tiny_model, rubrics, resumed, *extra, "--resume"), check=True)
    assert_resumed(p.stderr, resumed, tmp_path / "fsdp", 2, rel=1e-4, atol=1e-5)


@pytest.mark.slow  # ~20 s: one of the longest multi-process runs; CI runs -m slow
def test_replicated_checkpoint_resumes_sharded(run_cli, tiny_model, tmp_path, rubrics):
    live = ["--teacher", "live"]  # the sharded student is its own teacher
    run_cli(*train_args(tiny_model, rubrics, tmp_path / "one", *live, "--save-every", "2"), check=True)
    resumed = resume_folder(tmp_path / "one" / "checkpoint-2", tmp_path / "resumed")
    p = torchrun(2, train_args(tiny_model, rubrics, resumed, *live, "--sharding", "shard-grad-op", "--resume"),
                 dist_env())
    assert p.returncode == 0, launch_failure(p)
    assert_resumed(p.stderr, resumed, tmp_path / "one", 2, rel=1e-4, atol=1e-5)


@pytest.mark.slow  # two launcher runs of ~20 s; CI runs -m slow
@pytest.mark.parametrize("config, extra, expect", [
    ("fsdp.yaml", ["--teacher", "ema"], "FSDP2 full-shard over 2 processes"),
    ("multi_gpu.yaml", [], None),
])
def test_accelerate_launch_with_example_configs(run_cli, tiny_model, tmp_path, rubrics, config, extra, expect):
    # fsdp.yaml turns on accelerate's RAM-efficient loading (zeros on rank 1): rcsd must broadcast rank 0's weights
    run_cli(*train_args(tiny_model, rubrics, tmp_path / "one", *extra), check=True)
    p = accelerate_launch(ROOT / "examples" / "accelerate" / config, 2,
                          train_args(tiny_model, rubrics, tmp_path / "two", *extra), dist_env())
    assert p.returncode == 0, launch_failure(p)
    if expect:
        assert expect in p.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_fsdp_full_shard_with_lora_matches_one_process(run_cli, tiny_model, tmp_path, rubrics):
    """The published setting (LoRA + ZeRO-3 with CPU offload): adapters sharded with the frozen base, whose
    adapter-free forward is the frozen teacher; the saved adapter equals the one-process run's."""
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lora-targets", "all-linear"]
    run_cli(*train_args(tiny_model, rubrics, tmp_path / "one", *lora), check=True)
    p = torchrun(2, train_args(tiny_model, rubrics, tmp_path / "fsdp", *lora, "--sharding", "full-shard",
                               "--offload", "full", "--save-every", "2"), dist_env())
    assert p.returncode == 0, launch_failure(p)
    one, _ = read_artifact(tmp_path / "one" / "metrics.parquet", "metrics")
    two, _ = read_artifact(tmp_path / "fsdp" / "metrics.parquet", "metrics")
    for a, b in zip(one, two, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-7)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-3, abs=1e-7)
    a1 = load_file(tmp_path / "one" / "adapter_model.safetensors")
    a2 = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert sorted(a1) == sorted(a2) and any("lora_B" in k for k in a1)
    assert max((a1[k] - a2[k]).abs().max().item() for k in a1) < 1e-5
    assert max(a1[k].abs().max().item() for k in a1 if "lora_B" in k) > 0  # the adapter did train
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    resumed = resume_folder(ckpt, tmp_path / "resumed")  # resumes in one process, unsharded
    p = run_cli(*train_args(tiny_model, rubrics, resumed, *lora, "--resume"), check=True)
    assert_resumed(p.stderr, resumed, tmp_path / "fsdp", 2, name="adapter_model.safetensors", rel=1e-4, atol=1e-5)


@pytest.mark.slow  # ~20 s: one of the longest multi-process runs; CI runs -m slow
def test_fsdp_bf16_mixed_two_processes_match_one(run_cli, tiny_model, tmp_path, rubrics):
    """MixedPrecisionPolicy: bf16 gathers, fp32 gradient reduction, fp32 master shards in the checkpoint."""
    mixed = ["--precision", "bf16-mixed", "--save-every", "2"]
    runs = {}
    for n in (1, 2):
        p = torchrun(n, train_args(tiny_model, rubrics, tmp_path / f"n{n}", *mixed, "--sharding", "full-shard"),
                     dist_env())
        assert p.returncode == 0, launch_failure(p)
        runs[n], meta = read_artifact(tmp_path / f"n{n}" / "metrics.parquet", "metrics")
        assert meta["config"]["precision"] == "bf16-mixed"
    for a, b in zip(runs[1], runs[2], strict=True):  # bf16 compute: equal up to bf16 rounding
        assert b.completion_tokens == a.completion_tokens
        assert b.loss == pytest.approx(a.loss, rel=2e-2, abs=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=2e-2)
    assert runs[1][0].weights_moved > 0.99 and runs[2][0].weights_moved > 0.99
    ckpt = load_file(tmp_path / "n2" / "checkpoint-2" / "model.safetensors")
    assert {v.dtype for v in ckpt.values()} == {torch.float32}
    w0 = load_file(tiny_model / "model.safetensors")
    w1, w2 = load_file(tmp_path / "n1" / "model.safetensors"), load_file(tmp_path / "n2" / "model.safetensors")
    u1 = torch.cat([(w1[k] - w0[k]).reshape(-1) for k in sorted(w1)])  # what training changed, per run
    u2 = torch.cat([(w2[k] - w0[k]).reshape(-1) for k in sorted(w1)])
    assert torch.nn.functional.cosine_similarity(u1, u2, dim=0) > 0.99  # AdamW flips the sign of a few tiny grads


def test_offload_needs_a_sharded_run(run_cli, tiny_model, tmp_path, rubrics):
    p = run_cli(*train_args(tiny_model, rubrics, tmp_path / "bad", "--offload", "full"))
    assert p.returncode != 0 and "rcsd: error: --offload full needs a sharded run" in p.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "3"], "--sharding full-shard: --batch-size 3 must be a multiple of the 2 processes"),
    (["--lora-rank", "4", "--merge-lora"], "--merge-lora is not available with --sharding full-shard"),
])
def test_sharding_rejects_what_it_cannot_run(tiny_model, tmp_path, rubrics, extra, message):
    p = torchrun(2, train_args(tiny_model, rubrics, tmp_path / "bad", "--sharding", "full-shard", *extra), dist_env())
    assert p.returncode != 0
    assert f"rcsd: error: {message}" in p.stderr
    assert not (tmp_path / "bad" / "metrics.parquet").exists()


@pytest.mark.slow  # ~20 s: one of the longest multi-process runs; CI runs -m slow
def test_two_nodes_train_like_one_process(run_cli, tiny_model, tmp_path, rubrics):
    """Two ``torchrun --nnodes 2`` launchers (one process each, rendezvous on 127.0.0.1), each in its own
    working folder as on two machines: the result equals one process, and only global rank 0 writes."""
    import socket

    run_cli(*train_args(tiny_model, rubrics, tmp_path / "one", "--sharding", "full-shard"), check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "rcsd_cli", *train_args(tiny_model, rubrics, "out", "--sharding", "full-shard",
                                             "--save-every", "2")]
        nodes.append(subprocess.Popen(cmd, cwd=node, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "FSDP2 full-shard over 2 processes" in outputs[0][1]
    assert_same_run(tmp_path / "one", tmp_path / "node0" / "out", world_size=2)
    assert (tmp_path / "node0" / "out" / "checkpoint-2" / "model.safetensors").is_file()
    assert not (tmp_path / "node1" / "out").exists()  # the other node writes nothing
