"""Continuous batching for the plain decoding loop: a row that stops is refilled with the next waiting prompt.

A static batch decodes until its longest row stops, so most of its steps carry finished rows (the demo's
answers average 20 tokens while each batch's longest runs to 50-80). Here every decode step carries up to
``rows`` live items: when one stops, it leaves the batch and the next prompt joins.

How rows share one KV cache (a ``DynamicCache`` whose layers grow in place): a row's tokens sit in the cache's
columns its attention-mask row marks, the others are padding. Joining prompts are prefilled as a batch of their
own (left-padded) and their cache is concatenated to the live rows' after left-padding the narrower of the two;
a row that stops is dropped from every layer, and so are the columns no live row uses any more. Each row
carries its own position ids, so where it sits in the cache does not change its values, and each item samples
from its own generator, so its tokens do not depend on which items it shares a batch with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.modeling.batching import left_padded
from rcsd_cli.modeling.logprobs import contrast_logits
from rcsd_cli.modeling.sampling import next_tokens

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicCache

OnDone = Callable[[list[int], list[list[int]]], None]  # (item indices, their token ids), as items stop


@dataclass
class DecodeStats:
    """What a call cost: decode steps (one forward of the live rows each) and the row-steps they carried."""

    steps: int = 0
    live_row_steps: int = 0  # sum over steps of the rows still generating (compiled loop: of the slots holding
    # an item, a finished one until the next look)
    slot_steps: int = 0  # sum over steps of ``rows`` (the batch the scheduler may fill)

    @property
    def occupancy(self) -> float:
        return self.live_row_steps / self.slot_steps if self.slot_steps else 0.0


@dataclass
class _Live:
    """The rows in flight, in cache order. With controls (contrastive decoding) item ``j`` has two cache rows:
    its prompt at ``j`` and its control at ``len(items) + j``."""

    items: list[int] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    cache: DynamicCache | None = None  # None (and mask, position): no row in flight
    mask: torch.Tensor | None = None  # [cache rows, columns]
    position: torch.Tensor | None = None  # [cache rows, 1]: the position of each row's last token

    def state(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """(cache, mask, position) of the rows in flight (there are some)."""
        assert self.cache is not None and self.mask is not None and self.position is not None
        return self.cache, self.mask, self.position


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class NotContinuous(Exception):
    """The model's cache is not one this scheduler can split and join (sliding-window or other layers)."""


