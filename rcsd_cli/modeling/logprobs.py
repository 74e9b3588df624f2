"""Scoring given continuations: what a model thinks of tokens it did not necessarily write.

One room for every "log-probs of these ids after this prompt" question: the per-token logits
``diagnose`` and ``explain`` compare (``continuation_logits``), log-probs from hidden states one
chunk of the vocabulary at a time (``chunked_token_logprobs``: GRPO, SFT, log-likelihood eval), a
teacher's stored top-k (``teacher_topk``: ``score --teacher-logprobs``) and the rollout engines'
sync check (``continuation_logprobs``). Prompts and continuations are aligned by
``batching.build_pair_batch``, so position t always predicts continuation token t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch, left_padded


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

    A context is run once for all its continuations (a question and its choices): its KV cache is repeated for
    each continuation, which then runs only its own tokens. Continuations that differ only in their last token
    (multiple-choice letters, one-token choices) share a row, as lm-eval groups them: each reads its last
    token from the same final distribution. Contexts run ``batch_size`` at a time, longest first, so a
    batch pads to lengths close to its own; ``on_done(n)`` after each batch of n pairs."""
    groups: dict[tuple, list[int]] = {}  # (context, continuation but its last token) -> pair indices
    for i, (ctx, cont) in enumerate(pairs):
        if cont:  # an empty continuation has probability 1: its sum stays 0
            groups.setdefault((tuple(ctx), tuple(cont[:-1])), []).append(i)
    by_context: dict[tuple, list[tuple]] = {}
    for key in groups:
        by_context.setdefault(key[0], []).append(key)
    contexts = sorted(by_context, key=len, reverse=True)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    out = [0.0] * len(pairs)
    for j in range(0, len(contexts), batch_size):
        part = contexts[j: j + batch_size]
        keys = [key for ctx in part for key in by_context[ctx]]
        row_ctx = [part.index(key[0]) for key in keys]
        hidden = _context_then_continuations(lm, list(part), [list(key[1]) for key in keys], row_ctx, pad_id)
        width = hidden.shape[1]  # position t predicts continuation token t
        targets = torch.full((len(keys), width), pad_id, dtype=torch.long, device=hidden.device)
        mask = torch.zeros((len(keys), width), dtype=torch.bool, device=hidden.device)
        for r, key in enumerate(keys):
            targets[r, :len(key[1])] = torch.tensor(key[1], dtype=torch.long)
            mask[r, :len(key[1])] = True
        shared = (chunked_token_logprobs(hidden, head, targets) * mask).sum(-1).tolist()
        last = torch.tensor([len(key[1]) for key in keys], device=hidden.device)
        final = F.log_softmax(upcast(head(hidden[torch.arange(len(keys), device=hidden.device), last])), -1)
        for r, key in enumerate(keys):
            for i in groups[key]:
                out[i] = shared[r] + final[r, pairs[i][1][-1]].item()
        if on_done:
            on_done(sum(len(groups[key]) for key in keys))
    return out


def _context_then_continuations(lm, contexts: list[tuple], continuations: list[list[int]], row_ctx: list[int],
                                pad_id: int) -> torch.Tensor:
    """Final hidden states [rows, 1 + longest continuation, H]: position 0 is the last context token of the row's
    context, position t the continuation's token t-1. The contexts run once, left-padded, with a KV cache
    that each row then extends by its continuation (right-padded; a causal mask keeps pads out of the rest)."""
    device = next(lm.parameters()).device
    ids, attention, position = left_padded([list(c) for c in contexts], pad_id, device)
    body = lm.base_model
    out = body(input_ids=ids, attention_mask=attention, position_ids=position,
               use_cache=True)
    rows = torch.tensor(row_ctx, device=device)
    last = out.last_hidden_state[:, -1].index_select(0, rows).unsqueeze(1)
    longest = max(len(c) for c in continuations)
    if longest == 0:
        return last
    cache = out.past_key_values
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    cont = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, c in enumerate(continuations):
        cont[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[r, :len(c)] = 1
    lengths = torch.tensor([len(contexts[b]) for b in row_ctx], device=device)
    position = lengths[:, None] + torch.arange(longest, device=device)[None]
    hidden = body(input_ids=cont.to(device), attention_mask=torch.cat([attention.index_select(0, rows),
                                                                        cont_mask.to(device)], 1),
                  position_ids=position, past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([last, hidden], 1)


@dataclass
class TokenLogprobs:
    """Log-probabilities (temperature 1) at each position of a continuation: the token's own, its rank among
    the vocabulary (1 = the most likely), and the ``k`` most likely tokens."""

    logprob: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top: list[list[float]]


@torch.no_grad()
def token_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], k: int, pad_id: int,
                   micro_batch_size: int = 8, chunk_size: int = 128) -> list[TokenLogprobs]:
    """Per row, ``TokenLogprobs`` of each continuation token after its prompt (what an OpenAI-compatible
    server returns as ``logprobs``, and with the prompt as the continuation, as prompt log-probs)."""
    head = model.get_output_embeddings()
    out = []
    for j in range(0, len(prompts), micro_batch_size):
        sl = slice(j, j + micro_batch_size)
        pb = build_pair_batch(prompts[sl], prompts[sl], continuations[sl], pad_id)
        hidden = aligned_hidden(model, pb.student)
        targets = pb.targets.to(hidden.device)
        own, rank, top_i, top_v = [], [], [], []
        for start in range(0, hidden.shape[1], chunk_size):
            logp = torch.log_softmax(head(hidden[:, start: start + chunk_size]).float(), -1)
            chosen = logp.gather(-1, targets[:, start: start + chunk_size].unsqueeze(-1))
            own.append(chosen.squeeze(-1))
            rank.append((logp > chosen).sum(-1) + 1)
            top = logp.topk(k, dim=-1)
            top_i.append(top.indices)
            top_v.append(top.values)
        own_t, rank_t = torch.cat(own, 1).cpu(), torch.cat(rank, 1).cpu()
        idx_t, val_t = torch.cat(top_i, 1).cpu(), torch.cat(top_v, 1).cpu()
        for i, c in enumerate(continuations[sl]):
            n = len(c)
            out.append(TokenLogprobs(own_t[i, :n].tolist(), rank_t[i, :n].tolist(), idx_t[i, :n].tolist(),
                                     val_t[i, :n].tolist()))
    return out
