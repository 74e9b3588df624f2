"""Distillation losses: pure functions, no side effects, tested against hand-computed values.

All per-token losses take logits shaped [..., V] and return [...] (one value per token);
the caller masks prompt and padding positions and normalises by the token count it wants
(the trainer uses the total number of completion tokens across all micro-batches).

- ``distill_token_loss``: generalized JSD with mixing coefficient ``beta`` (0 = forward
  KL(teacher||student), 1 = reverse KL(student||teacher); in between, TRL's convention
  beta*KL(T||M) + (1-beta)*KL(S||M) with M = beta*T + (1-beta)*S), on the full vocabulary
  or on the teacher's top-k entries with both distributions renormalised over them. Logits
  are divided by ``temperature`` first and each (token, entry) term is optionally clipped
  from above at ``clip`` — the reference RCSD run uses forward KL, top-20, T=1.2, clip 0.05.
  ``tail=True`` keeps the mass outside the top-k as one extra entry instead of renormalising.
- ``sampled_token_reverse_kl``: REINFORCE-style estimator on the sampled token only, with
  advantage log p_T - log p_S held constant; O(1) memory per token.
- ``LOSSES`` (``register_loss``): the ``--loss`` choices ``topk_kl``, ``jsd``, ``sampled_rkl``, each a
  pure function of (student logits, teacher logits, sampled ids, ``LossConfig``) returning the
  per-token loss and its clip share. ``token_loss`` is what ``train`` backpropagates and what
  ``diagnose`` and ``explain`` report: one definition, so they cannot disagree.
- ``group_advantages``, ``clipped_policy_loss``, ``k3_kl``: GRPO's pieces.

The chunk loop that applies these over a batch without [batch, time, vocab] logits is ``chunked_loss.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from rcsd_cli.modeling.logprobs import upcast

if TYPE_CHECKING:
    from rcsd_cli.configs.groups import LossConfig


def _restrict(student_logits, teacher_logits, top_k: int | None, tail: bool = False):
    """Logits over the teacher's top-k entries (renormalised later by log_softmax).

    With ``tail`` the remaining vocabulary is kept as one extra entry holding its total mass,
    so the k+1 entries are exact marginals of the full distributions instead of a renormalisation.
    """
    if top_k is None or top_k >= teacher_logits.shape[-1]:
        return student_logits, teacher_logits
    idx = teacher_logits.topk(top_k, dim=-1).indices
    if not tail:
        return student_logits.gather(-1, idx), teacher_logits.gather(-1, idx)
    in_top = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter_(-1, idx, True)
    out = []
    for logits in (student_logits, teacher_logits):
        logp = F.log_softmax(logits, dim=-1)
        rest = torch.logsumexp(logp.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
        out.append(torch.cat([logp.gather(-1, idx), rest], dim=-1))
    return out[0], out[1]


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """[..., k] terms p (log p - log q) of KL(p || q): the one place the formula is written."""
    return log_p.exp() * (log_p - log_q)


def divergence_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.0,
                     top_k: int | None = None, temperature: float = 1.0, tail: bool = False) -> torch.Tensor:
    """[..., k] unclipped terms of the generalized JSD (beta 0: forward KL(teacher||student), 1: reverse KL)."""
    if tail:  # the tail entry needs the full distributions: upcast before restricting
        s, t = _restrict(upcast(student_logits) / temperature, upcast(teacher_logits) / temperature, top_k, tail)
    else:  # gather first: no full-vocabulary fp32 copies
        s, t = _restrict(student_logits, teacher_logits, top_k)
        s, t = upcast(s) / temperature, upcast(t) / temperature
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if beta == 0.0:
        return kl_terms(log_t, log_s)
    if beta == 1.0:
        return kl_terms(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * kl_terms(log_t, log_m) + (1 - beta) * kl_terms(log_s, log_m)


def clipped_sum(terms: torch.Tensor, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss with each term capped at ``clip``, share of the token's terms at the cap)."""
    if clip is None:
        return terms.sum(-1), torch.zeros(terms.shape[:-1], device=terms.device)
    return terms.clamp(max=clip).sum(-1), (terms >= clip).float().mean(-1)


def distill_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.0,
                       top_k: int | None = None, temperature: float = 1.0, clip: float | None = None,
                       tail: bool = False) -> torch.Tensor:
    """Per-token generalized JSD between teacher and student next-token distributions."""
    terms = divergence_terms(student_logits, teacher_logits, beta=beta, top_k=top_k, temperature=temperature,
                             tail=tail)
    return clipped_sum(terms, clip)[0]


