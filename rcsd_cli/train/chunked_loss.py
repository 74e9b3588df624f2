"""The distillation loss over a batch's completion positions, chunk by chunk, so [batch, time, vocab]
logits never exist at once. Three parts, each with one job:

- ``teacher_targets``: one chunk's teacher side, without gradient: its logits in the compute precision pick
  the top-k (after ``--teacher-contrast``'s contrast), and the logits the loss reads are computed in fp32 at
  those k entries only (the whole vocabulary for the other losses);
- ``losses.token_loss`` and ``losses.token_diagnostics`` (pure, per position): the loss, its clip share, the
  unclipped forward KL and top-1 agreement — what diagnose and explain report too;
- ``LossSums``: the masked sums of a whole batch, kept on the device (no host sync per chunk).

Each chunk's student logits are recomputed in the backward pass (activation checkpointing) instead of
kept, unless there is only one chunk, where recomputing would save nothing. A teacher known only by its
top-k log-probs (``TeacherTopK``: stored by ``score --teacher-logprobs`` for an offline round, or answered by
a teacher server) goes through the same loop: log-probs differ from logits by one constant per position,
which the loss's renormalisation over the k entries removes, so the loss is the one the teacher's logits give.

Precision: the heads run in the compute precision (bf16 under autocast) only to pick the teacher's top-k
and for the diagnostics; the logits the loss reads are computed in fp32 (``fp32_logits``), so the loss and
its gradient do not depend on bf16 rounding of the logits or on the CPU's bf16 kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from rcsd_cli.configs.groups import LossConfig
from rcsd_cli.modeling.logprobs import contrast_logits, fp32_logits
from rcsd_cli.train.losses import (
    entropy,
    restricts_to_teacher_topk,
    token_diagnostics,
    token_loss,
)


@dataclass
class TeacherSide:
    """The teacher's final hidden states [B, T, H] aligned with the student's, its output head, and for
    ``--teacher-contrast`` the same teacher under its control context (subtracted with ``contrast_weight``)."""

    hidden: torch.Tensor
    head: torch.nn.Module
    control_hidden: torch.Tensor | None = None
    contrast_weight: float = 1.0


@dataclass
class TeacherTopK:
    """A teacher known by its top-k only: entry ids and their log-probs (at temperature 1) [B, T, k], aligned
    with the student's completion positions (zeros where masked)."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def from_rows(cls, ids: list[list[list[int]]], logprobs: list[list[list[float]]], width: int,
                  k: int) -> TeacherTopK:
        """Per-row lists of k entries per completion token, laid out [B, width, k] (zeros past each row's end)."""
        t_ids = torch.zeros((len(ids), width, k), dtype=torch.long)
        t_lp = torch.zeros((len(ids), width, k), dtype=torch.float32)
        for i, (row_ids, row_lp) in enumerate(zip(ids, logprobs, strict=True)):
            if row_ids:
                t_ids[i, : len(row_ids)] = torch.tensor(row_ids)
                t_lp[i, : len(row_lp)] = torch.tensor(row_lp)
        return cls(t_ids, t_lp)

    def to(self, device: torch.device) -> TeacherTopK:
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device))


@dataclass
class TeacherTargets:
    """One chunk's teacher: the logits the loss reads (fp32; at ``index`` when the loss reads the top-k only),
    and the compute-precision logits over the whole vocabulary that picked them (None: only the top-k is known)."""

    logits: torch.Tensor
    index: torch.Tensor | None
    full: torch.Tensor | None

    def top1(self) -> torch.Tensor:
        """The teacher's most likely token id per position."""
        if self.full is not None:
            return self.full.argmax(-1)
        assert self.index is not None
        return self.index.gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1)


@dataclass
class LossSums:
    """Masked sums over a batch's loss positions, on the device until the step's one read."""

    loss: torch.Tensor  # per-token losses summed (no gradient)
    weighted: torch.Tensor  # the same with each row's tokens weighted: what is backpropagated
    kl: torch.Tensor  # unclipped top-k forward KL
    agree: torch.Tensor  # teacher-student top-1 agreement
    health: dict[str, torch.Tensor] = field(default_factory=dict)  # entropies, clip share (token sums)

    @classmethod
    def zeros(cls, like: torch.Tensor) -> LossSums:
        return cls(like.new_zeros(()), like.new_zeros(()), like.new_zeros((), dtype=torch.float32),
                   like.new_zeros((), dtype=torch.float32))

    def add_health(self, name: str, value: torch.Tensor, mask: torch.Tensor) -> None:
        self.health[name] = self.health.get(name, 0.0) + (value.detach().float() * mask).sum()


