"""Opt-in tests on the real embedded default model (pytest -m slow): the demo and the Makefile."""

import json
import shutil
import subprocess

import pytest

from rcsd_cli.data.artifacts import read_artifact
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_small_run(run_cli, tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "-o", out, "--train-items", "6", "--eval-items", "8", "--steps", "2", "--batch-size", "3",
                   "--max-new-tokens", "48")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("rubrics", "samples", "scores", "eval_before", "eval_after"):
        assert (out / f"{name}.parquet").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["items"] == summary["after"]["items"] == 8
    train_ids = {r.id for r in read_artifact(out / "rubrics.parquet", "rubrics")[0]}
    eval_ids = {r.id for r in read_artifact(out / "eval_after.parquet", "eval")[0]}
    assert train_ids.isdisjoint(eval_ids)
    assert "after RCSD" in proc.stdout  # the table is a result: stdout
    last = proc.stdout.strip().splitlines()[-1]  # the console ends with the run's health
    assert last.startswith("training health, step 1 -> 2: student entropy") and "distinct-2" in last
    assert summary["health"] == last


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_examples_makefile(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["make", "-C", str(ROOT / "examples"), f"OUT={out}", "STEPS=2", "TOKENS=48"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    items, meta = read_artifact(out / "eval_after.parquet", "eval")
    assert len(items) == 8 and meta["summary"]["items"] == 8


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_authors_pipeline_end_to_end_small(tmp_path):
    """examples/paper-pipeline.mk SMALL=1: stage I (LoRA rubric writer) -> rubrics with the stage-I adapter ->
    stage II reason-first -> math (the authors' grader) and science eval, before and after, on the 135M model."""
    import os
    import sys

    out = tmp_path / "pipeline"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["make", "-f", str(ROOT / "examples" / "paper-pipeline.mk"), "SMALL=1", f"OUT={out}",
                           f"RCSD={sys.executable} -m rcsd_cli"], capture_output=True, text=True, timeout=1500,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage1 = json.loads((out / "stage1" / "rcsd_train_config.json").read_text())
    assert (stage1["task"], stage1["loss"]["kind"], stage1["loss"]["beta"], stage1["lora"]["rank"]) == (
        "rubric-generator", "jsd", 0.5, 8)
    assert (out / "stage1" / "adapter_config.json").is_file()
    rubrics, meta = read_artifact(out / "stage1-rubrics.parquet", "rubrics")
    assert len(rubrics) == 12 and meta["config"]["model"] == str(out / "stage1")  # written with the adapter
    stage2 = json.loads((out / "stage2" / "rcsd_train_config.json").read_text())
    assert stage2["teacher"]["context"] == "reason-first"
    for bench in ("gsm8k", "arc-easy"):
        for model in ("base", "stage2"):
            items, meta = read_artifact(out / f"eval-{model}-{bench}.parquet", "eval")
            assert len(items) == 6
            assert meta["config"]["grader"] == ("authors" if bench == "gsm8k" else "rcsd")
