"""The authors' rubric-quality protocol (rubric/run_rubric_quality_eval_hf.py, github carriegu0818/RCSD).

A judge sees one question, its reference answer and several rubrics for it (the reference rubric,
named ``GT``, and generated ones), and scores each rubric from 1 to 5 on six dimensions; ``overall``
is their mean. Per dimension, a rubric wins an item when its score is the strict maximum; equal
maxima are ties. The win rate is wins / judged items. Replies are read as theirs are: code fences
stripped, the text from the first ``{`` to the last ``}`` parsed, every rubric and dimension
required (names matched case- and separator-insensitively, with their aliases), scores clamped to
[1, 5] and ``overall`` recomputed.
"""

from __future__ import annotations

import json
import re

DIMENSIONS = ("relevance", "correctness", "completeness", "specificity", "non_redundancy", "usefulness")
METRICS = DIMENSIONS + ("overall",)
_ALIASES = {"gt": ("reference", "gt", "gt_reference", "reference_rubric"),
            "reference": ("reference", "gt", "gt_reference", "reference_rubric"),
            "gt_reference": ("reference", "gt", "gt_reference", "reference_rubric"),
            "learned": ("generated", "ours", "learned_rubric")}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def parse_quality_reply(text: str, names: list[str]) -> tuple[dict[str, dict[str, float]], str, str]:
    """``(scores by rubric name, best rubric, brief reason)``; ValueError with the reason when unusable."""
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"```$", "", re.sub(r"^```(?:json)?", "", text).strip()).strip()
    start, end = text.find("{"), text.rfind("}")
    if start >= 0 and end > start:
        text = text[start: end + 1]
    try:
        reply = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from exc
    raw = reply.get("scores") if isinstance(reply, dict) else None
    if not isinstance(raw, dict):
        raise ValueError("no 'scores' object")
    by_key = {_key(k): k for k in raw}
    scores = {}
    for name in names:
        found = next((by_key[a] for a in (_key(name), *_ALIASES.get(_key(name), ())) if a in by_key), None)
        if found is None or not isinstance(raw[found], dict):
            raise ValueError(f"no scores for rubric {name!r}")
        dims = {}
        for dim in DIMENSIONS:
            try:
                dims[dim] = min(5.0, max(1.0, float(raw[found][dim])))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"rubric {name!r}: no numeric {dim}") from exc
        dims["overall"] = sum(dims.values()) / len(DIMENSIONS)
        scores[name] = dims
    best = str(reply.get("best_rubric") or max(names, key=lambda n: scores[n]["overall"]))
    return scores, best, str(reply.get("brief_reason") or "")


def win_counts(judged: list[dict[str, dict[str, float]]], names: list[str], metric: str) -> tuple[dict, int]:
    """Per rubric, the items where it alone has the highest ``metric``; and the number of ties."""
    wins, ties = dict.fromkeys(names, 0), 0
    for scores in judged:
        top = max(scores[n][metric] for n in names)
        winners = [n for n in names if abs(scores[n][metric] - top) < 1e-9]
        if len(winners) == 1:
            wins[winners[0]] += 1
        else:
            ties += 1
    return wins, ties
