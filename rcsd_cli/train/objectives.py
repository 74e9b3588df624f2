"""What one optimizer step computes, per method; the loop around it lives in ``trainer.py``.

- ``rcsd`` / ``opsd`` (self-distillation): one rollout per prompt from the current student; the
  teacher scores the same completion ids behind its privileged prompt (rubric + reference for
  RCSD, the reference answer only for OPSD); loss from ``losses.chunked_distill_loss``.
- ``grpo``: ``group_size`` rollouts per prompt, reward = rubric score from machine checks (or
  answer correctness), group-normalised advantages, clipped-ratio surrogate, optional k3 KL to
  the frozen initial model. One policy update per batch of rollouts (on-policy), so the ratio
  starts at 1 and the clip guards the estimator rather than several epochs of reuse.
- ``sft``: cross-entropy on the reference answer after the student prompt.

Every objective weighs per-token losses by ``reduction_weights`` before ``backward``: with
``--loss-reduction sequence`` the mean over the step's sequences of each one's token mean (the
authors'), with ``token`` the sum over the step's tokens divided by their number. Both count the
whole step across micro-batches and processes, so accumulation leaves the gradient unchanged.
Tasks: ``reasoner`` answers questions; ``rubric-generator`` (stage I) writes rubrics, its teacher
additionally seeing the reference rubric.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.rows import Rubric
from rcsd_cli.evaluation.scoring import JUDGE_REPLY, score_completion, score_with_judge
from rcsd_cli.modeling.batching import SideBatch, aligned_hidden, build_pair_batch
from rcsd_cli.modeling.generation import generate, item_seed
from rcsd_cli.modeling.logprobs import chunked_token_logprobs
from rcsd_cli.rubrics.prompts import (
    analysis_prompt,
    reference_target,
    student_prompt,
    teacher_prompt,
    transition_ids,
)
from rcsd_cli.rubrics.rubric_gen import InvalidRubric, parse_rubric_output
from rcsd_cli.train.losses import chunked_distill_loss, clipped_policy_loss, distinct_n, group_advantages, k3_kl
from rcsd_cli.train.phases import no_clock

Number = float | torch.Tensor  # a 0-d device tensor until the step's one read (``StepResult.read``)


@dataclass
class StepResult:
    """One process's sums for a step. Sums computed on the device stay there while the step runs: an objective
    never asks the device for a value (no host sync inside the step); ``read`` fetches them all at once."""

    loss_sum: Number
    tokens: int
    kl_sum: Number | None
    agree_sum: Number | None
    reward: float | None
    rollout_tokens: int
    reward_count: int = 0  # rollouts the mean reward is over (to combine processes)
    objective: Number | None = None  # this process's share of the step's loss under --loss-reduction
    judge_unjudged: int | None = None  # --reward judge: criteria left unjudged this step
    reward_unscored: int | None = None  # --reward judge: rollouts given their group's mean
    health: dict = field(default_factory=dict)  # sums: entropies and clip share over tokens, n-gram and length counts

    def read(self, device: torch.device, combine=None) -> StepResult:
        """Every figure as a Python number, summed over processes by ``combine`` (an in-place all-reduce of a
        float64 tensor; ``tokens`` is already global): one tensor, one collective, one host read."""
        names = ["loss_sum", "kl_sum", "agree_sum", "objective", "rollout_tokens", "reward_count",
                 "judge_unjudged", "reward_unscored"]
        values = [getattr(self, n) for n in names]
        health = sorted(self.health)
        reward_total = None if self.reward is None else self.reward * self.reward_count
        values += [self.health[k] for k in health] + [reward_total]
        present = [v is not None for v in values]
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                            for v in values if v is not None])
        if combine is not None:
            combine(flat)
        it = iter(flat.tolist())
        got = [next(it) if here else None for here in present]
        out = dict(zip(names, got[: len(names)], strict=True))
        reward_total, count = got[-1], out["reward_count"]
        for n in ("rollout_tokens", "reward_count", "judge_unjudged", "reward_unscored"):
            out[n] = None if out[n] is None else int(round(out[n]))
        reward = self.reward if combine is None else reward_total / count if reward_total is not None and count \
            else None
        return StepResult(out["loss_sum"], int(self.tokens), out["kl_sum"], out["agree_sum"], reward,
                          out["rollout_tokens"], out["reward_count"], out["objective"], out["judge_unjudged"],
                          out["reward_unscored"], dict(zip(health, got[len(names): -1], strict=True)))


@dataclass
class StepContext:
    student: object
    tokenizer: object
    teacher_hidden: Callable[[SideBatch], torch.Tensor]  # no-grad hidden states of the teacher
    teacher_head: object
    cfg: TrainConfig
    step: int
    teacher_generate: Callable | None = None  # (prompts, generation config, seeds) -> generations, no grad
    rank: int = 0
    student_generate: Callable | None = None  # as teacher_generate, from the current student (default: HF)
    clock: Callable = no_clock  # phases.PhaseClock: with ctx.clock("rollout"): ...
    compute: Callable = nullcontext  # precision.compute: forward passes run in it, backward outside it
    judge: object | None = None  # --reward judge: the judge backend, opened once per run
    controls: dict | None = None  # --teacher-contrast: item id -> the row of its control context

    def student_samples(self, prompts, gen_cfg, seeds):
        if self.student_generate is not None:
            return self.student_generate(prompts, gen_cfg, seeds)
        return generate(self.student, self.tokenizer, prompts, gen_cfg, 0, seeds=seeds)

    def global_sum(self, value: float) -> float:
        """Sum over data-parallel processes (identity in one process)."""
        from rcsd_cli.modeling.distributed import reduce_sum

        return reduce_sum(value)


# ----------------------------------------------------------------------------- a train config's prompts


def student_thinking(cfg) -> bool | None:
    return cfg.generation.enable_thinking


def teacher_thinking(cfg) -> bool | None:
    """The teacher's enable_thinking: its own setting, else the student's."""
    own = cfg.teacher.thinking
    return student_thinking(cfg) if own is None else own


def teacher_view(cfg: TrainConfig) -> dict:
    """The settings the teacher's prompts depend on (``rubrics.prompts`` keywords)."""
    return dict(style=cfg.prompt_style, thinking=teacher_thinking(cfg), method=cfg.method,
                context=cfg.teacher.context, ablation=cfg.teacher.rubric_ablation)


