"""Parsing and validation of LLM rubric designer output."""

import json

import pytest

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.rubrics.rubric_gen import InvalidRubric, parse_rubric_output
from tests.conftest import ROOT, write_jsonl

GOOD = [{"title": "Correct final answer", "description": "Gives B as the answer.", "weight": 10},
        {"title": "Explains photosynthesis", "description": "Mentions CO2 uptake.", "weight": 4},
        {"title": "Confuses gases", "description": "Says plants absorb oxygen.", "weight": -1}]


def test_parses_first_array_after_think():
    text = "<think>maybe [1, 2]</think>Here you go:\n" + json.dumps(GOOD) + "\n[ignored]"
    crit = parse_rubric_output(text)
    assert [c.weight for c in crit] == [10, 4, -1]
    assert [c.tags for c in crit] == [["essential"], ["important"], ["pitfall"]]


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: r[:2], "2 criteria"),
    (lambda r: [r[0] | {"weight": 11}] + r[1:], "weight"),
    (lambda r: [r[0] | {"weight": "ten"}] + r[1:], "weight"),
    (lambda r: [r[0] | {"title": "Correct"}] + r[1:], "title"),
    (lambda r: [r[0] | {"description": "word " * 41}] + r[1:], "description"),
    (lambda r: [r[0], r[1], r[1]], "pitfall"),
    (lambda r: [r[1], r[1], r[2]], "essential"),
])
def test_invalid_rubrics_are_rejected_with_a_reason(mutate, reason):
    with pytest.raises(InvalidRubric, match=reason):
        parse_rubric_output(json.dumps(mutate([dict(x) for x in GOOD])))


def test_no_array():
    with pytest.raises(InvalidRubric, match="no JSON array"):
        parse_rubric_output("I cannot write a rubric.")


# --- --prompt-style paper: the authors' designer (RubricPromptBuilder, rcsd_train_reward.py) and their reading

GOLDEN = ROOT / "tests" / "golden" / "authors_rubric_designer.txt"
PHOTONS = {"id": "bulb", "question": "A 100-W bulb is 3% efficient. How many visible photons per second does it emit "
           "(take 5000 angstrom)?", "reference_answer": "About 7.5e18 photons per second: 3 W of light, each photon "
           "carries hc/λ ≈ 4.0e-19 J."}


def test_paper_designer_message_is_the_authors_text():
    """GOLDEN holds RubricPromptBuilder().build(question, reference) run from the authors' file."""
    from rcsd_cli.data.rows import Problem
    from rcsd_cli.rubrics.prompts import rubric_designer_message

    problem = Problem(**PHOTONS)
    assert rubric_designer_message(problem, "paper") == GOLDEN.read_text(encoding="utf-8")


def test_paper_rule_reads_what_the_authors_accept():
    text = ("<think>draft [1]</think>" + json.dumps([
        {"description": "Uses the 3% efficiency.", "weight": 5},           # no title: Criterion 1
        "States the photon energy.",                                        # a string: weight 1
        {"title": "Wrong power", "criterion": "Uses 100 W of light.", "points": -1},
    ]))
    crit = parse_rubric_output(text, "paper")
    assert [(c.title, c.description, c.weight) for c in crit] == [
        ("Criterion 1", "Uses the 3% efficiency.", 5), ("Criterion 2", "States the photon energy.", 1),
        ("Wrong power", "Uses 100 W of light.", -1)]
    # fewer than 3 criteria, no pitfall, 0 weights: fine by the authors' rule, refused by rcsd's short format
    short_ok = json.dumps([{"title": "Uses efficiency", "description": "x", "weight": 0}])
    assert parse_rubric_output(short_ok, "paper")[0].weight == 0
    with pytest.raises(InvalidRubric):
        parse_rubric_output(short_ok, "short")
    # a stray opening tag is deleted, its content kept (theirs), unlike rcsd's short rule
    assert parse_rubric_output("<think>" + json.dumps(["Correct answer."]), "paper")[0].weight == 1


@pytest.mark.parametrize("reply,reason", [
    ("[]", "empty JSON array"),
    ("[\"\"]", "neither an object nor a non-empty string"),
    ("no array here", "no JSON array"),
    ("[{}]", "valid by the authors' rule, refused by rcsd's schema: criterion 0 has no description"),
    ('[{"description": "x", "weight": "heavy"}]', "refused by rcsd's schema: criterion 0: weight 'heavy'"),
])
def test_paper_rule_rejections(reply, reason):
    with pytest.raises(InvalidRubric, match=reason):
        parse_rubric_output(reply, "paper")


