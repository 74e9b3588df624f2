"""Choosing the next token: stop ids, per-item seeds, top-k/top-p filtering and per-row sampling.

Shared by the static-batch loops (``generation``) and the continuous-batching scheduler (``continuous``).
"""

from __future__ import annotations

import hashlib

import torch

from rcsd_cli.configs.groups import GenerationConfig


def stop_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


def item_seed(*parts) -> int:
    """A stable 63-bit seed from (run seed, step, item id, ...): the same item draws the same sample
    whatever batch it lands in, whichever process runs it and whatever ran before."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then nucleus filtering (the order transformers applies them); removed entries become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generators: list[torch.Generator]) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    scores = _filter(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    # Gumbel-max with one generator per row: an exact sample from softmax(scores), row by row independent
    noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in generators])
    gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1 - 1e-7)))
    return (scores + gumbel).argmax(-1)
