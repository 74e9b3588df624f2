"""``rcsd train``: RCSD and its baselines (OPSD, GRPO, SFT), online or from stored samples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from rcsd_cli import distributed as dist
from rcsd_cli.artifacts import read_artifact
from rcsd_cli.commands import common as c
from rcsd_cli.errors import RcsdError, describe_validation_error, where
from rcsd_cli.objectives import OfflineItem, offline_step
from rcsd_cli.schemas import TrainConfig
from rcsd_cli.sharding import from_launcher_env
from rcsd_cli.trainer import check_output_folder, train
from rcsd_cli.ui import info


def offline_items(samples_path: str, scores_path: str) -> list[OfflineItem]:
    """Join samples with the teacher top-k stored by ``score --teacher-logprobs``."""
    samples, _ = read_artifact(samples_path, "samples")
    scores, _ = read_artifact(scores_path, "scores")
    by_id = {s.sample_id: (i, s) for i, s in enumerate(scores)}
    items = []
    for s in samples:
        if s.id not in by_id:
            raise RcsdError(f"{scores_path}: no score row for sample {s.id!r} of {samples_path}")
        i, sc = by_id[s.id]
        if sc.teacher_topk_ids is None or sc.teacher_topk_logprobs is None:
            raise RcsdError(f"{where(scores_path, i)}: no teacher log-probs; run rcsd score --teacher-logprobs")
        if len(sc.teacher_topk_ids) != len(s.completion_token_ids) or not s.completion_token_ids:
            raise RcsdError(f"{where(scores_path, i)}: teacher log-probs cover {len(sc.teacher_topk_ids)} tokens, "
                            f"the sample has {len(s.completion_token_ids)}")
        items.append(OfflineItem(s.prompt_token_ids, s.completion_token_ids, sc.teacher_topk_ids,
                                 sc.teacher_topk_logprobs))
    return items


def check_sharding(cfg: TrainConfig, world: int) -> None:
    """FSDP needs every process to run the same number of forward passes, and no LoRA."""
    if cfg.sharding == "replicate":
        return
    if not dist.is_initialized():
        info(f"--sharding {cfg.sharding} has no effect in a single process without a launcher")
        return
    if cfg.lora_rank:
        raise RcsdError(f"--sharding {cfg.sharding} does not support --lora-rank; LoRA runs with --sharding replicate")
    if cfg.batch_size % world:
        raise RcsdError(f"--sharding {cfg.sharding}: --batch-size {cfg.batch_size} must be a multiple of the "
                        f"{world} processes (every process runs the same number of passes)")


def run_train(cfg: TrainConfig, output: Path, *, overwrite: bool = False, resume: bool = False,
              trust_remote_code: bool = False):
    """Validate inputs, then train online (``cfg.rubrics``) or one offline round (``cfg.samples``)."""
    objective = None
    if cfg.samples or cfg.scores:
        if not (cfg.samples and cfg.scores):
            raise RcsdError("an offline round needs both --samples and --scores")
        rows = offline_items(cfg.samples, cfg.scores)
        objective, inputs = offline_step, [cfg.samples, cfg.scores]
    elif cfg.rubrics:
        rows, _ = read_artifact(cfg.rubrics, "rubrics")
        inputs = [cfg.rubrics]
        if cfg.method in ("opsd", "sft") and cfg.task == "reasoner":
            missing = [r.id for r in rows if not (r.reference_answer or r.answer)]
            if missing:
                raise RcsdError(f"{cfg.rubrics}: --method {cfg.method} needs reference answers; "
                                f"{len(missing)} rows have none (first: {missing[0]!r})")
    else:
        raise RcsdError("give --rubrics for online training, or --samples and --scores for an offline round")
    rows = rows[: cfg.limit] if cfg.limit else rows
    rank, world = dist.setup(always=cfg.sharding != "replicate")
    check_sharding(cfg, world)
    if rank == 0:
        check_output_folder(output, overwrite, resume)
    dist.barrier()
    try:
        metrics = train(cfg, rows, output, resume=resume, trust_remote_code=trust_remote_code, inputs=inputs,
                        objective=objective)
    finally:
        dist.teardown()
    if metrics and rank == 0:
        info(f"trained {metrics[-1].step} steps ({cfg.method}); final loss {metrics[-1].loss:.4f}; model in {output}")
    return metrics


def command(
    rubrics: Annotated[Optional[Path], typer.Option("--rubrics", help="rubrics.parquet (online training).")] = None,
    samples: Annotated[Optional[Path], typer.Option("--samples", help="Offline round: samples.parquet.")] = None,
    scores: Annotated[Optional[Path], typer.Option("--scores", help="Offline round: scores.parquet with "
                                                   "teacher log-probs.")] = None,
    output: c.Output = Path("rcsd-model"),
    task: Annotated[str, typer.Option("--task", help="reasoner, or rubric-generator (stage I).")] = "reasoner",
    method: Annotated[str, typer.Option("--method", help="rcsd, opsd, grpo or sft.")] = "rcsd",
    teacher: Annotated[str, typer.Option("--teacher", help="frozen (initial weights), live or ema.")] = "frozen",
    ema_decay: Annotated[float, typer.Option("--ema-decay")] = 0.99,
    teacher_context: Annotated[str, typer.Option("--teacher-context", help="rubric, rubric+reference or "
                                                 "reason-first.")] = "rubric+reference",
    steps: Annotated[int, typer.Option("--steps", min=1)] = 10,
    max_rollout_tokens: Annotated[Optional[int], typer.Option("--max-rollout-tokens", min=1,
                                                              help="Stop after this many rollout tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per optimizer step.")] = 4,
    micro_batch_size: Annotated[int, typer.Option("--micro-batch-size", min=1)] = 4,
    group_size: Annotated[int, typer.Option("--group-size", min=1, help="GRPO rollouts per prompt.")] = 4,
    reward: Annotated[str, typer.Option("--reward", help="GRPO reward: rubric or correct.")] = "rubric",
    clip_eps: Annotated[float, typer.Option("--clip-eps", help="GRPO ratio clip.")] = 0.2,
    kl_coef: Annotated[float, typer.Option("--kl-coef", help="GRPO k3 KL weight to the initial model.")] = 0.0,
    lr: Annotated[float, typer.Option("--lr")] = 5e-6,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="constant, linear or cosine.")] = "constant",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0)] = 0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm")] = 1.0,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=0, help="0 = full fine-tuning.")] = 0,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha")] = 16.0,
    loss: Annotated[str, typer.Option("--loss", help="topk_kl, jsd or sampled_rkl.")] = "topk_kl",
    top_k_loss: Annotated[int, typer.Option("--loss-top-k", min=1)] = 20,
    tail_bucket: Annotated[bool, typer.Option("--tail-bucket", help="Keep non-top-k mass as one entry.")] = False,
    beta: Annotated[float, typer.Option("--beta", min=0.0, max=1.0, help="JSD mix: 0 fwd KL, 1 rev KL.")] = 0.0,
    loss_temperature: Annotated[float, typer.Option("--loss-temperature")] = 1.2,
    clip: Annotated[Optional[float], typer.Option("--clip", help="Per-entry clip of loss terms.")] = 0.05,
    no_clip: Annotated[bool, typer.Option("--no-clip")] = False,
    skip_first_tokens: Annotated[int, typer.Option("--skip-first-tokens", min=0)] = 0,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1)] = 128,
    save_every: Annotated[int, typer.Option("--save-every", min=0)] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUTPUT.")] = False,
    sharding: Annotated[Optional[str], typer.Option(
        "--sharding", help="Under torchrun/accelerate: replicate (default), full-shard (FSDP2, ZeRO-3-like) or "
        "shard-grad-op (ZeRO-2-like). Default: what an accelerate FSDP config asks for, else replicate.")] = None,
    model: c.Model = c.DEFAULT,
    limit: c.Limit = None,
    seed: c.Seed = 0,
    max_new_tokens: c.MaxNewTokens = 256,
    temperature: c.Temperature = 1.2,
    top_p: c.TopP = 0.95,
    top_k: c.TopK = 20,
    batch_size_gen: c.BatchSize = 16,
    thinking: c.Thinking = None,
    overwrite: c.Overwrite = False,
    trust_remote_code: c.TrustRemoteCode = False,
):
    """Train the student towards its rubric-conditioned teacher (or a baseline) on its own samples."""
    sharding, note = from_launcher_env(sharding)
    if note and dist.is_main():
        info(note)
    try:
        cfg = TrainConfig(
            rubrics=str(rubrics) if rubrics else None, samples=str(samples) if samples else None,
            scores=str(scores) if scores else None, model=model, task=task, method=method, teacher=teacher,
            ema_decay=ema_decay, teacher_context=teacher_context, steps=steps, max_rollout_tokens=max_rollout_tokens,
            batch_size=batch_size, micro_batch_size=micro_batch_size, group_size=group_size, reward=reward,
            clip_eps=clip_eps, kl_coef=kl_coef, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            max_grad_norm=max_grad_norm, lora_rank=lora_rank, lora_alpha=lora_alpha, loss=loss, top_k_loss=top_k_loss,
            tail_bucket=tail_bucket, beta=beta, loss_temperature=loss_temperature, clip=None if no_clip else clip,
            skip_first_tokens=skip_first_tokens, chunk_size=chunk_size, save_every=save_every, limit=limit, seed=seed,
            sharding=sharding,
            generation=c.gen_config(max_new_tokens, temperature, top_p, top_k, batch_size_gen, thinking))
    except ValidationError as exc:
        raise RcsdError(f"train options: {describe_validation_error(exc)}")
    run_train(cfg, output, overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code)
