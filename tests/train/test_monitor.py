"""A run that watches itself: held-out evaluation during training, --keep-best, --stop-when."""

import json

import pytest

from rcsd_cli.configs.train import TrainConfig, parse_stop_rule
from rcsd_cli.data.artifacts import read_artifact, read_metadata


@pytest.fixture
def arc_rubrics(run_cli, tmp_path):
    """The first 4 items of ARC-Easy's seeded shuffle, as gen-rubrics takes them for training."""
    out = tmp_path / "r.parquet"
    run_cli("gen-rubrics", "arc-easy", "--generator", "reference", "--limit", "4", "-o", out, check=True)
    return out


def test_stop_rules_parse_and_unknown_metrics_are_refused():
    assert parse_stop_rule("eval_accuracy<0.5*start") == ("eval_accuracy", "<", 0.5, True)
    assert parse_stop_rule(" student_entropy > 2e-1 ") == ("student_entropy", ">", 0.2, False)
    with pytest.raises(ValueError, match="not METRIC<VALUE"):
        parse_stop_rule("accuracy <= 3")
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        TrainConfig(rubrics="r", stop_when="accuracy<3")


def test_held_out_items_that_are_training_items_are_refused(run_cli, arc_rubrics, tiny_model, tmp_path):
    common = ["train", "--rubrics", arc_rubrics, "--model", tiny_model, "--eval-every", "1", "--eval-bench",
              "arc-easy", "--eval-limit", "10", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4"]
    p = run_cli(*common, "-o", tmp_path / "a")
    assert p.returncode == 2 and "4 of 10 held-out items are training items" in p.stderr
    assert "--eval-offset" in p.stderr and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_eval_during_training_keeps_the_best_weights(run_cli, arc_rubrics, tiny_model, tmp_path):
    out = tmp_path / "m"
    p = run_cli("train", "--rubrics", arc_rubrics, "--model", tiny_model, "--eval-every", "1", "--eval-bench",
                "arc-easy", "--eval-limit", "6", "--eval-offset", "4", "--keep-best", "eval_gold_logprob",
                "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--lr", "1e-3", "-o", out, check=True)
    rows, meta = read_artifact(out / "metrics.parquet", "metrics")
    assert all(0 <= r.eval_accuracy <= 1 and r.eval_gold_logprob < 0 and r.eval_seconds > 0 for r in rows)
    start = meta["eval_start"]
    assert start["items"] == 6 and start["eval_gold_logprob"] < 0 and "before training" in p.stderr
    best = meta["best"]
    assert best["value"] == max(r.eval_gold_logprob for r in rows)
    assert best["step"] == max(rows, key=lambda r: r.eval_gold_logprob).step
    assert (out / "best" / "model.safetensors").is_file()
    assert f"eval_gold_logprob {best['value']:.4g} at step {best['step']}" in (out / "README.md").read_text()


def test_a_collapsing_run_stops_with_one_line(run_cli, arc_rubrics, tiny_model, tmp_path):
    """SFT at a learning rate far too high collapses the student's distribution onto the reference tokens; the
    rule stops the run when its entropy falls under half its start."""
    out = tmp_path / "m"
    p = run_cli("train", "--rubrics", arc_rubrics, "--model", tiny_model, "--method", "sft", "--lr", "0.5",
                "--steps", "8", "--batch-size", "2", "--stop-when", "student_entropy<0.5*start", "-o", out,
                check=True)
    rows, meta = read_artifact(out / "metrics.parquet", "metrics")
    stopped = meta["stopped"]
    assert len(rows) == stopped["step"] < 8
    assert rows[-1].student_entropy < 0.5 * rows[0].student_entropy <= rows[-2].student_entropy
    line = " ".join(p.stderr.split())
    assert f"stopping after step {stopped['step']}: student_entropy" in line and "Traceback" not in line
    assert (out / "model.safetensors").is_file()  # the final weights are written as usual
    assert json.loads((out / "rcsd_train_config.json").read_text())["monitor"]["stop_when"]
    assert read_metadata(out / "metrics.parquet")["stopped"]["rule"] == "student_entropy<0.5*start"
