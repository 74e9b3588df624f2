"""Parquet artifacts: validation, provenance metadata, atomic writes, resumable partial logs."""

import hashlib

import pyarrow.parquet as pq
import pytest

from rcsd_cli import __version__
from rcsd_cli.artifacts import PartialLog, read_artifact, read_metadata, write_artifact
from rcsd_cli.errors import RcsdError
from rcsd_cli.schemas import Check, Criterion, GenerationConfig, Rubric, Sample, SampleConfig


def rubric_row(i=0):
    return Rubric(id=f"q{i}", question="Q?", choices=["a", "b"], answer="A", metadata={"k": [1, 2]},
                  rubric=[Criterion(id="c1", title="Correct", weight=10, check=Check(kind="answer_equals", value="A")),
                          Criterion(id="c2", title="Pitfall", weight=-1)], rubric_origin="reference")


def test_roundtrip_with_provenance(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    cfg = SampleConfig(rubrics="r", model="m", generation=GenerationConfig())
    out = write_artifact(tmp_path / "r.parquet", "rubrics", [rubric_row(0), rubric_row(1)], stage="gen-rubrics",
                         config=cfg, model_id="m", inputs=[src])
    rows, meta = read_artifact(out, "rubrics")
    assert rows == [rubric_row(0), rubric_row(1)]
    assert meta["rcsd_version"] == __version__ and meta["kind"] == "rubrics" and meta["stage"] == "gen-rubrics"
    assert meta["config"]["model"] == "m" and meta["model"] == "m"
    assert meta["inputs"][str(src)] == hashlib.sha256(b"{}\n").hexdigest()
    assert pq.read_table(out).column("rubric").to_pylist()[0][0]["weight"] == 10


def test_never_overwrites_without_permission(tmp_path):
    out = write_artifact(tmp_path / "r.parquet", "rubrics", [rubric_row()], stage="t")
    before = out.read_bytes()
    with pytest.raises(RcsdError, match="already exists; pass --overwrite"):
        write_artifact(out, "rubrics", [rubric_row(5)], stage="t")
    assert out.read_bytes() == before
    write_artifact(out, "rubrics", [rubric_row(5)], stage="t", overwrite=True)
    assert read_artifact(out, "rubrics")[0][0].id == "q5"
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # no temporary files left


def test_wrong_kind_and_foreign_files(tmp_path):
    out = write_artifact(tmp_path / "r.parquet", "rubrics", [rubric_row()], stage="t")
    with pytest.raises(RcsdError, match="holds rubrics rows, expected a samples file"):
        read_artifact(out, "samples")
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign.parquet")
    assert read_metadata(tmp_path / "foreign.parquet") is None
    with pytest.raises(RcsdError, match="not an rcsd artifact"):
        read_artifact(tmp_path / "foreign.parquet", "rubrics")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RcsdError, match="not a readable Parquet file"):
        read_artifact(tmp_path / "junk.parquet", "rubrics")


def test_invalid_rows_are_refused_on_write(tmp_path):
    with pytest.raises(RcsdError, match="row 0: cannot write samples row"):
        write_artifact(tmp_path / "s.parquet", "samples", [{"id": "x"}], stage="t")
    assert not (tmp_path / "s.parquet").exists()


def sample(i):
    return Sample(id=f"p:{i}", problem_id="p", sample_index=i, prompt_token_ids=[1, 2], completion_token_ids=[3],
                  completion="c", finish_reason="stop")


def test_partial_log_resumes_and_refuses_other_settings(tmp_path):
    log = PartialLog(tmp_path / "s.parquet", Sample, {"seed": 0})
    log.append([sample(0), sample(1)])
    with open(log.path, "a") as f:
        f.write('{"id": "p:2", "probl')  # cut short by a kill
    assert [s.id for s in PartialLog(tmp_path / "s.parquet", Sample, {"seed": 0}).load()] == ["p:0", "p:1"]
    with pytest.raises(RcsdError, match="other settings"):
        PartialLog(tmp_path / "s.parquet", Sample, {"seed": 1}).load()
    assert PartialLog(tmp_path / "s.parquet", Sample, {"seed": 1}, fresh=True).load() == []
