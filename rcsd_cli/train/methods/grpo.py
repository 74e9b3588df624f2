"""``--method grpo``: ``group_size`` rollouts per prompt, rewards, group-normalised advantages and the
clipped-ratio surrogate, with an optional k3 KL to the frozen initial model. One policy update per batch
of rollouts (on-policy), so the ratio starts at 1 and the clip guards the estimator rather than several
epochs of reuse."""

from __future__ import annotations

import torch

from rcsd_cli.data.rows import Criterion, Problem, Rubric
from rcsd_cli.evaluation.scoring import JUDGE_REPLY, score_with_judge
from rcsd_cli.modeling.generation import item_seed
from rcsd_cli.modeling.logprobs import chunked_token_logprobs
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.train.losses import clipped_policy_loss, group_advantages, k3_kl
from rcsd_cli.train.methods.rollouts import rollout_health, rollout_reward, rollouts
from rcsd_cli.train.step import StepContext, StepResult, accumulate, reduction_weights, sequence_logprobs


def step(ctx: StepContext, rows: list[Rubric]) -> StepResult:
    cfg, tok, G = ctx.cfg, ctx.tokenizer, ctx.cfg.grpo.group_size
    view = PromptView.for_train(cfg)
    group_rows = [r for r in rows for _ in range(G)]
    prompts = [view.student_ids(tok, r) for r in group_rows]
    gens = rollouts(ctx, prompts, [(r.id, j % G) for j, r in enumerate(group_rows)])
    completions = [g.token_ids for g in gens]
    judged: dict[str, int] = {}
    if cfg.grpo.reward == "judge":
        reward_list, judged = judged_rewards(ctx, group_rows, [g.text for g in gens])
    else:
        reward_list = [rollout_reward(r, g.text, cfg) for r, g in zip(group_rows, gens, strict=True)]
    res = backward(ctx, prompts, completions, reward_list, rollout_health(gens))
    res.reward, res.reward_count = sum(reward_list) / len(reward_list), len(group_rows)
    for name, value in judged.items():
        setattr(res, name, value)
    return res


def backward(ctx: StepContext, prompts, completions, reward_list: list[float], health: dict) -> StepResult:
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
    return StepResult(loss_sum=sums.get("loss", 0.0), tokens=total,
                      kl_sum=sums.get("kl", 0.0) if cfg.grpo.kl_coef > 0 else None,
                      rollout_tokens=sum(len(c) for c in completions), objective=objective, health=health)


def judged_rewards(ctx: StepContext, rows: list[Rubric], texts: list[str]) -> tuple[list[float], dict[str, int]]:
    """``--reward judge``: each rollout's rubric score with unchecked criteria judged by the judge model.

    A rollout with no judged positive criterion has no score; it gets its group's mean (so its advantage is
    0) rather than a silent 0, and the step records how many criteria and rollouts that affected."""
    cfg, G = ctx.cfg, ctx.cfg.grpo.group_size
    items: list[tuple[str, Problem, list[Criterion], str]] = [
        (f"{r.id}:{j % G}", r, r.rubric, t) for j, (r, t) in enumerate(zip(rows, texts, strict=True))]
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
