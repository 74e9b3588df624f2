"""Problem files in every supported layout normalise to the same Problem/Criterion model."""

import csv

import pytest

from rcsd_cli.data.inputs import load_problems
from rcsd_cli.errors import RcsdError
from tests.conftest import ROOT, write_jsonl


def test_rar_layout_keeps_weights_and_signs(tmp_path):
    f = write_jsonl(tmp_path / "rar.jsonl", [{
        "question": "Why is the sky blue?", "reference_answer": "Rayleigh scattering.",
        "rubric": [{"title": "Names Rayleigh scattering", "description": "Mentions Rayleigh", "weight": 5},
                   {"title": "Blames reflection", "description": "Says the sea reflects", "weight": -2}]}])
    (row,) = load_problems(f)
    assert row.problem.reference_answer == "Rayleigh scattering."
    assert [(c.title, c.weight) for c in row.rubric] == [("Names Rayleigh scattering", 5), ("Blames reflection", -2)]


def test_healthbench_layout(tmp_path):
    f = write_jsonl(tmp_path / "hb.jsonl", [{
        "prompt_id": "hb-1",
        "prompt": [{"role": "user", "content": "I have a headache"}, {"role": "assistant", "content": "How long?"},
                   {"role": "user", "content": "Two days. What should I do?"}],
        "rubrics": [{"criterion": "Advises seeing a doctor if severe", "points": 6, "tags": ["axis:completeness"]},
                    {"criterion": "Prescribes opioids", "points": -8, "tags": ["axis:accuracy"]}]}])
    (row,) = load_problems(f)
    assert row.problem.id == "hb-1"
    assert row.problem.question.endswith("Two days. What should I do?")
    assert "assistant: How long?" in row.problem.question
    assert [c.weight for c in row.rubric] == [6, -8]
    assert row.rubric[0].tags == ["axis:completeness"]


@pytest.mark.parametrize("text_key,weight_key", [("description", "weight"), ("criterion", "points"),
                                                  ("criteria", "score")])
def test_rubrichub_variants(tmp_path, text_key, weight_key):
    f = write_jsonl(tmp_path / "hub.jsonl", [{"id": "h", "question": "Q?", "rubrics": [
        {text_key: "States the result clearly", weight_key: "3"}]}])
    (row,) = load_problems(f)
    assert row.rubric[0].weight == 3 and row.rubric[0].description == "States the result clearly"


def test_gpqa_csv_shuffles_choices_reproducibly(tmp_path):
    f = tmp_path / "gpqa.csv"
    cols = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
            "Explanation", "Record ID", "High-level domain"]
    with open(f, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for i in range(6):
            w.writerow({"Question": f"Made-up question {i}?\nLine two,\r\nwith \"quotes\".",
                        "Correct Answer": f"right {i}",
                        "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3",
                        "Explanation": "because", "Record ID": f"rec{i}", "High-level domain": "Physics"})
    rows = load_problems(f, shuffle_seed=3)
    again = load_problems(f, shuffle_seed=3)
    for r, r2 in zip(rows, again, strict=True):
        p = r.problem
        assert p.choices == r2.problem.choices and p.answer == r2.problem.answer
        assert p.choices["ABCD".index(p.answer)].startswith("right")
        assert p.metadata == {"shuffle_seed": 3, "High-level domain": "Physics"}
    assert len({r.problem.answer for r in rows}) > 1  # the gold is not always in the same slot
    # quoted multi-line fields keep their line breaks (GPQA questions span several lines)
    assert rows[0].problem.question == 'Made-up question 0?\nLine two,\r\nwith "quotes".'  # byte for byte


def test_plain_and_multiple_choice_layouts(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "2+2?", "answer": 4},
        {"question": "Pick", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"},
        {"question": "Pick", "choices": ["x", "y", "z"], "answer": 2},
        {"question": "Pick", "choices": ["x", "y", "z"], "answer": "z"}])
    rows = load_problems(f)
    assert rows[0].problem.answer == "4" and rows[0].problem.id == "p-0"
    assert [r.problem.answer for r in rows[1:]] == ["B", "C", "C"]
    assert rows[0].rubric is None


def test_parquet_and_csv_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "a", "question": "Q?", "answer": "1"}]), tmp_path / "p.parquet")
    assert load_problems(tmp_path / "p.parquet")[0].problem.id == "a"
    (tmp_path / "p.csv").write_text("id,question,answer\nb,What?,2\n")
    assert load_problems(tmp_path / "p.csv")[0].problem.answer == "2"