def student_ids(tok, row: Rubric, cfg: TrainConfig) -> list[int]:
    return student_prompt(tok, row, style=cfg.prompt_style, thinking=student_thinking(cfg), task=cfg.task)


def teacher_ids(tok, row: Rubric, cfg: TrainConfig) -> list[int]:
    """The teacher's privileged prompt (not reason-first: that one is built from a sampled analysis)."""
    return teacher_prompt(tok, row, task=cfg.task, **teacher_view(cfg))


def control_ids(tok, row: Rubric, cfg: TrainConfig, control: Rubric) -> list[int]:
    """``--teacher-contrast``: the teacher prompt under the control context."""
    view = teacher_view(cfg)
    if cfg.teacher.contrast == "reference":
        view["method"] = "opsd"  # the reference alone, as OPSD's teacher sees it
    return teacher_prompt(tok, control, task=cfg.task, **view)


def reason_first(cfg: TrainConfig) -> bool:
    """Whether the teacher writes an analysis before it reads the completion (the authors' two-turn teacher)."""
    return cfg.teacher.context == "reason-first" and cfg.task == "reasoner" and cfg.method in ("rcsd", "opsd")


def item_prompts(tok, row: Rubric, cfg: TrainConfig) -> dict[str, list[int]]:
    """The token ids of an item's prompts: the student's, and the teacher's (reason-first: its analysis prompt
    and the transition after the analysis) when the method distils."""
    ids = {"student_prompt": student_ids(tok, row, cfg)}
    if reason_first(cfg):
        ids["analysis_prompt"] = analysis_prompt(tok, row, **teacher_view(cfg))
        ids["transition"] = transition_ids(tok, row, **teacher_view(cfg))
    elif cfg.method in ("rcsd", "opsd"):
        ids["teacher_prompt"] = teacher_ids(tok, row, cfg)
    return ids


