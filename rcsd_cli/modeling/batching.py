"""Build aligned [prompt || completion] tensors for teacher and student from token ids.

Each sequence is right-padded; position ids are the running count of real tokens, so they are
correct whatever the padding. For completion token t of row i the predicting position is
``len(prompt_i) + t - 1``, which differs between teacher and student (their prompts differ in
length): the index tensors returned here line both up on the same completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcsd_cli.modeling.sharding import FinalHidden, compute_device


def left_padded(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]:
    """(ids, attention mask, position ids) [n, longest] of prompts left-padded for decoding: every row's last
    token in the last column, positions counting real tokens only."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p):] = 1
    ids, attention = ids.to(device), attention.to(device)
    return ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


@dataclass
class SideBatch:
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor    # [B, L]
    predict_index: torch.Tensor   # [B, C]: position whose output predicts completion token t


@dataclass
class PairBatch:
    student: SideBatch
    teacher: SideBatch
    targets: torch.Tensor  # [B, C] completion token ids (pad where masked)
    mask: torch.Tensor     # [B, C] 1 for real completion tokens


def _side(prompts: list[list[int]], completions: list[list[int]], pad_id: int, width_c: int) -> SideBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    index = torch.zeros((len(prompts), width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : lengths[i]] = 1
        index[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        index[i, len(c):] = len(p) - 1  # masked positions point somewhere valid
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return SideBatch(ids, attn, pos, index)


def build_pair_batch(student_prompts: list[list[int]], teacher_prompts: list[list[int]],
                     completions: list[list[int]], pad_id: int, skip_first: int = 0) -> PairBatch:
    """Tensors for one micro-batch; ``skip_first`` masks the first N completion tokens."""
    if not (len(student_prompts) == len(teacher_prompts) == len(completions)):
        raise ValueError("student prompts, teacher prompts and completions differ in number")
    if any(len(p) == 0 for p in student_prompts + teacher_prompts):
        raise ValueError("empty prompt")
    width_c = max(1, max(len(c) for c in completions))
    targets = torch.full((len(completions), width_c), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width_c), dtype=torch.long)
    for i, c in enumerate(completions):
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, skip_first: len(c)] = 1
    return PairBatch(_side(student_prompts, completions, pad_id, width_c),
                     _side(teacher_prompts, completions, pad_id, width_c), targets, mask)


def aligned_hidden(model, side: SideBatch) -> torch.Tensor:
    """Final hidden states at the predicting positions: [B, C, H] (no vocabulary logits)."""
    device = compute_device(model)
    inputs = dict(input_ids=side.input_ids.to(device), attention_mask=side.attention_mask.to(device),
                  position_ids=side.position_ids.to(device))
    if isinstance(model, FinalHidden):  # sharded: go through the root so its parameters are gathered
        hidden = model(**inputs)
    else:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # unwrap a peft model
        hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state  # no KV cache to build
    index = side.predict_index.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)
