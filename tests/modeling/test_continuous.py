"""Continuous batching (``modeling/continuous``): a row that stops is refilled with the next prompt. Its tokens are
the static batches' tokens, item by item, while it runs fewer decode steps with fuller batches."""

import pytest
import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.modeling.continuous import DecodeStats
from rcsd_cli.modeling.generation import _static_batches, generate
from rcsd_cli.models import load_model

CPU = torch.device("cpu")
SAMPLED = GenerationConfig(max_new_tokens=24, temperature=1.0, top_k=20, batch_size=3)
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4, 300, 2000], [1, 7] * 6, [1, 8, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
           [1, 300], [1, 12, 13, 14]]
SEEDS = [101 + i for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def stopping(tiny_model):
    """The tiny model with a stop token chosen so that sampled rows stop at different steps (greedy, the random
    model repeats one token per row)."""
    lm = load_model(str(tiny_model), device=CPU)
    free = _static_batches(lm.model, lm.tokenizer, PROMPTS, SAMPLED, SEEDS)
    first = {}  # token -> the steps at which it first turns up in some row
    for g in free:
        for t in set(g.token_ids):
            first.setdefault(t, set()).add(g.token_ids.index(t))
    stop_id = max(first, key=lambda t: len(first[t] - {0}))  # stops rows at the most distinct steps
    lm.model.generation_config.eos_token_id = stop_id
    lm.tokenizer.eos_token_id = stop_id
    return lm


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_gives_the_static_batches_tokens_in_fewer_steps(stopping, temperature):
    cfg = SAMPLED.model_copy(update={"temperature": temperature})
    static = _static_batches(stopping.model, stopping.tokenizer, PROMPTS, cfg, SEEDS)
    seen, stats = [], DecodeStats()
    out = generate(stopping.model, stopping.tokenizer, PROMPTS, cfg, 0, seeds=SEEDS, stats=stats,
                   on_done=lambda idx, gens: seen.extend(zip(idx, [g.token_ids for g in gens], strict=True)))
    assert [(g.token_ids, g.finish_reason) for g in out] == [(g.token_ids, g.finish_reason) for g in static]
    lengths = [len(g.token_ids) for g in static]
    assert sorted(seen) == sorted((i, g.token_ids) for i, g in enumerate(out))  # each item reported once
    assert stats.live_row_steps == sum(n - 1 for n in lengths)  # every forward row was still generating
    if temperature == 0:
        return
    assert len(set(lengths)) > 2 and "stop" in {g.finish_reason for g in static}  # rows stop at different steps
    # a static batch steps until its longest row is done; continuously, rows are busy until the queue drains
    static_steps = sum(max(lengths[s:s + 3]) - 1 for s in range(0, len(PROMPTS), 3))
    assert stats.steps < static_steps
    assert stats.occupancy > sum(n - 1 for n in lengths) / (3 * static_steps)


def test_contrastive_items_join_and_leave_with_their_controls(stopping):
    controls = [[1, 7, 7], [1, 3000, 12, 9, 9, 9, 9], [1, 8]] * 3
    prompts = PROMPTS[:len(controls) - 1] + [PROMPTS[0]]
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=20, batch_size=2)
    seeds = list(range(len(prompts)))
    static = _static_batches(stopping.model, stopping.tokenizer, prompts, cfg, seeds, None, controls, 1.5)
    out = generate(stopping.model, stopping.tokenizer, prompts, cfg, 0, seeds=seeds, controls=controls,
                   contrast_weight=1.5)
    assert [g.token_ids for g in out] == [g.token_ids for g in static]
    assert len({len(g.token_ids) for g in out}) > 1


def test_an_item_samples_the_same_whatever_batch_it_decodes_in(stopping):
    """Per-item seeds: batch sizes 1, 3 and 8 (different neighbours, join orders and cache widths) agree."""
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.2, top_p=0.9, top_k=30)
    runs = [[g.token_ids for g in generate(stopping.model, stopping.tokenizer, PROMPTS,
                                           cfg.model_copy(update={"batch_size": b}), seed=5)] for b in (1, 3, 8)]
    assert runs[0] == runs[1] == runs[2]


def test_compiled_slots_refill_in_fixed_shapes_with_the_plain_loops_tokens(stopping):
    """The compiled loop batches continuously too (``_decode_static``: slots of a static cache refilled at each look
    every few tokens): the same tokens as the plain loop, per-request limits kept, and refills (eager prefills)
    never recompile the decode step."""
    cfg = SAMPLED.model_copy(update={"compile_decoding": True})
    limits = [24, 5, 24, 9, 24, 1, 24, 17]
    plain = generate(stopping.model, stopping.tokenizer, PROMPTS, SAMPLED, 0, seeds=SEEDS, limits=limits)
    stats = DecodeStats()
    compiled = generate(stopping.model, stopping.tokenizer, PROMPTS, cfg, 0, seeds=SEEDS, limits=limits, stats=stats)
    assert [(g.token_ids, g.finish_reason) for g in compiled] == [(g.token_ids, g.finish_reason) for g in plain]
    assert all(len(g.token_ids) <= n for g, n in zip(compiled, limits, strict=True))
    lengths = [len(g.token_ids) for g in _static_batches(stopping.model, stopping.tokenizer, PROMPTS, SAMPLED, SEEDS)]
    assert stats.steps < sum(max(lengths[s:s + 3]) - 1 for s in range(0, len(PROMPTS), 3))
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(stopping.model, stopping.tokenizer, PROMPTS[::-1], cfg, 0, seeds=SEEDS[::-1])
    assert [g.token_ids for g in again] == [g.token_ids for g in generate(
        stopping.model, stopping.tokenizer, PROMPTS[::-1], SAMPLED, 0, seeds=SEEDS[::-1])]
