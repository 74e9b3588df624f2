"""An offline round (``--samples``/``--scores``): distil towards the teacher top-k log-probs ``rcsd score
--teacher-logprobs`` stored, on the stored completions: no sampling and no teacher forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.train.losses import stored_topk_distill_loss
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

    def micro_step(rows):
        part = items[rows]
        prompts = [it.prompt_ids for it in part]
        pb = build_pair_batch(prompts, prompts, [it.completion_ids for it in part], tok.pad_token_id,
                              cfg.skip_first_tokens)
        with ctx.compute():
            hidden = aligned_hidden(ctx.student, pb.student)
            dev = hidden.device
            k = len(part[0].teacher_ids[0])
            t_ids = torch.zeros((len(part), hidden.shape[1], k), dtype=torch.long)
            t_lp = torch.zeros((len(part), hidden.shape[1], k))
            for i, it in enumerate(part):
                t_ids[i, : len(it.teacher_ids)] = torch.tensor(it.teacher_ids)
                t_lp[i, : len(it.teacher_logprobs)] = torch.tensor(it.teacher_logprobs)
            mask = pb.mask.to(dev).float()

            w = torch.tensor(weights[rows], device=dev).unsqueeze(-1)

            def chunk(h, ids, lp, m):
                per_tok = stored_topk_distill_loss(head(h), ids, lp, temperature=cfg.loss.temperature,
                                                   clip=cfg.loss.clip)
                return torch.stack([(per_tok * m).sum(), (per_tok * m * w).sum()])

            sums = hidden.new_zeros(2)
            for start in range(0, hidden.shape[1], cfg.chunk_size):
                sl = slice(start, start + cfg.chunk_size)
                sums = sums + checkpoint(chunk, hidden[:, sl], t_ids[:, sl].to(dev), t_lp[:, sl].to(dev),
                                         mask[:, sl], use_reentrant=False)
        return sums[1], {"loss": sums[0].detach()}

    objective, sums = accumulate(ctx, len(items), micro_step)
    return StepResult(loss_sum=sums.get("loss", 0.0), tokens=total, objective=objective)