def chunks(length: int, size: int) -> Iterator[slice]:
    return (slice(start, start + size) for start in range(0, length, size))


def teacher_targets(teacher: TeacherSide | TeacherTopK, sl: slice, loss: LossConfig) -> TeacherTargets:
    """The teacher's side of chunk ``sl`` (call under ``torch.no_grad``)."""
    if isinstance(teacher, TeacherTopK):  # the loss restricts to these k entries (TrainConfig refuses others)
        return TeacherTargets(teacher.logprobs[:, sl].float(), teacher.ids[:, sl], None)
    h_t = teacher.hidden[:, sl].detach()
    h_c = None if teacher.control_hidden is None else teacher.control_hidden[:, sl].detach()
    full = teacher.head(h_t)  # compute precision: picks the top-k
    if h_c is not None:
        full = contrast_logits(full, teacher.head(h_c), teacher.contrast_weight)
    topk = restricts_to_teacher_topk(loss) and loss.top_k < full.shape[-1]
    index = full.topk(loss.top_k, dim=-1).indices if topk else None
    logits = fp32_logits(teacher.head, h_t, index)
    if h_c is not None:
        logits = contrast_logits(logits, fp32_logits(teacher.head, h_c, index), teacher.contrast_weight)
    return TeacherTargets(logits, index, full)


def _checkpointed(fn: Callable, args: tuple, recompute: bool, needs_grad: bool):
    if recompute and torch.is_grad_enabled() and needs_grad:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def chunked_distill_loss(student_hidden: torch.Tensor, student_head: torch.nn.Module,
                         teacher: TeacherSide | TeacherTopK,
                         mask: torch.Tensor, targets: torch.Tensor, loss: LossConfig, *, chunk_size: int = 128,
                         row_weights: torch.Tensor | None = None) -> LossSums:
    """``loss`` over [B, T] completion positions, chunked over T: hidden states aligned so position t predicts
    ``targets[:, t]``; ``row_weights`` [B] weigh each row's tokens in ``LossSums.weighted`` (the reduction).
    Peak logits memory is O(B * chunk_size * V), not O(B * T * V)."""
    mask = mask.float()
    weights = torch.ones(mask.shape[0], device=mask.device) if row_weights is None else row_weights.float()
    sums = LossSums.zeros(student_hidden)
    counted: set[int] = set()  # a chunk recomputed in backward must not count its health twice

    def chunk_loss(h_s, t_logits, index, m, y, w, start):
        s_logits = fp32_logits(student_head, h_s, index)
        terms = token_loss(s_logits, t_logits, y, loss)
        restricted = index is not None
        kl, agree = token_diagnostics(s_logits, t_logits, loss, terms)
        if start not in counted:
            counted.add(start)
            sums.add_health("clip_share", terms.clip_share, m)
            if not restricted:
                sums.add_health("student_entropy", entropy(s_logits.detach()), m)
        per_tok = terms.loss
        agree_part = torch.zeros((), device=m.device) if restricted else (agree * m).sum()
        return (per_tok * m).sum(), (per_tok * m * w.unsqueeze(-1)).sum(), (kl * m).sum(), agree_part

    # One chunk holds all the logits anyway: recomputing it in backward would buy no memory.
    recompute = student_hidden.shape[1] > chunk_size
    for sl in chunks(student_hidden.shape[1], chunk_size):
        m = mask[:, sl]  # a chunk with no token in the loss adds zeros: asking would cost a host sync
        with torch.no_grad():  # the teacher's logits need no graph, and are not recomputed in backward
            t = teacher_targets(teacher, sl, loss)
            if t.full is not None or t.index is None:  # a top-k-only teacher has no whole-vocabulary entropy
                sums.add_health("teacher_entropy", entropy(t.full if t.full is not None else t.logits), m)
            if t.index is not None:  # agreement, entropy: the student's whole distribution (no grad, compute dtype)
                s_full = student_head(student_hidden[:, sl].detach())
                sums.agree += ((s_full.argmax(-1) == t.top1()).float() * m).sum()
                sums.add_health("student_entropy", entropy(s_full), m)
                del s_full
        args = (student_hidden[:, sl], t.logits, t.index, m, targets[:, sl], weights, sl.start)
        chunk_sum, weighted, kl, agree = _checkpointed(chunk_loss, args, recompute, student_hidden.requires_grad)
        del t
        sums.loss = sums.loss + chunk_sum.detach()
        sums.weighted = sums.weighted + weighted
        sums.kl += kl.detach()
        sums.agree += agree.detach()
    return sums
