"""Parsing and validation of LLM rubric designer output."""

import json

import pytest

from rcsd_cli.rubrics.rubric_gen import InvalidRubric, parse_rubric_output

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
