"""Batched generation with the Hugging Face backend (left padding, token ids in and out).

Backends take prompt token ids and return completion token ids, so every stage can swap the
engine without touching how prompts are built. Later backends (vLLM, OpenAI-compatible
servers) implement the same ``generate`` signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcsd_cli.schemas import GenerationConfig


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" when an end-of-sequence token was produced, else "length"


def _stop_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, seed: int) -> list[Generation]:
    """Generate one completion per prompt; completions keep their end-of-sequence token."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    stop = _stop_ids(tokenizer, model)
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stop) or None)
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    # Seed a private copy of the RNG state: the training run's global generator is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    model.train(was_training)
    results = []
    for row in out[:, width:].tolist():
        ids, finish = [], "length"
        for t in row:
            ids.append(t)
            if t in stop:
                finish = "stop"
                break
        results.append(Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), finish))
    return results


def generate(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, seed: int,
             on_batch=None) -> list[Generation]:
    """Generate for any number of prompts in batches of ``cfg.batch_size``."""
    results: list[Generation] = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start:start + cfg.batch_size]
        batch = generate_batch(model, tokenizer, chunk, cfg, seed + start)
        results.extend(batch)
        if on_batch:
            on_batch(start, batch)
    return results
