"""The online self-distillation loop behind ``rcsd train``.

One step: take ``batch_size`` problems (a seeded order, epoch after epoch), sample one
completion per problem from the *current* student with the student prompt (question only),
then score the student's own tokens against the teacher — the same network at its initial
weights (``frozen``) or current weights (``live``), run without gradients — whose prompt also
holds the rubric and, by default, the reference answer. The loss on each completion token is
computed from hidden states in chunks (see ``losses.chunked_distill_loss``), summed across
micro-batches and divided by the step's total number of completion tokens, so gradient
accumulation does not change the objective.

Methods differ only in the teacher's context (``TEACHER_CONTEXTS``), so new ones plug in there.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rcsd_cli.artifacts import write_artifact
from rcsd_cli.batching import aligned_hidden, build_pair_batch
from rcsd_cli.errors import RcsdError
from rcsd_cli.generation import generate_batch
from rcsd_cli.losses import chunked_distill_loss
from rcsd_cli.models import load_model
from rcsd_cli.prompts import student_prompt_ids, teacher_prompt_ids
from rcsd_cli.schemas import MetricsRow, Rubric, TrainConfig
from rcsd_cli.ui import info, progress

TeacherContext = Callable[[object, Rubric, TrainConfig], list[int]]

TEACHER_CONTEXTS: dict[str, TeacherContext] = {
    "rcsd": lambda tok, row, cfg: teacher_prompt_ids(tok, row, row.rubric, cfg.teacher_context == "rubric+reference"),
    "opsd": lambda tok, row, cfg: teacher_prompt_ids(tok, row, None, True),
}


def batch_order(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices for ``step``: consecutive slices of per-epoch seeded permutations."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_items)
        perm = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = min(batch_size - len(out), n_items - offset)
        out.extend(perm[offset: offset + take])
        pos += take
    return out


def lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def latest_checkpoint(out: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def save_checkpoint(path: Path, model, tokenizer, optimizer, scheduler, step: int, cfg: TrainConfig,
                    metrics: list[MetricsRow]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    state = {"step": step, "config": cfg.model_dump(mode="json"), "metrics": [m.model_dump() for m in metrics]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def distill_backward(student, teacher, tok, s_prompts, t_prompts, completions, cfg: TrainConfig):
    """Accumulate gradients of the step's loss; returns summed (loss, KL, top-1 agreement) over tokens.

    Each micro-batch's summed token loss is divided by the step's *total* completion tokens, so the
    gradient does not depend on how the batch is split.
    """
    total_tokens = max(sum(len(c) for c in completions), 1)
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    loss_total = kl_total = agree_total = 0.0
    for j in range(0, len(completions), cfg.micro_batch_size):
        sl = slice(j, j + cfg.micro_batch_size)
        pb = build_pair_batch(s_prompts[sl], t_prompts[sl], completions[sl], tok.pad_token_id)
        with torch.no_grad():
            t_hidden = aligned_hidden(teacher, pb.teacher)
        s_hidden = aligned_hidden(student, pb.student)
        dev = s_hidden.device
        loss_sum, kl_sum, agree_sum = chunked_distill_loss(
            s_hidden, t_hidden, s_head, t_head, pb.mask.to(dev), pb.targets.to(dev), kind=cfg.loss,
            chunk_size=cfg.chunk_size, beta=cfg.beta, top_k=cfg.top_k_loss, temperature=cfg.loss_temperature,
            clip=cfg.clip, diag_top_k=cfg.top_k_loss)
        (loss_sum / total_tokens).backward()
        loss_total += loss_sum.item()
        kl_total += kl_sum.item()
        agree_total += agree_sum.item()
    return loss_total, kl_total, agree_total


def train(cfg: TrainConfig, rows: list[Rubric], out: Path, *, resume: bool = False, trust_remote_code: bool = False,
          inputs: list[str] = ()) -> list[MetricsRow]:
    """Run the online loop and leave a Hugging Face checkpoint plus metrics.parquet in ``out``."""
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, trust_remote_code)
    student, tok = loaded.model, loaded.tokenizer
    start_step, metrics = 0, []
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_step, metrics = state["step"], [MetricsRow(**m) for m in state["metrics"]]
        student = load_model(str(ckpt), trust_remote_code).model
        info(f"resuming from {ckpt} (step {start_step})")
    teacher = student if cfg.teacher == "live" else copy.deepcopy(loaded.model)
    teacher.requires_grad_(False).eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps))
    if ckpt is not None:
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    context = TEACHER_CONTEXTS[cfg.method]
    with progress(f"train ({cfg.method})", cfg.steps) as advance:
        advance(start_step)
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            batch = [rows[i] for i in batch_order(len(rows), cfg.batch_size, step, cfg.seed)]
            s_prompts = [student_prompt_ids(tok, r) for r in batch]
            t_prompts = [context(tok, r, cfg) for r in batch]
            gens = []
            for j in range(0, len(batch), cfg.generation.batch_size):
                gens += generate_batch(student, tok, s_prompts[j: j + cfg.generation.batch_size], cfg.generation,
                                       seed=cfg.seed * 7_919 + step * 1_000 + j)
            completions = [g.token_ids for g in gens]
            total_tokens = sum(len(c) for c in completions)
            optimizer.zero_grad(set_to_none=True)
            loss_total, kl_total, agree_total = distill_backward(student, teacher, tok, s_prompts, t_prompts,
                                                                 completions, cfg)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            lr = scheduler.get_last_lr()[0]
            if math.isfinite(grad_norm):
                optimizer.step()
            scheduler.step()
            seconds = time.perf_counter() - t0
            n = max(total_tokens, 1)
            metrics.append(MetricsRow(step=step + 1, loss=loss_total / n, kl=kl_total / n,
                                      top1_agreement=agree_total / n, grad_norm=grad_norm, lr=lr,
                                      completion_tokens=total_tokens,
                                      mean_completion_length=total_tokens / len(batch),
                                      tokens_per_second=total_tokens / seconds, seconds=seconds))
            advance(1)
            m = metrics[-1]
            info(f"step {m.step}/{cfg.steps}  loss {m.loss:.4f}  kl {m.kl:.4f}  top1 {m.top1_agreement:.3f}  "
                 f"grad {m.grad_norm:.3f}  tokens {m.completion_tokens}  {m.seconds:.1f}s")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out / f"checkpoint-{step + 1}", student, tok, optimizer, scheduler, step + 1, cfg,
                                metrics)
    student.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "rcsd_train_config.json").write_text(cfg.model_dump_json(indent=2))
    write_artifact(out / "metrics.parquet", "metrics", metrics, stage="train", config=cfg, model_id=cfg.model,
                   inputs=inputs, overwrite=True)
    return metrics


def check_output_folder(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise RcsdError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to replace it")
    if out.exists() and overwrite and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
