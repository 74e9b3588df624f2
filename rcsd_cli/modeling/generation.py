"""Batched generation with the Hugging Face backend (left padding, token ids in and out).

Backends take prompt token ids and return completion token ids, so every stage can swap the
engine without touching how prompts are built. Later backends (vLLM, OpenAI-compatible
servers) implement the same ``generate`` signature.

Two decoding loops give the same tokens. The plain one grows a dynamic KV cache and asks the
device after every token whether all rows stopped. The static one (``compile_decoding``)
preallocates the KV cache and the attention mask for the whole completion, so every decode step
has the same shapes and can run as one compiled graph (``torch.compile``; CUDA graphs on a GPU),
and looks for stop tokens only every ``STOP_CHECK_EVERY`` tokens: no host sync per token (the
positions advance on the device). Shapes come from a fixed set, so a run compiles once per
bucket, not once per batch: a call's short last batch is padded to its other batches' rows, and
prompts are left-padded to the next of ``prompt_bucket``'s widths (at most half again the prompt). Each bucket's
cache is allocated once per model and reused. Both loops keep the logits of the last prompt
position only: [rows, 1, vocab] at prefill, not [rows, width, vocab].
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rcsd_cli.data.schemas import GenerationConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling.logprobs import contrast_logits

STOP_CHECK_EVERY = 16  # static loop: tokens between two "have all rows stopped?" host syncs


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" when an end-of-sequence token was produced, "length", or "error"
    error: str | None = None  # why a served request failed after its retries (openai backend only)


def _stop_ids(tokenizer, model) -> set[int]:
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
    import hashlib

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


def _next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generators: list[torch.Generator]) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    scores = _filter(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    # Gumbel-max with one generator per row: an exact sample from softmax(scores), row by row independent
    noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in generators])
    gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1 - 1e-7)))
    return (scores + gumbel).argmax(-1)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig,
                   seeds: list[int] | int, controls: list[list[int]] | None = None,
                   contrast_weight: float = 1.0, rows: int | None = None) -> list[Generation]:
    """One completion per prompt, prompt i sampled with its own generator seeded by ``seeds[i]``.

    A plain KV-cache decoding loop over left-padded prompts (position ids from the attention
    mask), so sampling never touches torch's global RNG and a completion depends only on its
    prompt, the settings and its seed. Completions keep their end-of-sequence token.

    ``controls``: contrastive decoding (``--teacher-contrast``): control prompt i decodes beside
    prompt i, fed the same tokens, and every step samples from (1+w) z_prompt - w z_control.
    ``rows``: the compiled loop decodes this many rows (a short last batch padded), so that every
    batch of a call has the same shape.
    """
    if isinstance(seeds, int):
        seeds = [item_seed(seeds, i) for i in range(len(prompts))]
    from rcsd_cli.modeling.sharding import compute_device

    device = compute_device(model)
    pad = tokenizer.pad_token_id
    rows_in = prompts + (controls or [])
    width = max(len(p) for p in rows_in)
    input_ids = torch.full((len(rows_in), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows_in), width), dtype=torch.long)
    for i, p in enumerate(rows_in):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    stop = torch.tensor([-1] if cfg.ignore_eos else sorted(_stop_ids(tokenizer, model)) or [-1], device=device)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    was_training = model.training
    model.eval()
    with _decoding(model) as lm:
        if controls is not None:
            rows = _decode(lm, input_ids, attention, cfg, generators, stop, pad, contrast=contrast_weight)
        else:
            if use_compiled_decoding(cfg, device):
                check_static_attention(getattr(lm.config, "_attn_implementation", None))
                rows = _decode_static(lm, input_ids, attention, cfg, generators, stop, pad,
                                      rows=max(rows or 0, len(prompts)))
            else:
                rows = _decode(lm, input_ids, attention, cfg, generators, stop, pad)
    model.train(was_training)
    stop_ids = set(stop.tolist())
    results = []
    for row in rows:
        ids, finish = [], "length"
        for t in row:
            ids.append(t)
            if t in stop_ids:
                finish = "stop"
                break
        results.append(Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), finish))
    return results


@contextmanager
def _decoding(model):
    """The causal LM to decode with: a sharded model is gathered once (no collectives per token)."""
    from rcsd_cli.modeling.sharding import FinalHidden, gathered

    if isinstance(model, FinalHidden):  # inputs are already on the mesh's device (``compute_device``)
        with gathered(model):
            yield model.lm
    else:
        yield model


def _decode(model, input_ids, attention, cfg, generators, stop, pad, contrast: float | None = None
            ) -> list[list[int]]:
    """``contrast``: rows past ``len(generators)`` are the control prompts of the first rows."""
    n = len(generators)
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=True, logits_to_keep=1)
    done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for _ in range(cfg.max_new_tokens):
        logits = out.logits[:, -1, :]
        if contrast is not None:
            logits = contrast_logits(logits[:n].float(), logits[n:].float(), contrast)
        nxt = _next_tokens(logits, cfg, generators)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done |= torch.isin(nxt, stop)
        if len(tokens) == cfg.max_new_tokens or bool(done.all()):  # no forward for a token never sampled
            break
        fed = nxt if contrast is None else torch.cat([nxt, nxt])  # a control row follows its prompt row
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)  # finished rows: pad
        position = position[:, -1:] + 1
        out = model(input_ids=fed.unsqueeze(-1), attention_mask=attention, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(n)]


def use_compiled_decoding(cfg: GenerationConfig, device) -> bool:
    """``compile_decoding`` unset: the static compiled loop on CUDA, the plain loop elsewhere (where
    it measured as fast or faster: examples/bench_decoding.py)."""
    return cfg.compile_decoding if cfg.compile_decoding is not None else device.type == "cuda"


def check_static_attention(attn_implementation: str | None) -> None:
    """The compiled loop marks every slot of its static cache present in the attention mask: SDPA and eager
    attention still skip the unwritten slots ahead of each row, by the causal mask built from the cache
    positions; FlashAttention-2 builds no such mask and would attend to them (wrong tokens, no error)."""
    if attn_implementation and attn_implementation.startswith("flash_attention"):
        raise RcsdError(f"--attn-implementation {attn_implementation} cannot decode with the compiled static-cache "
                        "loop (it would attend to unwritten cache slots): use --no-compile-decoding or sdpa")


def prompt_bucket(width: int) -> int:
    """The prompt region a static-cache batch is padded to: the next of 64, 96, 128, 192, 256, 384, ...
    (at most half again the prompt; about two compiled shapes per doubling of the prompt length)."""
    size = 64
    while True:
        for bucket in (size, size * 3 // 2):
            if width <= bucket:
                return bucket
        size *= 2


def _compiled_step(model):
    """The model's forward compiled for fixed-shape decode steps (CUDA graphs on a GPU), once per module."""
    step = getattr(model, "_rcsd_decode_step", None)
    if step is None:
        from rcsd_cli.modeling.sharding import compute_device

        cuda = compute_device(model).type == "cuda"
        step = torch.compile(model.forward, mode="reduce-overhead" if cuda else None, dynamic=False)
        model._rcsd_decode_step = step  # a plain attribute: not a parameter, not in the state dict
    return step


