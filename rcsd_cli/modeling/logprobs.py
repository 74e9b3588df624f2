"""Scoring given continuations: what a model thinks of tokens it did not necessarily write.

One room for every "log-probs of these ids after this prompt" question: the per-token logits
``diagnose`` and ``explain`` compare (``continuation_logits``), log-probs from hidden states one
chunk of the vocabulary at a time (``chunked_token_logprobs``: GRPO, SFT, log-likelihood eval), a
teacher's stored top-k (``teacher_topk``: ``score --teacher-logprobs``) and the rollout engines'
sync check (``continuation_logprobs``). Prompts and continuations are aligned by
``batching.build_pair_batch``, so position t always predicts continuation token t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are computed in fp32; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def fp32_logits(head, hidden: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Output-head logits computed in fp32 whatever autocast and the weight's dtype: at the vocabulary
    entries ``index`` [..., k] only (the head's k rows, no full-vocabulary product), or all of them.

    Why: a bf16 logit of magnitude 10 is rounded by up to 0.03, the size of a whole top-k KL signal
    (0.02 nats) and of the 0.05 clip; and CPUs without bf16 instructions round differently again.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.float()
        if index is None:
            return F.linear(h, weight.float(), None if bias is None else bias.float())
        out = (weight[index].float() @ h.unsqueeze(-1)).squeeze(-1)  # [..., k, H] @ [..., H, 1]
        return out if bias is None else out + bias[index].float()


def contrast_logits(rubric_logits: torch.Tensor, control_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """``--teacher-contrast``: (1 + w) z_rubric - w z_control, the rubric-specific part of the teacher amplified
    (classifier-free guidance); a token both contexts like equally keeps its logit, one only the rubric
    context likes gains w times its lead."""
    return (1.0 + weight) * rubric_logits - weight * control_logits


def chunked_token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_size: int = 128,
                           temperature: float = 1.0, entropies: dict | None = None) -> torch.Tensor:
    """log p(targets) [B, T] from hidden states, one chunk of vocabulary logits at a time.

    ``entropies``: a dict that receives each chunk's per-position entropy (no gradient) under its start
    position, once even when the chunk is recomputed in backward."""

    def chunk(h, y, start):
        logp = F.log_softmax(upcast(head(h)) / temperature, -1)
        if entropies is not None and start not in entropies:
            entropies[start] = -(logp.detach().exp() * logp.detach()).sum(-1)
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    out = []
    for start in range(0, hidden.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(checkpoint(chunk, hidden[:, sl], targets[:, sl], start, use_reentrant=False))
        else:
            out.append(chunk(hidden[:, sl], targets[:, sl], start))
    return torch.cat(out, dim=1)


@torch.no_grad()
def continuation_logits(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int):
    """Per row: logits [len(continuation), V] predicting each continuation token after its prompt."""
    head = model.get_output_embeddings()
    out = []
    for j in range(0, len(prompts), 4):
        pb = build_pair_batch(prompts[j:j + 4], prompts[j:j + 4], continuations[j:j + 4], pad_id)
        logits = head(aligned_hidden(model, pb.student)).float()
        out += [logits[i, : len(c)] for i, c in enumerate(continuations[j:j + 4])]
    return out


@torch.no_grad()
def teacher_topk(model, tok, teacher_prompts: list[list[int]], completions: list[list[int]], k: int,
                 micro_batch_size: int = 8, chunk_size: int = 128):
    """Per completion token, the teacher's top-k (ids, log-probs at temperature 1)."""
    head = model.get_output_embeddings()
    ids_out, lp_out = [], []
    for j in range(0, len(completions), micro_batch_size):
        sl = slice(j, j + micro_batch_size)
        pb = build_pair_batch(teacher_prompts[sl], teacher_prompts[sl], completions[sl], tok.pad_token_id)
        hidden = aligned_hidden(model, pb.teacher)
        parts_i, parts_v = [], []
        for start in range(0, hidden.shape[1], chunk_size):
            logp = torch.log_softmax(head(hidden[:, start: start + chunk_size]).float(), -1)
            top = logp.topk(k, dim=-1)
            parts_i.append(top.indices)
            parts_v.append(top.values)
        idx, val = torch.cat(parts_i, 1).cpu(), torch.cat(parts_v, 1).cpu()
        for i, c in enumerate(completions[sl]):
            ids_out.append(idx[i, : len(c)].tolist())
            lp_out.append([[round(x, 5) for x in row] for row in val[i, : len(c)].tolist()])
    return ids_out, lp_out


@torch.no_grad()
def continuation_logprobs(student, prompt: list[int], continuation: list[int], pad_id: int) -> list[float]:
    """The module's log-probability of each continuation token (eval mode: no dropout)."""
    pb = build_pair_batch([prompt], [prompt], [continuation], pad_id)
    was_training = student.training
    student.eval()
    try:
        logits = student.get_output_embeddings()(aligned_hidden(student, pb.student)).float()[0, : len(continuation)]
    finally:
        student.train(was_training)
    return logits.log_softmax(-1).gather(-1, torch.tensor(continuation, device=logits.device)[:, None])[:, 0].tolist()


@torch.no_grad()
def continuation_sums(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16,
                      on_done=None) -> list[float]:
    """The summed log-probability of each (context ids, continuation ids) pair, in the given order.

    Pairs that differ only in their continuation's last token (multiple-choice letters, one-token
    choices) share one forward pass, as lm-eval groups them: the shared positions are summed once and
    each pair reads its own last token from the same final distribution. Forwards run longest first,
    so a batch pads to lengths close to its own; ``on_done(n)`` after each batch of n pairs."""
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if cont:  # an empty continuation has probability 1: its sum stays 0
            groups.setdefault((tuple(ctx), tuple(cont[:-1])), []).append(i)
    keys = sorted(groups, key=lambda k: -(len(k[0]) + len(k[1])))
    head = model.get_output_embeddings()
    out = [0.0] * len(pairs)
    for j in range(0, len(keys), batch_size):
        part = keys[j: j + batch_size]
        firsts = [pairs[groups[k][0]] for k in part]
        pb = build_pair_batch([ctx for ctx, _ in firsts], [ctx for ctx, _ in firsts], [c for _, c in firsts], pad_id)
        hidden = aligned_hidden(model, pb.student)
        dev = hidden.device
        shared = (chunked_token_logprobs(hidden, head, pb.targets.to(dev)) * pb.mask.to(dev)).tolist()
        last = torch.tensor([len(c) - 1 for _, c in firsts], device=dev)
        final = F.log_softmax(upcast(head(hidden[torch.arange(len(part), device=dev), last])), -1)
        for b, key in enumerate(part):
            prefix = sum(shared[b][: len(key[1])])  # every position but the last, the same for the group
            for i in groups[key]:
                out[i] = prefix + final[b, pairs[i][1][-1]].item()
        if on_done:
            on_done(sum(len(groups[k]) for k in part))
    return out
