"""Reward function for verl users training on rcsd's rubrics.

``rcsd export --format verl`` writes each rubric into ``reward_model.ground_truth`` (JSON) and
``extra_info.rubric``. Point verl at this function::

    custom_reward_function.path=<site-packages>/rcsd_cli/verl_reward.py
    custom_reward_function.name=compute_score

It grades a response with the rubric's machine checks (the same code ``rcsd score`` uses) and
returns the rubric score in [0, 1]. Criteria without a check go to an LLM judge when
``RCSD_JUDGE_BASE_URL`` (an OpenAI-compatible server, key from ``OPENAI_API_KEY``) and
``RCSD_JUDGE_MODEL`` are set, with rcsd score's judge prompt and retries (``RCSD_JUDGE_RETRIES``,
default 2) — ``--reward judge`` of ``rcsd train``; otherwise they are left out of both sums. With no
judged positive criterion it falls back to answer correctness.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rcsd_cli.configs.groups import BackendConfig
from rcsd_cli.data.rows import Criterion, Problem
from rcsd_cli.evaluation.scoring import JUDGE_REPLY, score_with_judge

_JUDGE: dict = {}


def _judge():
    """The judge backend named by the environment, opened once per worker process; None if unset."""
    url, model = os.environ.get("RCSD_JUDGE_BASE_URL"), os.environ.get("RCSD_JUDGE_MODEL")
    if not (url and model):
        return None
    if (url, model) not in _JUDGE:
        # verl workers without a judge never import the HTTP client
        from rcsd_cli.backends.openai import OpenAIBackend

        _JUDGE[(url, model)] = OpenAIBackend(BackendConfig(kind="openai", base_url=url), model)
    return _JUDGE[(url, model)]


def compute_score(data_source: str, solution_str: str, ground_truth: str | dict, extra_info: dict | None = None,
                  **_: Any) -> float:
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)`` signature."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)
    problem = Problem(id=str(gt.get("id") or "item"), question=gt.get("question") or "?", choices=gt.get("choices"),
                      answer=gt.get("answer"))
    rubric = [Criterion.model_validate(c) for c in gt.get("rubric", [])]
    judge = _judge()
    graded = rubric if judge is not None else [c for c in rubric if c.check is not None]
    (s,) = score_with_judge(judge, [(problem.id, problem, graded, solution_str)], JUDGE_REPLY,
                            int(os.environ.get("RCSD_JUDGE_RETRIES", "2")), seed=0)
    if s.score is None:
        return float(bool(s.correct))
    return float(s.score)
