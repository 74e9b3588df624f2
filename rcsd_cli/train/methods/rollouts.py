"""Rollouts for the methods that sample (distill, grpo): seeded per item, rewarded, and their health counts."""

from __future__ import annotations

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.rows import Rubric
from rcsd_cli.evaluation.scoring import score_completion
from rcsd_cli.modeling.generation import Generation, item_seed
from rcsd_cli.rubrics.rubric_gen import InvalidRubric, parse_rubric_output
from rcsd_cli.train.losses import distinct_n
from rcsd_cli.train.step import StepContext


def rollouts(ctx: StepContext, prompts: list[list[int]], keys: list[tuple]) -> list[Generation]:
    """Student samples; each seeded by (seed, step, item), so a rollout does not depend on the batch
    it lands in, the number of processes, or ``--gen-batch-size``."""
    cfg = ctx.cfg
    seeds = [item_seed(cfg.seed, "rollout", ctx.step, *key) for key in keys]
    with ctx.clock("rollout"):
        return ctx.student_samples(prompts, cfg.generation, seeds)


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


def rollout_health(gens: list[Generation]) -> dict[str, float]:
    """Counts behind distinct-2 and the share of rollouts cut at the token limit."""
    distinct, bigrams = distinct_n([g.token_ids for g in gens], 2)
    return {"distinct_bigrams": distinct, "bigrams": bigrams, "completions": len(gens),
            "truncated": sum(g.finish_reason == "length" for g in gens)}
