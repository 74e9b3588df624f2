"""Rubric ablations for ``rcsd train --rubric-ablation`` (the authors' ablation study).

Each returns new rows; the question, reference and gold answer stay, only the rubric the teacher
sees changes. ``generic`` and ``noisy`` are rcsd's own constructions (the authors' exact generic
and noisy rubrics are not public); the chosen ablation is recorded in every artifact's config.
"""

from __future__ import annotations

import random

from rcsd_cli.data.schemas import Criterion, Rubric

GENERIC_RUBRIC = [
    Criterion(id="generic-correct", title="Correct final answer", weight=10,
              description="States a final answer that is correct."),
    Criterion(id="generic-reasoning", title="Sound step-by-step reasoning", weight=5,
              description="Each step follows from the previous ones and from the question."),
    Criterion(id="generic-relevant", title="Addresses the question", weight=4,
              description="Answers what was asked, using the given information."),
    Criterion(id="generic-clear", title="Clear and concise", weight=3, description="Easy to follow, no padding."),
    Criterion(id="generic-unsupported", title="Unsupported claims", weight=-1,
              description="Asserts facts or steps without justification."),
]


def ablate(rows: list[Rubric], kind: str | None, seed: int) -> list[Rubric]:
    """``none``: no rubric (the teacher sees the reference only); ``generic``: one rubric for every item;
    ``shuffled``: another item's rubric (a seeded derangement); ``noisy``: each item's own rubric with
    its criteria reordered and each weight's sign flipped with probability 0.3 (seeded per item)."""
    if kind is None:
        return rows
    if kind == "none":
        return rows  # handled where the teacher prompt is built: no rubric section at all
    if kind == "generic":
        return [r.model_copy(update={"rubric": GENERIC_RUBRIC}) for r in rows]
    if kind == "shuffled":
        if len(rows) < 2:
            return rows
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        lend = {order[i]: order[(i + 1) % len(rows)] for i in range(len(rows))}  # nobody keeps its own
        return [r.model_copy(update={"rubric": rows[lend[i]].rubric}) for i, r in enumerate(rows)]
    if kind == "noisy":
        out = []
        for r in rows:
            rng = random.Random(f"{seed}:{r.id}")
            crit = [c.model_copy(update={"weight": -c.weight if rng.random() < 0.3 else c.weight}) for c in r.rubric]
            rng.shuffle(crit)
            out.append(r.model_copy(update={"rubric": crit}))
        return out
    raise ValueError(f"unknown rubric ablation {kind!r}")
