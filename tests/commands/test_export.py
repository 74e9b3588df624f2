"""verl export: the layout verl reads, and the reward function grading against the rubric."""

import json

import pyarrow.parquet as pq
from datasets import Dataset

from rcsd_cli.verl_reward import compute_score
from tests.conftest import MC_ROWS, write_jsonl


def test_export_verl_layout_and_reward(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    run_cli("export", "--format", "verl", tmp_path / "r.parquet", "-o", tmp_path / "verl.parquet", check=True)
    ds = Dataset.from_parquet(str(tmp_path / "verl.parquet"))
    assert set(ds.column_names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and "Carbon dioxide" in row["prompt"][0]["content"]
    assert row["reward_model"]["style"] == "rule" and row["extra_info"]["index"] == 0
    assert "Reference answer" in row["extra_info"]["teacher_prompt"] or "rubric" in row["extra_info"]["teacher_prompt"]
    gt = row["reward_model"]["ground_truth"]
    assert json.loads(gt)["answer"] == "B"
    good = compute_score(row["data_source"], "CO2 is taken in.\nAnswer: B", gt, row["extra_info"])
    wrong = compute_score(row["data_source"], "Answer: A", gt, row["extra_info"])
    assert good == 1.0 and wrong == (3 + 2 - 1) / 15
    numeric = ds[2]
    assert compute_score(numeric["data_source"], "Answer: 144", numeric["reward_model"]["ground_truth"]) == 1.0
    assert pq.read_schema(tmp_path / "verl.parquet").metadata[b"rcsd"]
