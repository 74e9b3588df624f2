"""Training methods: each a ``step(ctx, batch) -> StepResult`` (``train/step.py``), chosen here and nowhere else.

- ``rcsd`` / ``opsd`` (``distill``): one rollout per prompt from the current student; the teacher scores
  the same completion ids behind its privileged prompt (rubric + reference for RCSD, the reference answer
  only for OPSD); the loss is ``losses.chunked_distill_loss``.
- ``grpo``: ``group_size`` rollouts per prompt, rubric or correctness (or judge) rewards, group-normalised
  advantages, the clipped-ratio surrogate, an optional k3 KL to the frozen initial model.
- ``sft``: cross-entropy on the reference answer after the student prompt.
- ``offline``: an offline round (``--samples``/``--scores``): distil towards stored teacher top-k log-probs.

Every method weighs per-token losses by ``step.reduction_weights`` and backpropagates each micro-batch in
``step.accumulate``, so accumulation and the number of processes leave the step's gradient unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.train.methods import distill, grpo, offline, sft
from rcsd_cli.train.step import StepContext, StepResult

Step = Callable[[StepContext, Any], StepResult]  # (context, this process's items: rubric rows or stored samples)

METHODS: dict[str, Step] = {"rcsd": distill.step, "opsd": distill.step, "grpo": grpo.step, "sft": sft.step}


def step_for(cfg: TrainConfig) -> Step:
    """The step a run takes: an offline round distils stored log-probs, else ``--method``'s step."""
    if cfg.samples or cfg.scores:
        return offline.step
    return METHODS[cfg.method]
