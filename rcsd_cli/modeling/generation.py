"""Batched generation with the Hugging Face backend (left padding, token ids in and out).

Backends take prompt token ids and return completion token ids, so every stage can swap the
engine without touching how prompts are built. Later backends (vLLM, OpenAI-compatible
servers) implement the same ``generate`` signature.

Two decoding loops give the same tokens. The plain one grows a dynamic KV cache and asks the
device after every token whether all rows stopped; ``generate`` runs it with continuous batching
(``continuous``: a row that stops is refilled at once with the next prompt). The static one (``compile_decoding``)
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
from rcsd_cli.modeling import continuous
from rcsd_cli.modeling.continuous import DecodeStats
from rcsd_cli.modeling.logprobs import contrast_logits
from rcsd_cli.modeling.sampling import _filter, item_seed, next_tokens, stop_ids  # noqa: F401 (re-exported)

STOP_CHECK_EVERY = 16  # static loop: tokens between two "have all rows stopped?" host syncs


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" when an end-of-sequence token was produced, "length", or "error"
    error: str | None = None  # why a served request failed after its retries (openai backend only)


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
    rows_in = prompts + (controls or [])
    width = max(len(p) for p in rows_in)
    input_ids = torch.full((len(rows_in), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows_in), width), dtype=torch.long)
    for i, p in enumerate(rows_in):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    with _decoding(model, tokenizer, cfg) as (lm, stop, pad):
        device = stop.device
        input_ids, attention = input_ids.to(device), attention.to(device)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        if controls is not None:
            rows = _decode(lm, input_ids, attention, cfg, generators, stop, pad, contrast=contrast_weight)
        elif use_compiled_decoding(cfg, device):
            check_static_attention(getattr(lm.config, "_attn_implementation", None))
            with autocast_weights(lm, device.type):
                rows = _decode_static(lm, input_ids, attention, cfg, generators, stop, pad,
                                      rows=max(rows or 0, len(prompts)))
        else:
            rows = _decode(lm, input_ids, attention, cfg, generators, stop, pad)
        stops = set(stop.tolist())
    return [_finished(row, stops, tokenizer) for row in rows]


def _finished(row: list[int], stops: set[int], tokenizer) -> Generation:
    """A completion cut after its first stop token (kept), with its text and why it ended."""
    ids = []
    for t in row:
        ids.append(t)
        if t in stops:
            return Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), "stop")
    return Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), "length")


@contextmanager
def _decoding(model, tokenizer, cfg: GenerationConfig):
    """(causal LM, stop ids, pad id) to decode with, in eval mode: a sharded model is gathered once (no
    collectives per token); its inputs go to the mesh's device (``compute_device``)."""
    from rcsd_cli.modeling.sharding import FinalHidden, compute_device, gathered

    device = compute_device(model)
    stop = torch.tensor([-1] if cfg.ignore_eos else sorted(stop_ids(tokenizer, model)) or [-1], device=device)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, FinalHidden):
            with gathered(model):
                yield model.lm, stop, tokenizer.pad_token_id
        else:
            yield model, stop, tokenizer.pad_token_id
    finally:
        model.train(was_training)


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
        nxt = next_tokens(logits, cfg, generators)
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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextmanager
def autocast_weights(model, device_type: str):
    """Under autocast, the weights of the linear layers held in autocast's dtype for one decoding call.

    Autocast casts an fp32 master weight to bf16 at every use, and its cast cache does not live across
    compiled calls: a compiled decode step would read 4 and write 2 bytes per weight for every token
    (R6). Cast once here instead; the values are the ones autocast computes, so are the tokens. Only
    linear layers: autocast casts their weights, while norms and embeddings stay in their own dtype.
    """
    low = _autocast_dtype(device_type)
    kept = []
    if low is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                for p in (module.weight, module.bias):
                    if p is not None and p.is_floating_point() and p.dtype.itemsize > low.itemsize:
                        kept.append((p, p.data))
                        p.data = p.data.to(low)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


def _store_as(update, dtype: torch.dtype | None):
    """A static cache layer allocates one dtype, the first keys'. Store keys and values in ``dtype`` (autocast's,
    the one attention computes in: bf16 under bf16-mixed, not the fp32 that the normed, rotated keys come out
    in: half the cache, same tokens), or else in the keys' dtype."""

    def cast_update(key_states, value_states, *args, **kwargs):
        key_states = key_states.to(dtype or key_states.dtype)
        return update(key_states, value_states.to(key_states.dtype), *args, **kwargs)

    return cast_update


