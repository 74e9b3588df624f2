"""Parquet artifacts: validation, provenance metadata, atomic writes, resumable partial logs."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rcsd_cli import __version__
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.sample import SampleConfig
from rcsd_cli.data.artifacts import PartialLog, read_artifact, read_metadata, write_artifact
from rcsd_cli.data.rows import Check, Criterion, Rubric, Sample
from rcsd_cli.errors import RcsdError


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


def _score(i, topk):
    from rcsd_cli.data.rows import Score

    return Score(sample_id=f"s{i}", problem_id="q", verdicts=[], score=None, points_met=0.0, points_possible=1.0,
                 n_unjudged=0, extracted_answer=None, correct=None,
                 teacher_topk_ids=[[1, 2]] if topk else None, teacher_topk_logprobs=[[-0.1, -2.0]] if topk else None)


def test_sparse_and_full_files_share_one_schema_and_load_together(tmp_path):
    import pyarrow.dataset as ds
    from datasets import load_dataset

    from rcsd_cli.data.artifacts import arrow_schema
    from rcsd_cli.data.rows import EvalItem, Score

    sparse = write_artifact(tmp_path / "a.parquet", "scores", [_score(0, False)], stage="score")
    full = write_artifact(tmp_path / "b.parquet", "scores", [_score(1, True)], stage="score")
    empty = write_artifact(tmp_path / "c.parquet", "scores", [], stage="score")
    schemas = [pq.read_schema(p).remove_metadata() for p in (sparse, full, empty)]
    assert schemas[0] == schemas[1] == schemas[2] == arrow_schema(Score)
    topk = schemas[0].field("teacher_topk_ids").type
    assert pa.types.is_list(topk) and pa.types.is_list(topk.value_type) and topk.value_type.value_type == pa.int64()
    table = ds.dataset([str(sparse), str(full)], format="parquet").to_table()
    assert table.num_rows == 2 and table.column("teacher_topk_ids").to_pylist() == [None, [[1, 2]]]
    both = load_dataset("parquet", data_files=[str(sparse), str(full)], split="train")
    assert both["sample_id"] == ["s0", "s1"]
    item = EvalItem(id="i", bench="b", question="q", choices=None, gold=None, completions=["x"],
                    completion_tokens=[1], predictions=[None], correct=[None], accuracy=None, rubric_scores=[None],
                    rubric_score=None)
    out = write_artifact(tmp_path / "e.parquet", "eval", [item], stage="eval")
    assert pq.read_schema(out).field("predictions").type.value_type == pa.string()
    assert read_artifact(out, "eval")[0] == [item]


def test_files_from_the_last_release_still_read(tmp_path):
    """The previous release let Arrow guess types (a null-typed column when every value was None)."""
    from rcsd_cli.data.artifacts import META_KEY, build_metadata

    rec = _score(0, False).model_dump(mode="json")
    table = pa.Table.from_pylist([rec])
    assert pa.types.is_null(table.schema.field("teacher_topk_ids").type)
    table = table.replace_schema_metadata({META_KEY: json.dumps(build_metadata("scores", "score", None, None))})
    pq.write_table(table, tmp_path / "old.parquet")
    rows, _ = read_artifact(tmp_path / "old.parquet", "scores")
    assert rows == [_score(0, False)]