def longest_lengths(cfg: TrainConfig, every: list[dict[str, list[int]]]) -> dict[str, int]:
    """The longest prompt on each side over ``item_prompts`` of every item (a reason-first teacher prompt with
    its analysis at ``--analysis-max-new-tokens``), and the completion limit: what sizes a run's memory and its
    engines' ``max_model_len``."""

    def teacher(ids: dict) -> int:
        if "analysis_prompt" in ids:
            return len(ids["analysis_prompt"]) + cfg.reason_first.max_new_tokens + len(ids["transition"])
        return len(ids.get("teacher_prompt", ids["student_prompt"]))

    return {"student_prompt": max(len(ids["student_prompt"]) for ids in every),
            "teacher_prompt": max(map(teacher, every)), "completion": cfg.generation.max_new_tokens}


def teacher_prompt_length(tok, row: Rubric, cfg: TrainConfig) -> int:
    """Tokens of the prompt the teacher is given before any sampled text: the analysis prompt for
    reason-first (the authors' 2048-token filter measured that one), else the whole teacher prompt."""
    if cfg.teacher.context == "reason-first" and cfg.task == "reasoner":
        return len(analysis_prompt(tok, row, **teacher_view(cfg)))
    return len(teacher_ids(tok, row, cfg))


def within_teacher_prompt_limit(rows: list[Rubric], tok, cfg: TrainConfig) -> tuple[list[Rubric], int]:
    """The rows whose teacher prompt fits ``--max-teacher-prompt-tokens``, and how many were dropped."""
    if not cfg.max_teacher_prompt_tokens:
        return rows, 0
    kept = [r for r in rows if teacher_prompt_length(tok, r, cfg) <= cfg.max_teacher_prompt_tokens]
    return kept, len(rows) - len(kept)


def reason_first_teacher_prompts(ctx: StepContext, rows: list[Rubric]) -> list[list[int]]:
    """[analysis prompt ‖ sampled analysis ‖ transition] per row, ready for the rollout ids.

    The analysis is sampled afresh every step (its own temperature, top-p, top-k and length) by
    the frozen teacher, or by the current student with ``--analysis-by student``.
    """
    cfg, tok = ctx.cfg, ctx.tokenizer
    asks = [analysis_prompt(tok, r, **teacher_view(cfg)) for r in rows]
    gen_cfg = GenerationConfig(max_new_tokens=cfg.reason_first.max_new_tokens, temperature=cfg.reason_first.temperature,
                               top_p=cfg.reason_first.top_p, top_k=cfg.reason_first.top_k,
                               batch_size=cfg.generation.batch_size)
    seeds = [item_seed(cfg.seed, "analysis", ctx.step, r.id) for r in rows]
    with ctx.clock("analysis"):
        if cfg.reason_first.by == "teacher":
            analyses = ctx.teacher_generate(asks, gen_cfg, seeds)
        else:
            analyses = ctx.student_samples(asks, gen_cfg, seeds)
    return [ask + analysis.token_ids + transition_ids(tok, row, **teacher_view(cfg))
            for row, ask, analysis in zip(rows, asks, analyses, strict=True)]


