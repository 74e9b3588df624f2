"""Rubric generators.

``reference``: deterministic, no LLM. From the gold answer it builds an essential
"correct final answer" criterion with a machine check, a pitfall for each distractor of a
multiple-choice question, and format criteria — every criterion is checkable in code.

``llm``: a rubric designer prompt. The model writes a JSON array of weighted criteria from the
question and the reference answer. ``--prompt-style paper`` (the authors' designer) reads replies
by the authors' rule (``parse_paper_rubric``); ``short`` (rcsd's designer) parses the first JSON
array after stripping ``<think>...</think>`` and checks the format it asked for (3-25 criteria,
titles of 2-5 words, descriptions of at most 40 words, integer weights in [-1, 10], at least one
essential criterion (7-10) and one pitfall). Invalid replies are retried and recorded with a reason.
"""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from rcsd_cli.data.inputs import LETTERS
from rcsd_cli.data.rows import Check, Criterion, Problem

ANSWER_LINE_REGEX = r"^\W*(?:final\s+)?answer\s*:\s*\S|\\boxed\{\s*[^{}\s]"
CONCISE_WORDS = 300


class InvalidRubric(ValueError):
    """An LLM reply that is not a usable rubric; the message is the recorded reason."""


def reference_rubric(problem: Problem) -> list[Criterion] | None:
    """A check-only rubric from the gold answer, or None when there is no short gold answer."""
    gold = problem.answer
    if gold is None and problem.reference_answer and len(problem.reference_answer) <= 40:
        gold = problem.reference_answer.strip()
    if not gold:
        return None
    crit: list[Criterion] = []
    if problem.choices:
        idx = LETTERS.index(gold)
        crit.append(Criterion(id="correct-answer", title="Correct final answer", weight=10, tags=["essential"],
                              description=f"Gives {gold}) {problem.choices[idx]} as the final answer.",
                              check=Check(kind="answer_equals", value=gold)))
        for i, choice in enumerate(problem.choices):
            if LETTERS[i] != gold:
                crit.append(Criterion(id=f"distractor-{LETTERS[i]}", title=f"Chooses distractor {LETTERS[i]}",
                                      description=f"Gives {LETTERS[i]}) {choice} as the final answer.", weight=-1,
                                      tags=["pitfall"], check=Check(kind="answer_equals", value=LETTERS[i])))
    else:
        crit.append(Criterion(id="correct-answer", title="Correct final answer", weight=10, tags=["essential"],
                              description=f"The final answer equals {gold}.",
                              check=Check(kind="answer_equals", value=gold)))
    crit.append(Criterion(id="answer-line", title="States final answer", weight=3, tags=["format"],
                          description='States the final answer as a line "Answer: X" or as \\boxed{X}.',
                          check=Check(kind="regex", value=ANSWER_LINE_REGEX)))
    crit.append(Criterion(id="concise", title="Stays concise", weight=2, tags=["format"],
                          description=f"Uses at most {CONCISE_WORDS} words.",
                          check=Check(kind="max_words", value=str(CONCISE_WORDS))))
    return crit


def _first_array(text: str) -> list:
    """The first ``[`` of ``text`` that decodes to a JSON list."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text[start:])
            if isinstance(value, list):
                return value
        except json.JSONDecodeError:
            pass
        start = text.find("[", start + 1)
    raise InvalidRubric("no JSON array in the output")


def first_json_array(text: str):
    """The first decodable JSON array in ``text`` after removing think blocks."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    return _first_array(re.sub(r"^.*?</think>", "", text, flags=re.DOTALL))  # also an unclosed opening tag


def parse_rubric_output(text: str, style: str = "short") -> list[Criterion]:
    """The criteria of a designer reply: the authors' rule for ``paper``, rcsd's format check for ``short``."""
    return parse_paper_rubric(text) if style == "paper" else parse_short_rubric(text)


def authors_json_array(text: str):
    """The first decodable JSON array, as the authors' ``_extract_json_array`` finds it: closed think blocks
    removed, stray ``<think>``/``</think>`` tags deleted (their content kept), then the first ``[`` that
    decodes to a list."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    return _first_array(text.replace("<think>", "").replace("</think>", "").strip())


def parse_paper_rubric(text: str) -> list[Criterion]:
    """The authors' validity rule (a non-empty array of objects or non-empty strings) and their reading of each
    criterion: text under description/criterion/criteria, weight under weight/points/score (default 1), title
    ``Criterion {i}`` when missing. What their rule accepts but rcsd's schema refuses (a weight that is not a
    number, a criterion without text) is rejected with a reason that says so, and counted."""
    items = authors_json_array(text)
    if not items:
        raise InvalidRubric("empty JSON array")
    for i, item in enumerate(items):
        if not isinstance(item, (dict, str)) or not str(item).strip():
            raise InvalidRubric(f"criterion {i} is neither an object nor a non-empty string")
    out = []
    for i, item in enumerate(items, start=1):
        if isinstance(item, str):
            item = {"description": item}
        text = item.get("description") or item.get("criterion") or item.get("criteria")
        weight = item.get("weight", item.get("points", item.get("score", 1)))
        title = item.get("title") or f"Criterion {i}"
        if not isinstance(text, str) or not text.strip():
            raise InvalidRubric(f"{RCSD_SCHEMA_REFUSED}: criterion {i - 1} has no description")
        try:
            if isinstance(weight, bool) or not isinstance(weight, (int, float, str)):
                raise ValueError
            weight = float(weight)
            tag = "pitfall" if weight < 0 else "essential" if weight >= 7 else "important"
            out.append(Criterion(id=f"c{i}", title=str(title).strip() or f"Criterion {i}",
                                 description=text.strip(), weight=weight, tags=[tag]))
        except (ValueError, ValidationError) as exc:  # pydantic's error is a ValueError too
            raise InvalidRubric(f"{RCSD_SCHEMA_REFUSED}: criterion {i - 1}: weight {weight!r} is not a finite "
                                "number") from exc
    return out


RCSD_SCHEMA_REFUSED = "valid by the authors' rule, refused by rcsd's schema"


def parse_short_rubric(text: str) -> list[Criterion]:
    """Validate a reply to rcsd's short designer against the format it asks for."""
    items = first_json_array(text)
    if not 3 <= len(items) <= 25:
        raise InvalidRubric(f"{len(items)} criteria, expected 3 to 25")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRubric(f"criterion {i} is not an object")
        title, desc, weight = item.get("title"), item.get("description"), item.get("weight")
        if not isinstance(title, str) or not 2 <= len(title.split()) <= 5:
            raise InvalidRubric(f"criterion {i}: title must be 2-5 words")
        if not isinstance(desc, str) or not desc.strip() or len(desc.split()) > 40:
            raise InvalidRubric(f"criterion {i}: description must be 1-40 words")
        if isinstance(weight, bool) or not isinstance(weight, int) or not -1 <= weight <= 10 or weight == 0:
            raise InvalidRubric(f"criterion {i}: weight must be a non-zero integer in [-1, 10]")
        tag = "pitfall" if weight < 0 else "essential" if weight >= 7 else "important"
        out.append(Criterion(id=f"c{i + 1}", title=title.strip(), description=desc.strip(), weight=weight, tags=[tag]))
    if not any(c.weight >= 7 for c in out):
        raise InvalidRubric("no essential criterion (weight 7-10)")
    if not any(c.weight < 0 for c in out):
        raise InvalidRubric("no pitfall criterion (negative weight)")
    return out
