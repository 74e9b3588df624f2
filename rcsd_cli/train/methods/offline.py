"""An offline round (``--samples``/``--scores``): distil towards the teacher top-k log-probs ``rcsd score
--teacher-logprobs`` stored, on the stored completions: no sampling and no teacher forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.train.chunked_loss import TeacherTopK, chunked_distill_loss
from rcsd_cli.train.step import StepContext, StepResult, accumulate, reduction_weights


@dataclass
class OfflineItem:
    """A stored sample with its teacher's top-k (ids, log-probs) per completion token."""

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_ids: list[list[int]]
    teacher_logprobs: list[list[float]]


def step(ctx: StepContext, items: list[OfflineItem]) -> StepResult:
    cfg, tok = ctx.cfg, ctx.tokenizer
    counts = [max(len(it.completion_ids) - cfg.skip_first_tokens, 0) for it in items]
    total = max(ctx.global_sum(sum(counts)), 1)
    weights = reduction_weights(ctx, counts)
    head = ctx.student.get_output_embeddings()
    health: dict = {}

    def micro_step(rows):
        part = items[rows]
        prompts = [it.prompt_ids for it in part]
        pb = build_pair_batch(prompts, prompts, [it.completion_ids for it in part], tok.pad_token_id,
                              cfg.skip_first_tokens)
        with ctx.compute():
            hidden = aligned_hidden(ctx.student, pb.student)
            dev = hidden.device
            teacher = TeacherTopK.from_rows([it.teacher_ids for it in part], [it.teacher_logprobs for it in part],
                                            hidden.shape[1], len(part[0].teacher_ids[0])).to(dev)
            sums = chunked_distill_loss(hidden, head, teacher, pb.mask.to(dev),
                                        pb.targets.to(dev), cfg.loss, chunk_size=cfg.chunk_size,
                                        row_weights=torch.tensor(weights[rows], device=dev))
        for name, value in sums.health.items():
            health[name] = health.get(name, 0.0) + value
        return sums.weighted, {"loss": sums.loss, "kl": sums.kl, "agree": sums.agree}

    objective, sums = accumulate(ctx, len(items), micro_step)
    return StepResult(loss_sum=sums.get("loss", 0.0), tokens=total, kl_sum=sums.get("kl", 0.0),
                      agree_sum=sums.get("agree", 0.0), objective=objective, health=health)