def reduction_weights(ctx: StepContext, counts: list[int]) -> list[float]:
    """Per-sequence weight of each token's loss, so one step's loss is exact whatever the batching.

    ``token``: every token weighs 1 / (completion tokens of the step, all processes).
    ``sequence`` (the authors'): a sequence of n tokens weighs each by 1 / (n * sequences of the
    step, all processes), i.e. the mean over sequences of per-sequence token means. Sequences
    with no token in the loss count for neither.
    """
    if ctx.cfg.loss_reduction == "token":
        total = max(ctx.global_sum(sum(counts)), 1)
        return [1.0 / total] * len(counts)
    sequences = max(ctx.global_sum(sum(1 for n in counts if n > 0)), 1)
    return [1.0 / (n * sequences) if n > 0 else 0.0 for n in counts]


def accumulate(ctx: StepContext, n: int, micro_step) -> tuple[float, dict[str, float]]:
    """Every method's micro-batch loop: ``micro_step(rows)`` returns (weighted loss, {name: sum}).

    Each micro-batch's weighted loss is backpropagated as soon as it exists (gradients add up in
    ``.grad``; the weights make the sum the step's loss); returns the objective and the summed stats, as
    device tensors (read once per step, ``StepResult.read``).
    """
    objective, sums = 0.0, {}
    for j in range(0, n, ctx.cfg.micro_batch_size):
        weighted, stats = micro_step(slice(j, j + ctx.cfg.micro_batch_size))
        with ctx.clock("student"):
            weighted.backward()
        objective = objective + weighted.detach()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
    return objective, sums


def sequence_logprobs(ctx: StepContext, prompts, continuations, sl: slice, health: dict | None = None):
    """The student's log-prob of each continuation token after its prompt, for micro-batch ``sl``.

    Returns (log-probs [B, T], mask [B, T] on the student's device, the pair batch); call it under
    ``ctx.compute()`` so the forward runs in the run's precision. ``health`` receives the token sum of
    the student's entropy at those positions.
    """
    pb = build_pair_batch(prompts[sl], prompts[sl], continuations[sl], ctx.tokenizer.pad_token_id)
    hidden = aligned_hidden(ctx.student, pb.student)
    dev = hidden.device
    entropies: dict | None = {} if health is not None else None
    logp = chunked_token_logprobs(hidden, ctx.student.get_output_embeddings(), pb.targets.to(dev),
                                  ctx.cfg.chunk_size, entropies=entropies)
    mask = pb.mask.to(dev).float()
    if health is not None:
        ent = torch.cat([entropies[k] for k in sorted(entropies)], dim=1)
        health["student_entropy"] = health.get("student_entropy", 0.0) + (ent * mask).sum().detach()
    return logp, mask, pb


def rollout_reward(row: Rubric, text: str, cfg: TrainConfig) -> float:
    """Reasoner: rubric score from machine checks (unjudgeable -> 0) or correctness; stage I: valid rubric."""
    if cfg.task == "rubric-generator":
        try:
            parse_rubric_output(text, "paper" if cfg.prompt_style == "paper" else "short")
            return 1.0
        except InvalidRubric:
            return 0.0
    s = score_completion("rollout", row, row.rubric, text)
    if cfg.grpo.reward == "correct":
        return float(bool(s.correct))
    return s.score if s.score is not None else 0.0


def rollouts(ctx: StepContext, prompts: list[list[int]], keys: list) -> list:
    """Student samples; each seeded by (seed, step, item), so a rollout does not depend on the batch
    it lands in, the number of processes, or ``--gen-batch-size``."""
    cfg = ctx.cfg
    seeds = [item_seed(cfg.seed, "rollout", ctx.step, *key) for key in keys]
    with ctx.clock("rollout"):
        return ctx.student_samples(prompts, cfg.generation, seeds)


# ----------------------------------------------------------------------------- objectives


