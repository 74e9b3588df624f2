"""Batched generation with the Hugging Face backend (left padding, token ids in and out).

Backends take prompt token ids and return completion token ids, so every stage can swap the
engine without touching how prompts are built. Later backends (vLLM, OpenAI-compatible
servers) implement the same ``generate`` signature.

Two decoding loops give the same tokens, and both batch continuously: a row that stops takes the
next waiting prompt at once. The plain one (``continuous``) grows a dynamic KV cache and reads every
token on the host, so rows leave and join at every step. The static one (``compile_decoding``) keeps
``rows`` slots of a preallocated KV cache and an additive mask for the call's prompt bucket plus the
completion, so every decode step has the same shapes and can run as one compiled graph
(``torch.compile``; CUDA graphs on a GPU); it samples and finds stops on the device, and the host looks
only every ``STOP_CHECK_EVERY`` tokens, when it collects finished slots and refills them (an eager
prefill copied into the slot). Shapes come from a fixed set, so a run compiles once per bucket
(``prompt_bucket``: at most half again the prompt), not once per batch, and each model keeps one slot
cache, the latest shape's. Both loops keep the logits of the last prompt position only: [rows, 1,
vocab] at prefill, not [rows, width, vocab].
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling import continuous
from rcsd_cli.modeling.batching import left_padded
from rcsd_cli.modeling.continuous import DecodeStats
from rcsd_cli.modeling.logprobs import contrast_logits
from rcsd_cli.modeling.sampling import _filter, item_seed, next_tokens, stop_ids  # noqa: F401 (re-exported)
from rcsd_cli.modeling.sharding import FinalHidden, compute_device, gathered

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicCache

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
    with _decoding(model, tokenizer, cfg) as (lm, stop, pad):
        device = stop.device
        input_ids, attention, _ = left_padded(prompts + (controls or []), pad, device)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        if controls is not None:
            decoded = _decode(lm, input_ids, attention, cfg, generators, stop, pad, contrast=contrast_weight)
        elif use_compiled_decoding(cfg, device):
            decoded = _decode_compiled(lm, prompts, cfg, seeds, stop, pad, rows=max(rows or 0, len(prompts)))
        else:
            decoded = _decode(lm, input_ids, attention, cfg, generators, stop, pad)
        stops = set(stop.tolist())
    return [_finished(row, stops, tokenizer) for row in decoded]


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
    it measured as fast or faster: benchmarks/bench_decoding.py)."""
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


