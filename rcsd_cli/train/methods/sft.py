"""``--method sft``: cross-entropy on the reference answer after the student prompt."""

from __future__ import annotations

import torch

from rcsd_cli.data.rows import Rubric
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.train.step import StepContext, StepResult, accumulate, reduction_weights, sequence_logprobs


def step(ctx: StepContext, rows: list[Rubric]) -> StepResult:
    view = PromptView.for_train(ctx.cfg)
    prompts = [view.student_ids(ctx.tokenizer, r) for r in rows]
    return backward(ctx, prompts, [view.target_ids(ctx.tokenizer, r) for r in rows])


def backward(ctx: StepContext, prompts, targets_ids) -> StepResult:
    """Cross-entropy on the given targets after their prompts."""
    total = max(ctx.global_sum(sum(len(t) for t in targets_ids)), 1)
    weights = reduction_weights(ctx, [len(t) for t in targets_ids])
    health: dict = {}

    def micro_step(sl):
        with ctx.clock("student"), ctx.compute():
            logp, mask, _ = sequence_logprobs(ctx, prompts, targets_ids, sl, health)
            per_tok = -(logp * mask)
            weighted = (per_tok * torch.tensor(weights[sl], device=logp.device).unsqueeze(-1)).sum()
        return weighted, {"loss": per_tok.detach().sum()}

    objective, sums = accumulate(ctx, len(prompts), micro_step)
    return StepResult(loss_sum=sums.get("loss", 0.0), tokens=total, objective=objective, health=health)