@pytest.mark.parametrize("content,message", [
    ('{"question": "ok"}\n{bad json\n', "p.jsonl:line 2: malformed JSON"),
    ('{"answer": "x"}\n', "p.jsonl:row 0: field 'question' is missing"),
    ('{"question": "q", "rubric": [{"title": "t", "weight": "ten"}]}\n', "field 'rubric.0.weight': 'ten'"),
    ('{"question": "q", "rubric": []}\n', "rubric has no criteria"),
    ('{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n', "row 1: duplicate id '1' (first at row 0)"),
    ("", "no rows"),
    ('{"question": "' + "x" * 40_000 + '"}\n', "over the 32000 limit"),
    ('{"question": 5}\n', "field 'question' must be text"),
])
def test_bad_input_messages_name_file_row_and_field(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(RcsdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_problems(f)


def test_binary_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\x89PNG\x00\x01\x02")
    with pytest.raises(RcsdError, match="binary file"):
        load_problems(f)


# --- the authors' data layouts (rcsd_train_reward.py of github carriegu0818/RCSD), one fixture file each

LAYOUTS = ROOT / "tests" / "fixtures" / "layouts"


def test_rubrichub_rows_as_the_authors_read_them():
    """source/query/answer/rubrics; criteria text under criterion|description, weight under points|weight|score,
    titles 'Criterion i' when missing; --source-filter keeps their science sources."""
    rows = load_problems(LAYOUTS / "rubrichub.parquet", sources={"RaR_science.jsonl", "MegeScience.jsonl"})
    assert [r.problem.source for r in rows] == ["RaR_science.jsonl", "MegeScience.jsonl"]
    ice = rows[0]
    assert ice.problem.question == "Why does ice float on liquid water?"
    assert ice.problem.answer.startswith("Ice is less dense")
    assert [(c.title, c.weight) for c in ice.rubric] == [("Criterion 1", 7), ("Criterion 2", 5), ("Criterion 3", -1)]
    assert [(c.title, c.weight) for c in rows[1].rubric] == [("Names the coulomb", 8)]
    assert len(load_problems(LAYOUTS / "rubrichub.parquet")) == 3
    with pytest.raises(RcsdError, match="no row's source is one of Nope"):
        load_problems(LAYOUTS / "rubrichub.parquet", sources={"Nope"})


@pytest.mark.parametrize("name,question,reference,answer", [
    ("rar_science.jsonl", "Which gas do plants take up for photosynthesis?",
     "Carbon dioxide, fixed in the Calvin cycle.", None),
    ("natural_reasoning.jsonl", "A ball is dropped from 20 m. How long until it lands (g = 10 m/s^2)?", "2 s", None),
    ("openthoughts_math.jsonl", "Compute 3^4 - 2^5.", "3^4 = 81 and 2^5 = 32, so the difference is \\boxed{49}.",
     None),
    ("verl_chat.jsonl", "What is 6 times 7?", "42", "42"),   # prompt as chat messages, reward_model.ground_truth
])
def test_the_authors_other_layouts(name, question, reference, answer):
    (row,) = load_problems(LAYOUTS / name)
    assert (row.problem.question, row.problem.reference_answer, row.problem.answer) == (question, reference, answer)
    if name == "rar_science.jsonl":
        assert [(c.title, c.weight) for c in row.rubric] == [("Names carbon dioxide", 5), ("Confuses with oxygen", -1)]
    if name == "verl_chat.jsonl":
        assert row.problem.source == "gsm8k"


def test_a_folder_of_shards_samples_per_file_as_the_authors_do(tmp_path):
    """Files shuffled by random.Random(seed), then from each the first rows up to an equal share of what is
    still missing: 3 files of 4 rows, 5 wanted -> 2 + 2 + 1."""
    import random

    for f in range(3):
        write_jsonl(tmp_path / f"shard{f}.jsonl", [{"id": f"s{f}-{i}", "question": f"Q{f}.{i}?"} for i in range(4)])
    rows = load_problems(tmp_path, sample_size=5, sample_seed=42)
    order = sorted(tmp_path.glob("*.jsonl"))
    random.Random(42).shuffle(order)
    expected = [f"{p.stem.replace('shard', 's')}-{i}" for p, k in zip(order, (2, 2, 1), strict=True) for i in range(k)]
    assert [r.problem.id for r in rows] == expected
    assert len(load_problems(tmp_path)) == 12  # a folder without --sample-size: every row of every file
    write_jsonl(tmp_path / "shard3.jsonl", [{"id": "s0-1", "question": "again?"}])
    with pytest.raises(RcsdError, match=r"shard3.jsonl:row 0: duplicate id 's0-1' \(first at .*shard0.jsonl:row 1\)"):
        load_problems(tmp_path)


def test_gen_rubrics_imports_rubrichub_science_rows(run_cli, tmp_path):
    from rcsd_cli.data.artifacts import read_artifact

    out = tmp_path / "r.parquet"
    run_cli("gen-rubrics", LAYOUTS / "rubrichub.parquet", "--source-filter", "RaR_science.jsonl,MegeScience.jsonl",
            "-o", out, check=True)  # every row carries a rubric: imported, no model loaded
    rows, meta = read_artifact(out, "rubrics")
    assert [r.source for r in rows] == ["RaR_science.jsonl", "MegeScience.jsonl"]
    assert {r.rubric_origin for r in rows} == {"imported"} and rows[0].rubric[0].title == "Criterion 1"
    assert meta["config"]["source_filter"] == "RaR_science.jsonl,MegeScience.jsonl"
