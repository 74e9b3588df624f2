"""``--method rcsd`` / ``opsd``: self-distillation on the student's own rollout, the teacher behind its
privileged prompt (rubric + reference for RCSD, the reference answer only for OPSD)."""

from __future__ import annotations

import torch

from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.data.rows import Rubric
from rcsd_cli.modeling.batching import aligned_hidden, build_pair_batch
from rcsd_cli.modeling.generation import item_seed
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.train.chunked_loss import TeacherSide, TeacherTopK, chunked_distill_loss
from rcsd_cli.train.methods.rollouts import rollout_health, rollout_reward, rollouts
from rcsd_cli.train.step import StepContext, StepResult, accumulate, reduction_weights


def step(ctx: StepContext, rows: list[Rubric]) -> StepResult:
    cfg, tok = ctx.cfg, ctx.tokenizer
    view = PromptView.for_train(cfg)
    s_prompts = [view.student_ids(tok, r) for r in rows]
    if cfg.teacher.context == "reason-first" and cfg.task == "reasoner":
        t_prompts = reason_first_teacher_prompts(ctx, rows)
    else:
        t_prompts = [view.teacher_ids(tok, r) for r in rows]
    gens = rollouts(ctx, s_prompts, [(r.id,) for r in rows])
    completions = [g.token_ids for g in gens]
    rewards = [rollout_reward(r, g.text, cfg) for r, g in zip(rows, gens, strict=True)]
    c_prompts = [view.control_ids(tok, ctx.controls[r.id]) for r in rows] if ctx.controls else None
    res = backward(ctx, s_prompts, t_prompts, completions, c_prompts)
    res.reward, res.reward_count = sum(rewards) / len(rewards), len(rewards)
    res.health.update(rollout_health(gens))
    return res


def reason_first_teacher_prompts(ctx: StepContext, rows: list[Rubric]) -> list[list[int]]:
    """[analysis prompt ‖ sampled analysis ‖ transition] per row, ready for the rollout ids.

    The analysis is sampled afresh every step (its own temperature, top-p, top-k and length) by
    the frozen teacher, or by the current student with ``--analysis-by student``.
    """
    cfg, tok = ctx.cfg, ctx.tokenizer
    view = PromptView.for_train(cfg)
    asks = [view.analysis_ids(tok, r) for r in rows]
    gen_cfg = GenerationConfig(max_new_tokens=cfg.reason_first.max_new_tokens, temperature=cfg.reason_first.temperature,
                               top_p=cfg.reason_first.top_p, top_k=cfg.reason_first.top_k,
                               batch_size=cfg.generation.batch_size)
    seeds = [item_seed(cfg.seed, "analysis", ctx.step, r.id) for r in rows]
    with ctx.clock("analysis"):
        if cfg.reason_first.by == "teacher":
            assert ctx.teacher_generate is not None, "reason-first by the teacher needs the run's teacher engine"
            analyses = ctx.teacher_generate(asks, gen_cfg, seeds)
        else:
            analyses = ctx.student_samples(asks, gen_cfg, seeds)
    return [ask + analysis.token_ids + view.transition_ids(tok, row)
            for row, ask, analysis in zip(rows, asks, analyses, strict=True)]


def backward(ctx: StepContext, s_prompts, t_prompts, completions, c_prompts=None) -> StepResult:
    """Accumulate the distillation gradient over micro-batches (weights from ``reduction_weights``);
    ``c_prompts``: the teacher's control prompts of ``--teacher-contrast``."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    counts = [max(len(c) - cfg.skip_first_tokens, 0) for c in completions]
    weights = reduction_weights(ctx, counts)
    total = max(ctx.global_sum(sum(counts)), 1)
    s_head = ctx.student.get_output_embeddings()
    health: dict = {}

    served = {}  # a served teacher: every micro-batch's request goes out now, each is collected when needed
    if ctx.teacher_topk is not None:
        for j in range(0, len(completions), cfg.micro_batch_size):
            sl = slice(j, j + cfg.micro_batch_size)
            served[j] = ctx.teacher_topk(t_prompts[sl], completions[sl])

    def teacher_side(sl, pb) -> TeacherSide | TeacherTopK:
        if sl.start in served:  # waiting for the server is the teacher's phase
            return served.pop(sl.start).result()
        t_hidden = ctx.teacher_hidden(pb.teacher)
        c_hidden = None
        if c_prompts is not None:
            pc = build_pair_batch(s_prompts[sl], c_prompts[sl], completions[sl], tok.pad_token_id,
                                  cfg.skip_first_tokens)
            c_hidden = ctx.teacher_hidden(pc.teacher)
        return TeacherSide(t_hidden, ctx.teacher_head, c_hidden, cfg.teacher.contrast_weight)

    def micro_step(sl):
        pb = build_pair_batch(s_prompts[sl], t_prompts[sl], completions[sl], tok.pad_token_id, cfg.skip_first_tokens)
        with torch.no_grad(), ctx.clock("teacher"):
            teacher = teacher_side(sl, pb)
        with ctx.clock("student"), ctx.compute():
            s_hidden = aligned_hidden(ctx.student, pb.student)
            dev = s_hidden.device
            if isinstance(teacher, TeacherTopK):  # fetched into host memory
                teacher = teacher.to(dev)
            sums = chunked_distill_loss(s_hidden, s_head, teacher, pb.mask.to(dev), pb.targets.to(dev), cfg.loss,
                                        chunk_size=cfg.chunk_size, row_weights=torch.tensor(weights[sl], device=dev))
        for name, value in sums.health.items():  # device tensors: the step reads its figures once, at its end
            health[name] = health.get(name, 0.0) + value
        return sums.weighted, {"loss": sums.loss, "kl": sums.kl, "agree": sums.agree}

    objective, sums = accumulate(ctx, len(completions), micro_step)
    return StepResult(loss_sum=sums.get("loss", 0.0), tokens=total, kl_sum=sums.get("kl", 0.0),
                      agree_sum=sums.get("agree", 0.0), rollout_tokens=sum(len(c) for c in completions),
                      objective=objective, health=health)