def test_gen_rubrics_paper_style_end_to_end(run_cli, tiny_model, tmp_path):
    """Against a scripted OpenAI-compatible server: the designer prompt sent is the authors' text, a reply their
    rule accepts but rcsd's schema refuses is recorded, counted and asked again."""
    from tests.backends.test_faults import FakeServer

    data = write_jsonl(tmp_path / "q.jsonl", [PHOTONS])
    p = run_cli("gen-rubrics", data, "--model", tiny_model, "--dry-run", "-o", tmp_path / "dry.parquet", check=True)
    shown = p.stdout.split("===== designer_prompt =====\n")[1]
    assert GOLDEN.read_text(encoding="utf-8") in shown and shown.rstrip().endswith("assistant")
    assert not (tmp_path / "dry.parquet").exists() and not list(tmp_path.glob("dry*"))

    bad = json.dumps([{"description": "Uses the 3% efficiency.", "weight": "high"}])
    good = json.dumps([{"title": "Efficiency Factor", "description": "Uses the 3% efficiency.", "weight": 5}])
    server = FakeServer([("reply", bad), ("reply", good)])
    try:
        p = run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--model", tiny_model, "--backend", "openai",
                    "--base-url", server.url, "--concurrency", "1", check=True)
    finally:
        server.httpd.shutdown()
    rows, meta = read_artifact(tmp_path / "r.parquet", "rubrics")
    assert [(c.title, c.weight) for c in rows[0].rubric] == [("Efficiency Factor", 5)]
    assert meta["config"]["prompt_style"] == "paper"
    rejected, _ = read_artifact(tmp_path / "r.rejected.parquet", "rejected-rubrics")
    assert len(rejected) == 1 and "refused by rcsd's schema" in rejected[0].reason
    assert "1 of them valid by the authors' rule but refused by rcsd's schema" in " ".join(p.stderr.split())


def test_no_valid_rubric_names_the_way_out(run_cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [PHOTONS])
    p = run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--model", tiny_model, "--retries", "0",
                "--max-new-tokens", "4")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = " ".join(p.stderr.split())
    assert "no valid rubric for any of 1 problems" in line and "--generator reference" in line
    assert "--backend openai" in line


def test_stage_one_prompts_are_the_authors_texts(tiny_model):
    """GOLDEN files: the student and (not reason-first) teacher messages of the authors' stage-I collator
    (data_collator_rubric.py, commit d1e07f0), built from their class for this row; rcsd renders them under the
    chat template exactly."""
    from transformers import AutoTokenizer

    from rcsd_cli.data.rows import Criterion, Rubric
    from rcsd_cli.rubrics.prompts import chat_prompt_ids, stage_one_message, stage_one_teacher_message
    from rcsd_cli.rubrics.views import PromptView

    golden = ROOT / "tests" / "golden"
    row = Rubric(id="ice", question="Why does ice float on liquid water?", rubric_origin="imported",
                 reference_answer="Ice is less dense than liquid water because hydrogen bonds hold its molecules in "
                 "an open lattice.",
                 rubric=[Criterion(id="a", title="Density comparison", weight=7, description="Essential Criteria: "
                                   "States that ice is less dense than liquid water."),
                         Criterion(id="b", title="Denser ice", weight=-1, description="Pitfall Criteria: Claims "
                                   "ice is denser than water.")])
    student = (golden / "authors_stage1_student.txt").read_text(encoding="utf-8")
    teacher = (golden / "authors_stage1_teacher.txt").read_text(encoding="utf-8")
    assert stage_one_message(row, "paper") == student and "5000 Å" in student
    assert stage_one_teacher_message(row, "paper") == teacher
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = TrainConfig(rubrics="r", task="rubric-generator", loss="jsd", beta=0.5)
    view = PromptView.for_train(cfg)
    assert view.student_ids(tok, row) == chat_prompt_ids(tok, student)
    assert view.teacher_ids(tok, row) == chat_prompt_ids(tok, teacher)
    with pytest.raises(ValueError, match="reason-first is not available with --task rubric-generator"):
        TrainConfig(rubrics="r", task="rubric-generator", teacher_context="reason-first")


@pytest.mark.slow
def test_fallback_reference_keeps_items_the_llm_failed(run_cli, tiny_model, tmp_path):
    rows = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(2)]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    p = run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--model", tiny_model, "--retries", "0",
                "--max-new-tokens", "4", "--fallback", "reference", check=True)  # a random model writes no rubric
    out, _ = read_artifact(tmp_path / "r.parquet", "rubrics")
    assert [r.rubric_origin for r in out] == ["reference", "reference"]
    assert out[0].rubric[0].check.value == "0"  # the check-based rubric from the gold answer
    assert "2 of 2 problems got the reference rubric" in " ".join(p.stderr.split())
    rejected, _ = read_artifact(tmp_path / "r.rejected.parquet", "rejected-rubrics")
    assert len(rejected) == 2  # the failed attempts are still recorded
    p = run_cli("gen-rubrics", data, "-o", tmp_path / "x.parquet", "--generator", "reference", "--fallback",
                "reference")
    assert p.returncode == 2 and "--fallback has no effect with --generator reference" in p.stderr