def _same_dtype(update):
    """A static cache layer allocates one dtype (the keys'); store the values in it too."""

    def cast_update(key_states, value_states, *args, **kwargs):
        return update(key_states, value_states.to(key_states.dtype), *args, **kwargs)

    return cast_update


def _static_cache(model, rows: int, total: int):
    """This model's cache for (rows, total length, autocast dtype), reset for each batch of that shape: the
    same tensors every time, as CUDA graphs need. Only the latest shape's cache is kept: at 8B and 4,096 new
    tokens one is 11-15 GB, and a cache per prompt bucket would add up to several; a new shape frees the old
    one before allocating (its CUDA graph is recorded again, once per change)."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_rcsd_static_caches", {})
    key = (rows, total, torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else
           torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    cache = caches.get(key)
    if cache is None:
        caches.clear()
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        cache = caches[key] = StaticCache(config=config, max_cache_len=total)
        for layer in cache.layers:  # bf16 autocast over fp32 weights: rotary keys come out fp32, values bf16
            layer.update = _same_dtype(layer.update)
    elif cache.is_initialized:
        cache.reset()
    return cache


def _decode_static(model, input_ids, attention, cfg, generators, stop, pad, compiled=True, rows: int = 0
                   ) -> list[list[int]]:
    """The plain loop's tokens from a preallocated KV cache and mask; stop checks every few tokens.
    ``rows``: decode at least this many rows (a short last batch in the same shapes as the others)."""
    n, width = input_ids.shape
    device = input_ids.device
    rows = max(n, rows)
    region = prompt_bucket(width)
    total = region + cfg.max_new_tokens
    # Left-pad the prompts to the bucket (the cache writes from slot 0 and counts its own position on the
    # device); filler rows repeat the first prompt (no all-masked rows) and their tokens are dropped.
    input_ids = torch.cat([torch.full((n, region - width), pad, dtype=input_ids.dtype, device=device), input_ids], 1)
    attention = torch.cat([torch.zeros((n, region - width), dtype=attention.dtype, device=device), attention], 1)
    if rows > n:
        input_ids = torch.cat([input_ids, input_ids[:1].expand(rows - n, -1)])
        attention = torch.cat([attention, attention[:1].expand(rows - n, -1)])
    cache = _static_cache(model, rows, total)
    mask = torch.ones((rows, total), dtype=attention.dtype, device=device)  # generated tokens (and pads) count,
    mask[:, :region] = attention  # as in the plain loop; the causal mask hides the future
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :]
    step = _compiled_step(model) if compiled else model
    position = position[:, -1:]
    tokens = torch.full((rows, cfg.max_new_tokens), pad, dtype=torch.long, device=device)
    filler = torch.full((rows - n,), pad, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    done[n:] = True
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        for t in range(cfg.max_new_tokens):
            nxt = torch.cat([_next_tokens(logits[:n], cfg, generators), filler])
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens[:, t] = nxt
            done |= torch.isin(nxt, stop)
            if t + 1 == cfg.max_new_tokens or ((t + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())):
                break
            position = position + 1
            logits = step(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=position,
                          past_key_values=cache, use_cache=True).logits[:, -1, :]
    return tokens[:n, : t + 1].tolist()


def generate(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, seed: int,
             on_batch=None, seeds: list[int] | None = None, controls: list[list[int]] | None = None,
             contrast_weight: float = 1.0) -> list[Generation]:
    """Generate for any number of prompts in batches of ``cfg.batch_size``.

    ``seeds`` (one per prompt) make each sample independent of batching; by default prompt i of
    this call gets ``item_seed(seed, i)``. ``controls``: contrastive decoding (``generate_batch``).
    """
    seeds = seeds if seeds is not None else [item_seed(seed, i) for i in range(len(prompts))]
    results: list[Generation] = []
    for start in range(0, len(prompts), cfg.batch_size):
        window = slice(start, start + cfg.batch_size)
        batch = generate_batch(model, tokenizer, prompts[window], cfg, seeds[window],
                               controls=None if controls is None else controls[window],
                               contrast_weight=contrast_weight, rows=min(cfg.batch_size, len(prompts)))
        results.extend(batch)
        if on_batch:
            on_batch(start, batch)
    return results