class _GrowingLayer:
    """One layer's keys and values in buffers with room to grow: a decode step writes its column in place, where
    ``DynamicLayer.update`` copies the whole cache (``torch.cat``: a fifth of a decode step at 135M, 16 rows)."""

    @staticmethod
    def adopt(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys``/``values`` [rows, heads, columns, dim] in ``layer``, with room for as many columns again."""
        n = keys.shape[2]
        room = max(64, n)
        layer._k = keys.new_empty((*keys.shape[:2], n + room, keys.shape[3]))
        layer._v = values.new_empty((*values.shape[:2], n + room, values.shape[3]))
        layer._k[:, :, :n], layer._v[:, :, :n] = keys, values
        layer._n = n
        layer.keys, layer.values = layer._k[:, :, :n], layer._v[:, :, :n]
        layer.update = lambda k, v, *args, **kwargs: _GrowingLayer.append(layer, k, v)

    @staticmethod
    def append(layer, keys: torch.Tensor, values: torch.Tensor):
        n, add = layer._n, keys.shape[2]
        if n + add > layer._k.shape[2]:
            _GrowingLayer.adopt(layer, layer.keys, layer.values)
        layer._k[:, :, n:n + add], layer._v[:, :, n:n + add] = keys, values
        layer._n = n + add
        layer.keys, layer.values = layer._k[:, :, :n + add], layer._v[:, :, :n + add]
        return layer.keys, layer.values


def _layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise NotContinuous(f"continuous batching needs a DynamicCache of full-attention layers, got {type(cache)}")
    return layers


def _reshape(live: _Live, rows: torch.Tensor | None, columns: torch.Tensor | None) -> None:
    """Keep these cache rows and columns (``None``: all) of every layer and of the mask."""
    cache, mask, _ = live.state()
    for layer in _layers(cache):
        keys, values = layer.keys, layer.values
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        if columns is not None:
            keys, values = keys.index_select(2, columns), values.index_select(2, columns)
        _GrowingLayer.adopt(layer, keys, values)
    if rows is not None:
        mask = mask.index_select(0, rows)
    if columns is not None:
        mask = mask.index_select(1, columns)
    live.mask = mask


def _select(live: _Live, keep: list[int], rows_of) -> None:
    """Keep the items at positions ``keep`` (their cache rows follow) and drop the columns no kept row uses."""
    rows = rows_of(keep, len(live.items))
    live.items = [live.items[j] for j in keep]
    live.generators = [live.generators[j] for j in keep]
    live.tokens = [live.tokens[j] for j in keep]
    if not rows:
        live.cache = live.mask = live.position = None
        return
    _, mask, position = live.state()
    index = torch.tensor(rows, device=mask.device)
    live.position = position.index_select(0, index)
    used = mask.index_select(0, index).any(0)
    _reshape(live, index, None if bool(used.all()) else used.nonzero().squeeze(1))


def _join(live: _Live, new: _Live, halves: int) -> None:
    """Append ``new``'s items after the live ones; cache rows stay grouped as prompts, then controls (``halves``
    is 2 with controls), both caches left-padded to the wider one."""
    if live.cache is None:
        live.__dict__.update(new.__dict__)
        return
    old_n, new_n = len(live.items), len(new.items)
    (_, mask, _), (_, new_mask, _) = live.state(), new.state()
    width = max(mask.shape[1], new_mask.shape[1])

    def merged(a, b, pad_dim: int | None = None):
        if pad_dim is not None:
            a, b = _left_pad(a, width, pad_dim), _left_pad(b, width, pad_dim)
        parts = []
        for k in range(halves):
            parts += [a[k * old_n:(k + 1) * old_n], b[k * new_n:(k + 1) * new_n]]
        return torch.cat(parts) if isinstance(a, torch.Tensor) else [x for part in parts for x in part]

    for old_layer, new_layer in zip(_layers(live.cache), _layers(new.cache), strict=True):
        _GrowingLayer.adopt(old_layer, merged(old_layer.keys, new_layer.keys, 2),
                            merged(old_layer.values, new_layer.values, 2))
    live.mask = merged(live.mask, new.mask, 1)
    live.position = merged(live.position, new.position)
    live.items += new.items
    live.generators += new.generators
    live.tokens += new.tokens


@torch.no_grad()
def decode(model, prompts: list[list[int]], cfg: GenerationConfig, seeds: list[int], stop: torch.Tensor, pad: int,
           rows: int, controls: list[list[int]] | None = None, contrast_weight: float = 1.0,
           on_done: OnDone | None = None, stats: DecodeStats | None = None,
           limits: list[int] | None = None) -> list[list[int]]:
    """Every prompt's completion token ids (the stop token kept), at most ``rows`` items decoding at once.

    ``limits``: each item's own token limit (requests merged by ``rcsd serve``), else ``cfg.max_new_tokens``.
    ``controls``: control prompt i decodes beside prompt i, fed the same tokens, and every step samples from
    (1+w) z_prompt - w z_control (``--teacher-contrast``); an item and its control join and leave together.
    """
    device = stop.device
    stop_set = set(stop.tolist())
    pairs = controls is not None

    def rows_of(items: list[int], n: int) -> list[int]:  # cache rows of the items at these positions
        return items + [n + j for j in items] if pairs else list(items)

    results: list[list[int]] = [[] for _ in prompts]  # each item's tokens, set when it finishes
    live, waiting = _Live(), 0
    logits = None  # [cache rows, vocab]: the next-token logits of every live row
    stats = stats if stats is not None else DecodeStats()
    while waiting < len(prompts) or live.items:
        free = rows - len(live.items)
        if free > 0 and waiting < len(prompts):
            joining = list(range(waiting, min(len(prompts), waiting + free)))
            waiting = joining[-1] + 1
            new, new_logits = _prefill(model, prompts, controls, joining, seeds, pad, device)
            _join(live, new, 2 if pairs else 1)
            logits = new_logits if logits is None else _merge_logits(logits, new_logits, pairs)
        n = len(live.items)
        assert logits is not None  # rows are in flight: the last step (or their prefill) left logits
        z = logits[:n]
        if pairs:
            z = contrast_logits(z.float(), logits[n:].float(), contrast_weight)
        nxt = next_tokens(z, cfg, live.generators).tolist()  # the plain loop reads every token on the host
        keep, finished = [], []
        for j, token in enumerate(nxt):
            live.tokens[j].append(token)
            limit = cfg.max_new_tokens if limits is None else limits[live.items[j]]
            if token in stop_set or len(live.tokens[j]) >= limit:
                results[live.items[j]] = live.tokens[j]
                finished.append(j)
            else:
                keep.append(j)
        if finished and on_done:
            on_done([live.items[j] for j in finished], [live.tokens[j] for j in finished])
        if finished:
            fed_items = keep
            _select(live, keep, rows_of)
        else:
            fed_items = list(range(n))
        if not live.items:
            logits = None
            continue
        fed = torch.tensor([nxt[j] for j in fed_items], device=device)
        fed = torch.cat([fed, fed]) if pairs else fed
        cache, mask, position = live.state()
        live.mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        live.position = position + 1
        out = model(input_ids=fed.unsqueeze(-1), attention_mask=live.mask, position_ids=live.position,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :]
        stats.steps += 1
        stats.live_row_steps += len(live.items)
        stats.slot_steps += rows
    return results


def _merge_logits(old: torch.Tensor, new: torch.Tensor, pairs: bool) -> torch.Tensor:
    if not pairs:
        return torch.cat([old, new])
    a, b = old.shape[0] // 2, new.shape[0] // 2
    return torch.cat([old[:a], new[:b], old[a:], new[b:]])


def _prefill(model, prompts, controls, joining: list[int], seeds: list[int], pad: int, device
             ) -> tuple[_Live, torch.Tensor]:
    """The joining items' prompts (then their controls) left-padded into one batch and run through the model."""
    rows_in = [prompts[i] for i in joining] + ([controls[i] for i in joining] if controls is not None else [])
    input_ids, mask, position = left_padded(rows_in, pad, device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    _layers(out.past_key_values)
    new = _Live(items=list(joining), generators=[torch.Generator(device=device).manual_seed(seeds[i])
                                                 for i in joining],
                tokens=[[] for _ in joining], cache=out.past_key_values, mask=mask, position=position[:, -1:])
    for layer in out.past_key_values.layers:
        _GrowingLayer.adopt(layer, layer.keys, layer.values)
    return new, out.logits[:, -1, :]
