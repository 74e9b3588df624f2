"""``rcsd train``: rubric-conditioned self-distillation (online loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rcsd_cli.artifacts import read_artifact
from rcsd_cli.commands import common as c
from rcsd_cli.errors import RcsdError
from rcsd_cli.schemas import GenerationConfig, TrainConfig
from rcsd_cli.trainer import check_output_folder, train
from rcsd_cli.ui import info


def run_train(rubrics: Path, output: Path, cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False,
              trust_remote_code: bool = False):
    rows, _ = read_artifact(rubrics, "rubrics")
    rows = rows[: cfg.limit] if cfg.limit else rows
    if cfg.method == "opsd" and not any(r.reference_answer for r in rows):
        raise RcsdError(f"{rubrics}: --method opsd needs reference answers and none of the rows has one")
    check_output_folder(output, overwrite, resume)
    metrics = train(cfg, rows, output, resume=resume, trust_remote_code=trust_remote_code, inputs=[str(rubrics)])
    if metrics:
        last = metrics[-1]
        info(f"trained {last.step} steps; final loss {last.loss:.4f}, KL {last.kl:.4f}; model in {output}")
    return metrics


def command(
    rubrics: Annotated[Path, typer.Option("--rubrics", help="rubrics.parquet from rcsd gen-rubrics.")],
    output: c.Output = Path("rcsd-model"),
    method: Annotated[str, typer.Option("--method", help="rcsd (rubric teacher) or opsd (reference teacher).")] = "rcsd",
    teacher: Annotated[str, typer.Option("--teacher", help="frozen (initial weights) or live.")] = "frozen",
    teacher_context: Annotated[str, typer.Option("--teacher-context", help="rubric or rubric+reference.")]
    = "rubric+reference",
    steps: Annotated[int, typer.Option("--steps", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per optimizer step.")] = 4,
    micro_batch_size: Annotated[int, typer.Option("--micro-batch-size", min=1)] = 4,
    lr: Annotated[float, typer.Option("--lr")] = 5e-6,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0)] = 0,
    loss: Annotated[str, typer.Option("--loss", help="topk_kl, jsd or sampled_rkl.")] = "topk_kl",
    top_k_loss: Annotated[int, typer.Option("--loss-top-k", min=1)] = 20,
    beta: Annotated[float, typer.Option("--beta", min=0.0, max=1.0, help="JSD mix: 0 fwd KL, 1 rev KL.")] = 0.0,
    loss_temperature: Annotated[float, typer.Option("--loss-temperature")] = 1.2,
    clip: Annotated[Optional[float], typer.Option("--clip", help="Per-entry clip; omit with --no-clip.")] = 0.05,
    no_clip: Annotated[bool, typer.Option("--no-clip")] = False,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1)] = 128,
    save_every: Annotated[int, typer.Option("--save-every", min=0)] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUTPUT.")] = False,
    model: c.Model = c.DEFAULT,
    limit: c.Limit = None,
    seed: c.Seed = 0,
    max_new_tokens: c.MaxNewTokens = 256,
    temperature: c.Temperature = 1.2,
    top_p: c.TopP = 0.95,
    top_k: c.TopK = 20,
    batch_size_gen: c.BatchSize = 16,
    overwrite: c.Overwrite = False,
    trust_remote_code: c.TrustRemoteCode = False,
):
    """Train the student towards its rubric-conditioned teacher on its own samples."""
    try:
        cfg = TrainConfig(rubrics=str(rubrics), model=model, method=method, teacher=teacher,
                          teacher_context=teacher_context, steps=steps, batch_size=batch_size,
                          micro_batch_size=micro_batch_size, lr=lr, warmup_steps=warmup_steps, loss=loss,
                          top_k_loss=top_k_loss, beta=beta, loss_temperature=loss_temperature,
                          clip=None if no_clip else clip, chunk_size=chunk_size, save_every=save_every, limit=limit,
                          seed=seed, generation=c.gen_config(max_new_tokens, temperature, top_p, top_k,
                                                             batch_size_gen))
    except Exception as exc:
        from pydantic import ValidationError

        from rcsd_cli.errors import describe_validation_error

        if isinstance(exc, ValidationError):
            raise RcsdError(f"train options: {describe_validation_error(exc)}")
        raise
    run_train(rubrics, output, cfg, overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code)


__all__ = ["command", "run_train", "GenerationConfig"]