def distill_step(ctx: StepContext, rows: list[Rubric]) -> StepResult:
    cfg, tok = ctx.cfg, ctx.tokenizer
    s_prompts = [student_ids(tok, r, cfg) for r in rows]
    if cfg.teacher.context == "reason-first" and cfg.task == "reasoner":
        t_prompts = reason_first_teacher_prompts(ctx, rows)
    else:
        t_prompts = [teacher_ids(tok, r, cfg) for r in rows]
    gens = rollouts(ctx, s_prompts, [(r.id,) for r in rows])
    completions = [g.token_ids for g in gens]
    rewards = [rollout_reward(r, g.text, cfg) for r, g in zip(rows, gens, strict=True)]
    c_prompts = [control_ids(tok, r, cfg, ctx.controls[r.id]) for r in rows] if ctx.controls else None
    res = distill_backward(ctx, s_prompts, t_prompts, completions, c_prompts)
    res.reward, res.reward_count = sum(rewards) / len(rewards), len(rewards)
    res.health.update(rollout_health(gens))
    return res


def rollout_health(gens) -> dict:
    """Counts behind distinct-2 and the share of rollouts cut at the token limit."""
    distinct, bigrams = distinct_n([g.token_ids for g in gens], 2)
    return {"distinct_bigrams": distinct, "bigrams": bigrams, "completions": len(gens),
            "truncated": sum(g.finish_reason == "length" for g in gens)}


