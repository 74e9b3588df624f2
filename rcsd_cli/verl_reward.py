"""Reward function for verl users training on rcsd's rubrics.

``rcsd export --format verl`` writes each rubric into ``reward_model.ground_truth`` (JSON) and
``extra_info.rubric``. Point verl at this function::

    custom_reward_function.path=<site-packages>/rcsd_cli/verl_reward.py
    custom_reward_function.name=compute_score

It grades a response with the rubric's machine checks (the same code ``rcsd score`` uses) and
returns the rubric score in [0, 1]; criteria without a check cannot be judged here and are left
out of both sums. With no checkable positive criterion it falls back to answer correctness.
"""

from __future__ import annotations

import json
from typing import Any

from rcsd_cli.data.schemas import Criterion, Problem
from rcsd_cli.evaluation.scoring import score_completion


def compute_score(data_source: str, solution_str: str, ground_truth: str | dict, extra_info: dict | None = None,
                  **_: Any) -> float:
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)`` signature."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)
    problem = Problem(id=str(gt.get("id") or "item"), question=gt.get("question") or "?", choices=gt.get("choices"),
                      answer=gt.get("answer"))
    rubric = [Criterion.model_validate(c) for c in gt.get("rubric", [])]
    checkable = [c for c in rubric if c.check is not None]
    if not checkable:
        s = score_completion(problem.id, problem, [], solution_str)
        return float(bool(s.correct))
    s = score_completion(problem.id, problem, checkable, solution_str)
    if s.score is None:
        return float(bool(s.correct))
    return float(s.score)
