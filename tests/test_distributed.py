"""Two CPU processes (torchrun, gloo) train like one process on the same global batch."""

import os
import subprocess
import sys

import pytest

from rcsd_cli.artifacts import read_artifact
from tests.conftest import ROOT, write_jsonl

PROBLEMS = [{"id": f"p{i}", "question": f"What is {i} + {i}?", "choices": [str(2 * i), str(2 * i + 1)],
             "answer": "A"} for i in range(8)]


def train_args(model, rubrics, out, *extra):
    # Greedy rollouts make the comparison exact up to floating-point summation order.
    return ["train", "--rubrics", str(rubrics), "-o", str(out), "--model", str(model), "--steps", "3",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "6", "--temperature", "0",
            "--lr", "1e-3", *extra]


def torchrun(n, args, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "rcsd_cli", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("method", ["rcsd", "grpo"])
def test_two_processes_match_one(run_cli, tiny_model, tmp_path, method):
    write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    rubrics = tmp_path / "r.parquet"
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", rubrics, "--generator", "reference", check=True)
    extra = ["--method", method] + (["--group-size", "2"] if method == "grpo" else [])
    run_cli(*train_args(tiny_model, rubrics, tmp_path / "one", *extra), check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = torchrun(2, train_args(tiny_model, rubrics, tmp_path / "two", *extra, "--save-every", "2"), env)
    assert p.returncode == 0, p.stderr[-3000:]
    one, _ = read_artifact(tmp_path / "one" / "metrics.parquet", "metrics")
    two, meta = read_artifact(tmp_path / "two" / "metrics.parquet", "metrics")
    assert meta["world_size"] == 2
    assert [m.completion_tokens for m in two] == [m.completion_tokens for m in one]
    for a, b in zip(one, two):  # stated tolerance: relative 1e-4 on loss, 1e-3 on the gradient norm
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-7)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-3, abs=1e-7)
    assert sorted(x.name for x in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-2"]
    if method == "rcsd":
        # a checkpoint written by two processes resumes in one process
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        import shutil

        shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed / "checkpoint-2")
        run_cli(*train_args(tiny_model, rubrics, resumed, *extra, "--resume"), check=True)
        again, _ = read_artifact(resumed / "metrics.parquet", "metrics")
        assert again[-1].loss == pytest.approx(two[-1].loss, rel=1e-4, abs=1e-7)