def distill_backward(ctx: StepContext, s_prompts, t_prompts, completions, c_prompts=None) -> StepResult:
    """Accumulate the distillation gradient over micro-batches (weights from ``reduction_weights``);
    ``c_prompts``: the teacher's control prompts of ``--teacher-contrast``."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    counts = [max(len(c) - cfg.skip_first_tokens, 0) for c in completions]
    weights = reduction_weights(ctx, counts)
    total = max(ctx.global_sum(sum(counts)), 1)
    s_head = ctx.student.get_output_embeddings()
    health: dict = {}

    def micro_step(sl):
        pb = build_pair_batch(s_prompts[sl], t_prompts[sl], completions[sl], tok.pad_token_id, cfg.skip_first_tokens)
        with torch.no_grad(), ctx.clock("teacher"):
            t_hidden = ctx.teacher_hidden(pb.teacher)
            c_hidden = None
            if c_prompts is not None:
                pc = build_pair_batch(s_prompts[sl], c_prompts[sl], completions[sl], tok.pad_token_id,
                                      cfg.skip_first_tokens)
                c_hidden = ctx.teacher_hidden(pc.teacher)
        with ctx.clock("student"), ctx.compute():
            s_hidden = aligned_hidden(ctx.student, pb.student)
            dev = s_hidden.device
            loss_sum, kl_sum, agree_sum, weighted = chunked_distill_loss(
                s_hidden, t_hidden, s_head, ctx.teacher_head, pb.mask.to(dev), pb.targets.to(dev), cfg.loss,
                chunk_size=cfg.chunk_size, row_weights=torch.tensor(weights[sl], device=dev), health=health,
                control_hidden=c_hidden, contrast_weight=cfg.teacher.contrast_weight)
        return weighted, {"loss": loss_sum, "kl": kl_sum, "agree": agree_sum}

    objective, sums = accumulate(ctx, len(completions), micro_step)
    return StepResult(sums.get("loss", 0.0), total, sums.get("kl", 0.0), sums.get("agree", 0.0), None,
                      sum(len(c) for c in completions), objective=objective, health=health)


def grpo_step(ctx: StepContext, rows: list[Rubric]) -> StepResult:
    cfg, tok, G = ctx.cfg, ctx.tokenizer, ctx.cfg.grpo.group_size
    group_rows = [r for r in rows for _ in range(G)]
    prompts = [student_ids(tok, r, cfg) for r in group_rows]
    gens = rollouts(ctx, prompts, [(r.id, j % G) for j, r in enumerate(group_rows)])
    completions = [g.token_ids for g in gens]
    judged = {}
    if cfg.grpo.reward == "judge":
        reward_list, judged = judged_rewards(ctx, group_rows, [g.text for g in gens])
    else:
        reward_list = [rollout_reward(r, g.text, cfg) for r, g in zip(group_rows, gens, strict=True)]
    res = grpo_backward(ctx, prompts, completions, reward_list, rollout_health(gens))
    res.reward, res.reward_count = sum(reward_list) / len(reward_list), len(group_rows)
    for name, value in judged.items():
        setattr(res, name, value)
    return res


def grpo_backward(ctx: StepContext, prompts, completions, reward_list: list[float], health: dict) -> StepResult:
    """The policy gradient of ``group_size`` rollouts per prompt (consecutive), rewards given."""
    cfg, G = ctx.cfg, ctx.cfg.grpo.group_size
    rewards = torch.tensor(reward_list, dtype=torch.float32)
    advantages = group_advantages(rewards.view(-1, G)).view(-1)
    total = max(ctx.global_sum(sum(len(c) for c in completions)), 1)
    weights = reduction_weights(ctx, [len(c) for c in completions])

    def micro_step(sl):
        with ctx.clock("student"), ctx.compute():
            logp, mask, pb = sequence_logprobs(ctx, prompts, completions, sl, health)
            dev = logp.device
            per_tok = clipped_policy_loss(logp, logp.detach(), advantages[sl].to(dev).unsqueeze(-1), cfg.grpo.clip_eps)
        stats = {}
        if cfg.grpo.kl_coef > 0:
            with torch.no_grad(), ctx.clock("teacher"):
                ref_logp = chunked_token_logprobs(ctx.teacher_hidden(pb.student), ctx.teacher_head,
                                                  pb.targets.to(dev), cfg.chunk_size)
            kl = k3_kl(logp, ref_logp)
            per_tok = per_tok + cfg.grpo.kl_coef * kl
            stats["kl"] = (kl.detach() * mask).sum()
        with ctx.clock("student"), ctx.compute():
            stats["loss"] = (per_tok * mask).sum().detach()
            weighted = (per_tok * mask * torch.tensor(weights[sl], device=dev).unsqueeze(-1)).sum()
        return weighted, stats

    objective, sums = accumulate(ctx, len(completions), micro_step)
    return StepResult(sums.get("loss", 0.0), total, sums.get("kl", 0.0) if cfg.grpo.kl_coef > 0 else None, None,
                      None, sum(len(c) for c in completions), objective=objective, health=health)


def judged_rewards(ctx: StepContext, rows: list[Rubric], texts: list[str]) -> tuple[list[float], dict]:
    """``--reward judge``: each rollout's rubric score with unchecked criteria judged by the judge model.

    A rollout with no judged positive criterion has no score; it gets its group's mean (so its advantage is
    0) rather than a silent 0, and the step records how many criteria and rollouts that affected."""
    cfg, G = ctx.cfg, ctx.cfg.grpo.group_size
    items = [(f"{r.id}:{j % G}", r, r.rubric, t) for j, (r, t) in enumerate(zip(rows, texts, strict=True))]
    with ctx.clock("reward"):
        scores = score_with_judge(ctx.judge, items, JUDGE_REPLY, cfg.grpo.judge_retries,
                                  item_seed(cfg.seed, "judge", ctx.step, ctx.rank))
    raw = [s.score for s in scores]
    rewards = []
    for g in range(0, len(raw), G):
        group = raw[g: g + G]
        known = [x for x in group if x is not None]
        fill = sum(known) / len(known) if known else 0.0
        rewards += [fill if x is None else x for x in group]
    return rewards, {
        "judge_unjudged": sum(s.n_unjudged for s in scores), "reward_unscored": sum(x is None for x in raw)}


def sft_step(ctx: StepContext, rows: list[Rubric]) -> StepResult:
    cfg, tok = ctx.cfg, ctx.tokenizer
    prompts = [student_ids(tok, r, cfg) for r in rows]
    targets_ids = [reference_target(tok, r, style=cfg.prompt_style, task=cfg.task) for r in rows]
    return sft_backward(ctx, prompts, targets_ids)


def sft_backward(ctx: StepContext, prompts, targets_ids) -> StepResult:
    """Cross-entropy on the given targets after their prompts."""
    total = max(ctx.global_sum(sum(len(t) for t in targets_ids)), 1)
    weights = reduction_weights(ctx, [len(t) for t in targets_ids])
    health: dict = {}

    def micro_step(sl):
        with ctx.clock("student"), ctx.compute():
            logp, mask, _ = sequence_logprobs(ctx, prompts, targets_ids, sl, health)
            per_tok = -(logp * mask)
            weighted = (per_tok * torch.tensor(weights[sl], device=logp.device).unsqueeze(-1)).sum()
        return weighted, {"loss": per_tok.detach().sum()}

    objective, sums = accumulate(ctx, len(prompts), micro_step)
    return StepResult(sums.get("loss", 0.0), total, None, None, None, 0, objective=objective, health=health)


OBJECTIVES = {"rcsd": distill_step, "opsd": distill_step, "grpo": grpo_step, "sft": sft_step}

__all__ = ["OBJECTIVES", "StepContext", "StepResult"]


# ----------------------------------------------------------------------------- offline round


@dataclass
class OfflineItem:
    """A stored sample with its teacher's top-k (ids, log-probs) per completion token."""

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_ids: list[list[int]]
    teacher_logprobs: list[list[float]]