def _static_cache(model, rows: int, total: int):
    """This model's cache for (rows, total length, autocast dtype), reset for each batch of that shape: the
    same tensors every time, as CUDA graphs need. Only the latest shape's cache is kept: at 8B and 4,096 new
    tokens one is 11-15 GB, and a cache per prompt bucket would add up to several; a new shape frees the old
    one before allocating (its CUDA graph is recorded again, once per change)."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_rcsd_static_caches", {})
    low = _autocast_dtype("cuda") or _autocast_dtype("cpu")
    key = (rows, total, low)
    cache = caches.get(key)
    if cache is None:
        caches.clear()
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        cache = caches[key] = StaticCache(config=config, max_cache_len=total)
        for layer in cache.layers:
            layer.update = _store_as(layer.update, low)
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
            nxt = torch.cat([next_tokens(logits[:n], cfg, generators), filler])
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
             on_done=None, seeds: list[int] | None = None, controls: list[list[int]] | None = None,
             contrast_weight: float = 1.0, stats: DecodeStats | None = None,
             limits: list[int] | None = None) -> list[Generation]:
    """One completion per prompt, at most ``cfg.batch_size`` prompts decoding at once.

    The plain loop batches continuously (``continuous``: a prompt joins as soon as a row stops); the
    compiled loop decodes fixed-shape batches in order. ``seeds`` (one per prompt) make each sample
    independent of batching; by default prompt i of this call gets ``item_seed(seed, i)``. ``on_done(indices,
    generations)`` sees completions as they finish, in any order. ``controls``: contrastive decoding
    (``generate_batch``). ``stats``: filled with the continuous loop's decode steps and row occupancy.
    ``limits``: a token limit per prompt (at most ``cfg.max_new_tokens``); a completion cut there ends
    with "length", as if it had been asked for alone.
    """
    seeds = seeds if seeds is not None else [item_seed(seed, i) for i in range(len(prompts))]
    if not prompts:
        return []
    from rcsd_cli.modeling.sharding import compute_device

    if controls is None and use_compiled_decoding(cfg, compute_device(model)):
        return _cut(_static_batches(model, tokenizer, prompts, cfg, seeds, None if limits else on_done),
                    limits, tokenizer, on_done)
    results: list[Generation | None] = [None] * len(prompts)
    with _decoding(model, tokenizer, cfg) as (lm, stop, pad):
        stops = set(stop.tolist())

        def finished(indices: list[int], rows: list[list[int]]) -> None:
            for i, row in zip(indices, rows, strict=True):
                results[i] = _finished(row, stops, tokenizer)
            if on_done:
                on_done(indices, [results[i] for i in indices])

        try:
            continuous.decode(lm, prompts, cfg, seeds, stop, pad, rows=cfg.batch_size, controls=controls,
                              contrast_weight=contrast_weight, on_done=finished, stats=stats, limits=limits)
        except continuous.NotContinuous:  # e.g. sliding-window layers: fixed batches in order
            pass
    if any(r is None for r in results):
        return _cut(_static_batches(model, tokenizer, prompts, cfg, seeds, None if limits else on_done, controls,
                                    contrast_weight), limits, tokenizer, on_done)
    return results


def _cut(results: list[Generation], limits: list[int] | None, tokenizer, on_done=None) -> list[Generation]:
    """Each completion cut at its own limit: its first tokens are the ones it draws alone (per-item seeds)."""
    if limits is None:
        return results
    cut = [g if len(g.token_ids) <= n else Generation(g.token_ids[:n], tokenizer.decode(
        g.token_ids[:n], skip_special_tokens=True), "length") for g, n in zip(results, limits, strict=True)]
    if on_done:
        on_done(list(range(len(cut))), cut)
    return cut


def _static_batches(model, tokenizer, prompts, cfg, seeds, on_done=None, controls=None, contrast_weight=1.0
                    ) -> list[Generation]:
    """Fixed batches of ``cfg.batch_size`` in order, each decoded until its last row stops (the compiled loop's
    way: every batch, the last one padded, has the same shape)."""
    results: list[Generation] = []
    for start in range(0, len(prompts), cfg.batch_size):
        window = slice(start, start + cfg.batch_size)
        batch = generate_batch(model, tokenizer, prompts[window], cfg, seeds[window],
                               controls=None if controls is None else controls[window],
                               contrast_weight=contrast_weight, rows=min(cfg.batch_size, len(prompts)))
        results.extend(batch)
        if on_done:
            on_done(list(range(start, start + len(batch))), batch)
    return results