class _SlotCache:
    """The compiled loop's KV cache: ``rows`` slots of ``total`` columns per layer, allocated once per (rows,
    total, autocast dtype) and reused, as CUDA graphs need the same tensors every step. Each slot writes at its
    own column (``write``), so a slot is refilled with a new prompt while the others go on. Keys and values are
    held in autocast's dtype when it is on (bf16 under bf16-mixed: half the fp32 the normed, rotated keys come
    out in, and the dtype attention computes in anyway), else in the dtype the first prefill gives."""

    def __init__(self, rows: int, total: int, dtype: torch.dtype | None):
        self.rows, self.total, self.dtype = rows, total, dtype
        self.cache: DynamicCache | None = None  # layers that write per slot, built at the first prefill
        self.write: torch.Tensor | None = None  # [rows]: the column each slot's next token goes to

    def fill(self, slots: torch.Tensor, prefill) -> None:
        """Copy a prefill's keys and values (left-padded, [n, heads, width, dim]) into ``slots``' first columns."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if self.cache is None:
            device = slots.device
            self.write = torch.zeros(self.rows, dtype=torch.long, device=device)
            self.cache = DynamicCache()
            for src in prefill.layers:
                layer = DynamicLayer()
                shape = (self.rows, src.keys.shape[1], self.total, src.keys.shape[3])
                layer.keys = torch.zeros(shape, dtype=self.dtype or src.keys.dtype, device=device)
                layer.values = torch.zeros(shape, dtype=layer.keys.dtype, device=device)
                layer.is_initialized, layer.dtype, layer.device = True, layer.keys.dtype, device
                for t in (layer.keys, layer.values):  # written inside the graph: CUDA graphs need fixed addresses
                    torch._dynamo.mark_static_address(t)
                setattr(layer, "update", self._writer(layer))  # this layer writes each slot at its own column
                self.cache.layers.append(layer)
        assert self.write is not None
        width = prefill.layers[0].keys.shape[2]
        target: Any  # the DynamicLayers built above, their keys and values allocated
        for target, src in zip(self.cache.layers, prefill.layers, strict=True):
            target.keys[slots, :, :width] = src.keys.to(target.keys.dtype)
            target.values[slots, :, :width] = src.values.to(target.keys.dtype)
        self.write[slots] = width

    def _writer(self, layer):
        def update(key_states, value_states, *args, **kwargs):  # one new token per slot, at its own column
            at = self.write.view(-1, 1, 1, 1).expand(-1, key_states.shape[1], 1, key_states.shape[3])
            layer.keys.scatter_(2, at, key_states.to(layer.keys.dtype))
            layer.values.scatter_(2, at, value_states.to(layer.keys.dtype))
            return layer.keys, layer.values

        return update

    @property
    def layers(self):
        return self.cache.layers if self.cache is not None else []


def _decode_compiled(lm, prompts, cfg, seeds, stop, pad, rows: int, **kwargs) -> list[list[int]]:
    check_static_attention(getattr(lm.config, "_attn_implementation", None))
    with autocast_weights(lm, stop.device.type):
        return _decode_static(lm, prompts, cfg, seeds, stop, pad, rows=rows, **kwargs)


def _slot_cache(model, rows: int, total: int) -> _SlotCache:
    """This model's slot cache for (rows, total length, autocast dtype). Only the latest shape's is kept: at 8B
    and 4,096 new tokens one is 11-15 GB; a new shape frees the old one first (its CUDA graph is recorded again,
    once per change)."""
    caches = model.__dict__.setdefault("_rcsd_static_caches", {})
    low = _autocast_dtype("cuda") or _autocast_dtype("cpu")
    key = (rows, total, low)
    if key not in caches:
        caches.clear()
        caches[key] = _SlotCache(rows, total, low)
    return caches[key]


@torch.no_grad()
def _decode_static(model, prompts: list[list[int]], cfg: GenerationConfig, seeds: list[int], stop: torch.Tensor,
                   pad: int, rows: int, compiled: bool = True, on_done=None, limits: list[int] | None = None,
                   stats: DecodeStats | None = None) -> list[list[int]]:
    """Continuous batching in fixed shapes, for the compiled step: ``rows`` slots over a static KV cache of the
    call's prompt bucket plus ``max_new_tokens`` columns. Tokens are sampled and stops found on the device;
    the host looks every ``STOP_CHECK_EVERY`` tokens (or sooner, when a slot must reach its limit), collects
    the finished slots and refills them with the next prompts (an eager prefill copied into the slot). Every
    decode step has the same shapes (one compiled graph per bucket; CUDA graphs on a GPU): the mask is an
    additive [rows, 1, 1, total] tensor and each slot carries its own position and write column."""
    device = stop.device
    new = cfg.max_new_tokens
    total = prompt_bucket(max(len(p) for p in prompts)) + new
    slots = _slot_cache(model, rows, total)
    step = _compiled_step(model) if compiled else model
    dtype = slots.dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    blocked = torch.finfo(dtype).min
    mask = torch.full((rows, 1, 1, total), blocked, dtype=dtype, device=device)
    mask[:, :, :, 0] = 0  # an idle slot attends to one column (no all-masked row, no NaN)
    position = torch.zeros((rows, 1), dtype=torch.long, device=device)
    tokens = torch.full((rows, new), pad, dtype=torch.long, device=device)
    count = torch.zeros(rows, dtype=torch.long, device=device)
    limit = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.ones(rows, dtype=torch.bool, device=device)
    idle = torch.Generator(device=device).manual_seed(0)
    generators, item_of = [idle] * rows, [-1] * rows  # the item each slot decodes, -1 when idle
    limits = limits or [new] * len(prompts)
    results: list[list[int]] = [[] for _ in prompts]  # each item's tokens, set when it finishes
    logits, waiting, pending, stats = None, 0, False, stats if stats is not None else DecodeStats()

    def forward():
        nonlocal logits
        mask.scatter_(3, slots.write.view(-1, 1, 1, 1), 0)
        position.add_(1)
        logits = step(input_ids=fed.unsqueeze(-1), attention_mask=mask, position_ids=position,
                      past_key_values=slots.cache, use_cache=True).logits[:, -1, :]
        slots.write.add_(1).clamp_(max=total - 1)  # a finished slot runs on until the next look, harmlessly
        stats.steps += 1
        stats.slot_steps += rows

    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        while True:
            finished, counts = done.tolist(), count.tolist()  # the host's look
            ended = [r for r in range(rows) if item_of[r] >= 0 and finished[r]]
            if ended:
                rows_out = tokens[ended].tolist()
                for r, row in zip(ended, rows_out, strict=True):
                    results[item_of[r]] = row[:counts[r]]
                if on_done:
                    on_done([item_of[r] for r in ended], [results[item_of[r]] for r in ended])
                for r in ended:
                    item_of[r], generators[r] = -1, idle
            busy = [r for r in range(rows) if item_of[r] >= 0]
            if pending and busy:
                forward()
            free = [r for r in range(rows) if item_of[r] < 0][:len(prompts) - waiting]
            if free:
                joining = list(range(waiting, waiting + len(free)))
                waiting += len(free)
                logits = _refill(model, prompts, joining, free, pad, slots, mask, position, logits, blocked)
                at = torch.tensor(free, device=device)
                tokens[at], count[at], done[at] = pad, 0, False
                limit[at] = torch.tensor([limits[i] for i in joining], device=device)
                for r, i in zip(free, joining, strict=True):
                    item_of[r], generators[r] = i, torch.Generator(device=device).manual_seed(seeds[i])
                busy = sorted(busy + free)
            if not busy:
                return results
            left = {r: limits[item_of[r]] - (0 if r in free else counts[r]) for r in busy}
            window = min(STOP_CHECK_EVERY, min(left.values()))
            assert logits is not None  # busy slots: the last forward or refill left their logits
            for k in range(window):
                nxt = next_tokens(logits, cfg, generators)
                fed = torch.where(done, torch.full_like(nxt, pad), nxt)
                at = count.clamp(max=new - 1).unsqueeze(1)
                tokens.scatter_(1, at, torch.where(done.unsqueeze(1), tokens.gather(1, at), fed.unsqueeze(1)))
                count.add_((~done).long())
                done |= torch.isin(fed, stop) | (count >= limit)
                if k < window - 1:
                    forward()
            stats.live_row_steps += window * len(busy)
            pending = True


def _refill(model, prompts, joining: list[int], free: list[int], pad: int, slots: _SlotCache, mask, position,
            logits, blocked) -> torch.Tensor:
    """Prefill the joining prompts (eagerly, left-padded to their own width) into the free slots; returns the
    logits with the new slots' rows replaced by their prefill's last position."""
    device = mask.device
    ids, attention, pos = left_padded([prompts[i] for i in joining], pad, device)
    width = ids.shape[1]
    out = model(input_ids=ids, attention_mask=attention, position_ids=pos, use_cache=True, logits_to_keep=1)
    at = torch.tensor(free, device=device)
    slots.fill(at, out.past_key_values)
    mask[at] = blocked
    mask[at, :, :, :width] = torch.where(attention.bool(), 0.0, blocked).to(mask.dtype).view(len(free), 1, 1, width)
    position[at] = pos[:, -1:]
    new_logits = out.logits[:, -1, :]
    if logits is None:
        logits = new_logits.new_zeros((slots.rows, new_logits.shape[-1]))
    logits = logits.clone()
    logits[at] = new_logits.to(logits.dtype)
    return logits


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

    compiled = controls is None and use_compiled_decoding(cfg, compute_device(model))
    results: list[Generation | None] = [None] * len(prompts)
    with _decoding(model, tokenizer, cfg) as (lm, stop, pad):
        stops = set(stop.tolist())

        def finished(indices: list[int], rows: list[list[int]]) -> None:
            for i, row in zip(indices, rows, strict=True):
                results[i] = _finished(row, stops, tokenizer)
            if on_done:
                on_done(indices, [results[i] for i in indices])

        if compiled:
            _decode_compiled(lm, prompts, cfg, seeds, stop, pad, rows=min(cfg.batch_size, len(prompts)),
                             on_done=finished, limits=limits, stats=stats)
        else:
            try:
                continuous.decode(lm, prompts, cfg, seeds, stop, pad, rows=cfg.batch_size, controls=controls,
                                  contrast_weight=contrast_weight, on_done=finished, stats=stats, limits=limits)
            except continuous.NotContinuous:  # e.g. sliding-window layers: fixed batches in order
                pass
    done = [r for r in results if r is not None]
    if len(done) < len(results):
        return _cut(_static_batches(model, tokenizer, prompts, cfg, seeds, None if limits else on_done, controls,
                                    contrast_weight), limits, tokenizer, on_done)
    return done


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