def offline_step(ctx: StepContext, items: list[OfflineItem]) -> StepResult:
    """Distil towards stored teacher top-k log-probs: no sampling and no teacher forward."""
    from torch.utils.checkpoint import checkpoint

    from rcsd_cli.train.losses import stored_topk_distill_loss

    cfg, tok = ctx.cfg, ctx.tokenizer
    counts = [max(len(it.completion_ids) - cfg.skip_first_tokens, 0) for it in items]
    total = max(ctx.global_sum(sum(counts)), 1)
    weights = reduction_weights(ctx, counts)
    head = ctx.student.get_output_embeddings()

    def micro_step(rows):
        part = items[rows]
        prompts = [it.prompt_ids for it in part]
        pb = build_pair_batch(prompts, prompts, [it.completion_ids for it in part], tok.pad_token_id,
                              cfg.skip_first_tokens)
        with ctx.compute():
            hidden = aligned_hidden(ctx.student, pb.student)
            dev = hidden.device
            k = len(part[0].teacher_ids[0])
            t_ids = torch.zeros((len(part), hidden.shape[1], k), dtype=torch.long)
            t_lp = torch.zeros((len(part), hidden.shape[1], k))
            for i, it in enumerate(part):
                t_ids[i, : len(it.teacher_ids)] = torch.tensor(it.teacher_ids)
                t_lp[i, : len(it.teacher_logprobs)] = torch.tensor(it.teacher_logprobs)
            mask = pb.mask.to(dev).float()

            w = torch.tensor(weights[rows], device=dev).unsqueeze(-1)

            def chunk(h, ids, lp, m):
                per_tok = stored_topk_distill_loss(head(h), ids, lp, temperature=cfg.loss.temperature,
                                                   clip=cfg.loss.clip)
                return torch.stack([(per_tok * m).sum(), (per_tok * m * w).sum()])

            sums = hidden.new_zeros(2)
            for start in range(0, hidden.shape[1], cfg.chunk_size):
                sl = slice(start, start + cfg.chunk_size)
                sums = sums + checkpoint(chunk, hidden[:, sl], t_ids[:, sl].to(dev), t_lp[:, sl].to(dev),
                                         mask[:, sl], use_reentrant=False)
        return sums[1], {"loss": sums[0].detach()}

    objective, sums = accumulate(ctx, len(items), micro_step)
    return StepResult(sums.get("loss", 0.0), total, None, None, None, 0, objective=objective)


