"""``--overwrite`` replaces only what rcsd wrote; a folder with anything else is refused, untouched."""

from __future__ import annotations

import json

from rcsd_cli.data.artifacts import read_metadata, weights_sha256
from tests.conftest import write_jsonl


def _rubrics(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"q{i}", "question": f"{i}+1?", "answer": str(i + 1)}
                                              for i in range(3)])
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    return tmp_path / "r.parquet"


def test_train_overwrite_refuses_a_folder_with_user_files(run_cli, tmp_path, tiny_model):
    rubrics = _rubrics(run_cli, tmp_path)
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("my thesis")
    (work / "config.json").write_text("{}")  # a name rcsd also writes, but no rcsd run here
    p = run_cli("train", "--rubrics", rubrics, "--model", tiny_model, "-o", ".", "--overwrite", "--steps", "1",
                cwd=work)
    assert p.returncode == 2
    assert "also holds 'notes.txt'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert (work / "notes.txt").read_text() == "my thesis" and (work / "config.json").is_file()
    (work / "notes.txt").unlink()
    p = run_cli("train", "--rubrics", rubrics, "--model", tiny_model, "-o", ".", "--overwrite", "--steps", "1",
                cwd=work)
    assert p.returncode == 2 and "holds none (no rcsd provenance file)" in p.stderr  # rcsd-like names, no run
    assert (work / "config.json").is_file()


def test_train_overwrite_replaces_an_old_rcsd_run(run_cli, tmp_path, tiny_model):
    rubrics = _rubrics(run_cli, tmp_path)
    out = tmp_path / "model"
    args = ["--rubrics", rubrics, "--model", tiny_model, "-o", out, "--steps", "2", "--batch-size", "2",
            "--max-new-tokens", "4"]
    run_cli("train", *args, "--save-every", "1", check=True)
    assert (out / "checkpoint-1").is_dir()
    # provenance: a model card, no loader bookkeeping in config.json, versions and the base weights' hash
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model}" in card and "r.parquet" in card and "AutoModelForCausalLM" in card
    assert not [k for k in json.loads((out / "config.json").read_text()) if k.startswith("_name_or_path")]
    meta = read_metadata(out / "metrics.parquet")
    assert meta["versions"]["torch"] and meta["versions"]["transformers"] and meta["seed"] == 0
    assert meta["model_provenance"]["weights_sha256"] == weights_sha256(tiny_model)
    run_cli("train", *args[:-4], "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--overwrite",
            check=True)
    assert not (out / "checkpoint-1").exists() and (out / "metrics.parquet").is_file()
    (out / "mine.txt").write_text("x")
    p = run_cli("train", *args, "--overwrite")
    assert p.returncode == 2 and (out / "mine.txt").is_file() and (out / "model.safetensors").is_file()