def sampled_token_reverse_kl(student_token_logp: torch.Tensor, teacher_token_logp: torch.Tensor) -> torch.Tensor:
    """Per-token loss whose gradient is the sampled estimate of reverse KL's gradient.

    loss = -(log p_T(x) - log p_S(x)).detach() * log p_S(x): the student is pushed up on
    tokens the teacher likes more than it does, and down otherwise.
    """
    advantage = (teacher_token_logp - student_token_logp).detach()
    return -advantage * student_token_logp


# ----------------------------------------------------------------------------- the loss registry


@dataclass
class TokenLoss:
    """One loss on [...] positions: what is backpropagated, and what the clip did."""

    loss: torch.Tensor  # [...] per-token loss, after the clip
    clip_share: torch.Tensor  # [...] share of the token's (token, entry) terms at the clip
    forward_kl: torch.Tensor | None = None  # [...] unclipped top-k forward KL, when the loss is made of its terms


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "LossConfig"], TokenLoss]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str):
    """Add a loss ``fn(student_logits, teacher_logits, targets, cfg) -> TokenLoss`` under ``--loss NAME``."""

    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


def _divergence(student_logits, teacher_logits, cfg, top_k) -> TokenLoss:
    terms = divergence_terms(student_logits, teacher_logits, beta=cfg.beta, top_k=top_k,
                             temperature=cfg.temperature, tail=cfg.tail_bucket)
    loss, share = clipped_sum(terms, cfg.clip)
    forward_kl = terms.detach().sum(-1) if cfg.beta == 0.0 and not cfg.tail_bucket and top_k == cfg.top_k else None
    return TokenLoss(loss, share, forward_kl)


@register_loss("topk_kl")
def topk_kl(student_logits, teacher_logits, targets, cfg) -> TokenLoss:
    """Generalized JSD on the teacher's top-k entries, both distributions renormalised there (or + a tail)."""
    return _divergence(student_logits, teacher_logits, cfg, cfg.top_k)


@register_loss("jsd")
def jsd(student_logits, teacher_logits, targets, cfg) -> TokenLoss:
    """Generalized JSD on the full vocabulary."""
    return _divergence(student_logits, teacher_logits, cfg, None)


@register_loss("sampled_rkl")
def sampled_rkl(student_logits, teacher_logits, targets, cfg) -> TokenLoss:
    """Reverse KL estimated on the sampled token only (REINFORCE with advantage log p_T - log p_S)."""

    def token_logp(logits):
        return F.log_softmax(upcast(logits) / cfg.temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    loss = sampled_token_reverse_kl(token_logp(student_logits), token_logp(teacher_logits))
    return TokenLoss(loss, torch.zeros_like(loss))


def token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               cfg: LossConfig) -> TokenLoss:
    """The loss ``cfg`` names, per position: train backpropagates it, diagnose and explain report it."""
    return LOSSES[cfg.kind](student_logits, teacher_logits, targets, cfg)


def token_diagnostics(student_logits, teacher_logits, cfg: LossConfig, terms: TokenLoss):
    """Per position, without gradient: unclipped top-k forward KL and whether both argmaxes agree."""
    with torch.no_grad():
        kl = terms.forward_kl
        if kl is None:
            kl = divergence_terms(student_logits.detach(), teacher_logits, top_k=cfg.top_k,
                                  temperature=cfg.temperature).sum(-1)
        agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
    return kl, agree


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension (temperature 1), per position."""
    logp = F.log_softmax(upcast(logits), -1)
    return -(logp.exp() * logp).sum(-1)


def distinct_n(sequences: list[list[int]], n: int = 2) -> tuple[int, int]:
    """(distinct n-grams, n-grams) over token sequences: their ratio falls when completions repeat."""
    grams = [tuple(s[i: i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)), len(grams)


def restricts_to_teacher_topk(cfg: LossConfig) -> bool:
    """The loss reads only the teacher's top-k entries (the reference loss), so only their logits are needed."""
    return cfg.kind == "topk_kl" and bool(cfg.top_k) and not cfg.tail_bucket


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards [B, G] normalised within each group of G rollouts of one prompt."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float = 0.2) -> torch.Tensor:
    """Per-token PPO/GRPO surrogate: -min(r A, clip(r, 1-eps, 1+eps) A) with r = p / p_old."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative estimator of KL(policy || reference) on sampled tokens."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1
