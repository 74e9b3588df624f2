"""Rubric ablations for ``rcsd train --rubric-ablation`` (the authors' ablation study).

Each returns new rows; the question, reference and gold answer stay, only the rubric the teacher
sees changes. ``generic`` is the authors' six-criterion rubric, verbatim (``GENERIC_RUBRIC`` in
``rcsd_train_reward.py`` of github carriegu0818/RCSD). Their noisy, reduced and random rubrics were
read from caches whose construction is not public; ``noisy``, ``reduced`` and ``shuffled`` are
rcsd's rules for them (below). The chosen ablation is recorded in every artifact's config.
"""

from __future__ import annotations

import random

from rcsd_cli.data.rows import Criterion, Rubric

_AUTHORS_GENERIC = (  # (title, description), each with weight 1, in the authors' order
    ("Understand Problem", "Understand the problem: Identify what is being asked and restate the goal clearly."),
    ("Identify Information", "Identify relevant information: Extract the important facts, quantities, "
     "constraints, definitions, and assumptions from the problem."),
    ("Choose Strategy", "Choose an appropriate solution strategy: Select a valid method, principle, formula, or "
     "reasoning approach for solving the problem."),
    ("Execute Reasoning", "Execute the reasoning carefully: Carry out the solution step by step, ensuring that "
     "each step follows logically from the previous one."),
    ("Check Correctness", "Check correctness and consistency: Verify calculations, units, assumptions, edge "
     "cases, and whether the answer satisfies the original question."),
    ("Provide Final Answer", "Provide the final answer clearly: State the final answer in a concise and "
     "unambiguous form."),
)
GENERIC_RUBRIC = [Criterion(id=f"generic-{i + 1}", title=title, description=text, weight=1)
                  for i, (title, text) in enumerate(_AUTHORS_GENERIC)]


def ablate(rows: list[Rubric], kind: str | None, seed: int) -> list[Rubric]:
    """``none``: no rubric (the teacher sees the reference only); ``generic``: the authors' rubric for
    every item; ``shuffled``: another item's rubric (a seeded derangement); ``noisy``: each item's own
    rubric with its criteria reordered and each weight's sign flipped with probability 0.3; ``reduced``:
    a random half of each item's criteria (rounded up), in their order (both seeded per item)."""
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
    if kind == "reduced":
        out = []
        for r in rows:
            keep = sorted(random.Random(f"{seed}:{r.id}:reduced").sample(range(len(r.rubric)),
                                                                       (len(r.rubric) + 1) // 2))
            out.append(r.model_copy(update={"rubric": [r.rubric[i] for i in keep]}))
        return out
    raise ValueError(f"unknown rubric ablation {kind!r}")


def control_rows(rows: list[Rubric], kind: str, seed: int) -> dict[str, Rubric]:
    """``--teacher-contrast``: per item id, the row whose teacher prompt is the control context (``reference``:
    the item itself, prompted with its reference alone)."""
    controls = {"shuffled": lambda: ablate(rows, "shuffled", seed), "generic": lambda: ablate(rows, "generic", seed),
                "reference": lambda: rows}[kind]()
    return {r.id: c for r, c in zip(rows, controls, strict=True)}
