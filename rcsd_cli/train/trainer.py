"""The training loop behind ``rcsd train``: set up, then step after step, then save.

``setup`` loads the student and its teacher (``frozen`` keeps the initial weights — with LoRA the base model
with adapters disabled, no copy; ``live`` is the current student under no-grad; ``ema`` a moving average of
the student; with ``--teacher-base-url`` a server answers for it), shards them under FSDP2 if asked, builds
AdamW, its schedule and the rollout engines, and restores a checkpoint. Each step takes ``batch_size`` items
in a seeded order (epoch after epoch), lets the method's step (``methods/``) accumulate gradients, then
``optimizer_step`` clips and steps; ``record_step`` turns the step into a metrics row, logs it and writes it.
Sampling seeds and the data order are functions of (seed, step), so a resumed run reproduces an uninterrupted
one exactly on CPU. What goes to disk lives in ``checkpoints.py``.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from rcsd_cli.backends import Backend, open_backend
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.rows import MetricsRow
from rcsd_cli.modeling import distributed as dist
from rcsd_cli.modeling import precision, sharding
from rcsd_cli.modeling.batching import SideBatch
from rcsd_cli.models import pick_device
from rcsd_cli.rubrics.ablations import control_rows
from rcsd_cli.rubrics.views import PromptView, longest_lengths
from rcsd_cli.train.checkpoints import (
    latest_checkpoint,
    load_optimizer,
    load_trainer_state,
    prune_checkpoints,
    remove_partial_checkpoints,
    save_checkpoint,
    save_final,
    write_final,
    write_metrics,
)
from rcsd_cli.train.methods import Step, step_for
from rcsd_cli.train.monitor import Monitor, best_folder, evaluate
from rcsd_cli.train.phases import PhaseClock
from rcsd_cli.train.rollout_engines import Rollouts, build_rollouts
from rcsd_cli.train.served_teacher import ServedTeacher, placement
from rcsd_cli.train.step import StepContext, StepResult
from rcsd_cli.train.student import build_models, ema_update, enable_gradient_checkpointing, teacher_view
from rcsd_cli.train.tracking import Tracker, numeric, open_tracker
from rcsd_cli.ui import info, progress, warn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def batch_order(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices for ``step``: consecutive slices of per-epoch seeded permutations."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_items)
        perm = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = min(batch_size - len(out), n_items - offset)
        out.extend(perm[offset: offset + take])
        pos += take
    return out


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant, linear decay or cosine decay to zero at ``cfg.steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress_frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress_frac)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))


@dataclass
class Run:
    """Everything a step needs, built once by ``setup``."""

    cfg: TrainConfig
    rank: int
    world: int
    sharded: bool
    student: PreTrainedModel  # or a peft/FSDP wrapper of one, which forwards its attributes
    teacher: PreTrainedModel | None  # None: the student is its own teacher (live, or LoRA's frozen base)
    tok: PreTrainedTokenizerBase
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher_hidden: Callable[[SideBatch], torch.Tensor]
    teacher_head: torch.nn.Module
    rollouts: Rollouts
    compute: Callable[[], AbstractContextManager]
    ckpt: Path | None
    start_step: int
    metrics: list[MetricsRow]
    judge: Backend | None = None  # --reward judge: the judge backend
    served_teacher: ServedTeacher | None = None  # --teacher-base-url

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.main:
            info(message)


def setup(cfg: TrainConfig, out: Path, resume: bool, trust_remote_code: bool, rows: Sequence = ()) -> Run:
    """Models (sharded if asked), optimizer, schedule, teacher view and rollout engines (vLLM's sized for the
    longest of ``rows``); a resumed state."""
    rank, world = dist.setup()
    log = info if rank == 0 else (lambda *_: None)
    device_type = pick_device().type
    compute = lambda: precision.compute(cfg.precision, device_type)  # noqa: E731
    torch.manual_seed(cfg.seed)
    ckpt = latest_checkpoint(out) if resume else None
    start_step, metrics = 0, list[MetricsRow]()
    if resume and rank == 0:
        remove_partial_checkpoints(out)
    if ckpt is not None:
        start_step, metrics = load_trainer_state(ckpt)
        log(f"resuming from {ckpt} (step {start_step})")
    log(f"teacher: {placement(cfg)}")
    served = ServedTeacher.open(cfg, trust_remote_code) if cfg.teacher.base_url else None  # before loading weights
    sharded = cfg.distributed.sharding != "replicate" and dist.is_initialized()
    student, teacher, tok = build_models(cfg, ckpt, trust_remote_code, on_cpu=sharded)
    dist.broadcast_from_main(student)
    dist.broadcast_from_main(teacher)
    if sharded:  # fully_shard moves each shard to the device
        policy = dict(mixed=cfg.precision == "bf16-mixed", offload=cfg.distributed.offload == "full")
        reshard = cfg.distributed.sharding == "full-shard"
        student = sharding.shard(student, reshard, device_type, **policy)
        # The teacher only runs forward: no backward would ever reshard it, so it always reshards after
        # each forward (and ``run_step`` reshards its root once the loss has read its output head).
        teacher = None if teacher is None else sharding.shard(teacher, True, device_type, **policy)
        log(f"FSDP2 {cfg.distributed.sharding} over {world} processes")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if ckpt is not None:
        load_optimizer(ckpt, student, optimizer, scheduler)
    teacher_hidden, teacher_head, teacher_scope = teacher_view(cfg, student, teacher, compute)
    lengths = None
    if cfg.rollout.backend == "vllm" and rows and not cfg.samples:
        view = PromptView.for_train(cfg)
        lengths = longest_lengths(cfg, [view.item_prompts(tok, row) for row in rows])
    rollouts = build_rollouts(cfg, student, teacher, tok, teacher_scope, compute,
                              trust_remote_code=trust_remote_code, lengths=lengths)
    if served is not None:  # reason-first analyses come from the teacher's server too
        rollouts.teacher = served.generate
    if ckpt is not None:  # engines start from --model: give them the resumed weights
        rollouts.after_update()
    judge = None
    if cfg.method == "grpo" and cfg.grpo.reward == "judge":
        judge = open_backend(cfg.grpo.judge_backend_config(), cfg.grpo.judge_model or "", trust_remote_code)
    return Run(cfg, rank, world, sharded, student, teacher, tok, params, optimizer, scheduler, teacher_hidden,
               teacher_head, rollouts, compute, ckpt, start_step, metrics, judge, served)


def optimizer_step(run: Run, res: StepResult, step: int) -> tuple[StepResult, float, float, float | None]:
    """Sum across processes, clip, step AdamW and the schedule, update an EMA teacher.

    Returns the combined step result, the gradient norm, the learning rate used and, on the run's
    first step only, the share of weights the update moved (``precision.moved_share``).
    """
    cfg = run.cfg
    if run.world > 1 and not run.sharded:  # FSDP already summed (reduce-scattered) them
        dist.sum_gradients(run.params)
    # the step's one read of its figures (after backward; the gradient norm below is the other)
    res = res.read(sharding.compute_device(run.student), dist.all_reduce_sum if run.world > 1 else None)
    grad_norm = sharding.grad_norm_value(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm))
    lr = float(run.scheduler.get_last_lr()[0])
    first = step == 0  # once per run history: a resumed run's metrics equal an uninterrupted one's
    before = precision.snapshot(run.params) if first else None
    if math.isfinite(grad_norm):
        run.optimizer.step()
    moved = precision.moved_share(run.params, before) if before is not None else None
    run.scheduler.step()
    if cfg.teacher.kind == "ema" and run.teacher is not None:
        ema_update(run.teacher, run.student, cfg.teacher.ema_decay)
    return res, grad_norm, lr, moved


def run_step(run: Run, method_step: Step, rows: list, step: int, clock=None, controls=None):
    """One optimizer step: this process's share of the step's items, the objective's gradients, AdamW, the
    engines' weights. Returns (step result, gradient norm, learning rate, share of weights moved)."""
    cfg, clock = run.cfg, clock or PhaseClock()
    batch = [rows[i] for i in batch_order(len(rows), cfg.batch_size, step, cfg.seed)[run.rank::run.world]]
    ctx = StepContext(run.student, run.tok, run.teacher_hidden, run.teacher_head, cfg, step,
                      run.rollouts.teacher, run.rank, student_generate=run.rollouts.student, clock=clock,
                      compute=run.compute, judge=run.judge, controls=controls,
                      teacher_topk=run.served_teacher.request if run.served_teacher is not None else None)
    run.optimizer.zero_grad(set_to_none=True)
    res = method_step(ctx, batch)
    if run.teacher is not None:  # a sharded teacher's root stays gathered after its forward: shard it again
        sharding.reshard(run.teacher)
    with clock("optimizer"):
        res, grad_norm, lr, moved = optimizer_step(run, res, step)
    run.rollouts.after_update(clock)
    return res, grad_norm, lr, moved


def save_best(run: Run, out: Path) -> None:
    """``--keep-best``: the current weights into OUTPUT/best (every process gathers, the first one writes)."""
    state = sharding.full_state_dict(run.student) if run.sharded else None
    if run.main:
        save_final(best_folder(out), run.student, run.tok, run.cfg, state)
    dist.barrier()


def record_step(run: Run, row: MetricsRow, out: Path, tracker: Tracker, inputs, data_notes: dict) -> None:
    """Keep the step's metrics row, say it in one line, write it where it can be read live."""
    cfg = run.cfg
    run.metrics.append(row)
    if cfg.precision == "bf16" and row.weights_moved is not None and row.weights_moved < 0.99 and run.main:
        warn(f"--precision bf16: only {row.weights_moved:.1%} of the weights that got a gradient moved in step "
             f"{row.step} (an update of ~lr {cfg.lr:g} rounds away for weights above "
             f"{precision.vanishing_below(cfg.lr):.1e}); --precision bf16-mixed keeps fp32 master weights")
    extras = "".join(f"  {k} {v:.4f}" for k, v in (("kl", row.kl), ("top1", row.top1_agreement),
                                                   ("reward", row.reward)) if v is not None)
    extras += "".join(f"  {k} {v:.2f}" for k, v in (("ent", row.student_entropy), ("d2", row.distinct_2),
                                                    ("trunc", row.truncated_share)) if v is not None)
    if row.judge_unjudged:  # never silent: unjudged criteria are out of the scores, unscored rollouts neutral
        extras += f"  unjudged {row.judge_unjudged} (unscored rollouts {row.reward_unscored})"
    run.log(f"step {row.step}/{cfg.steps}  loss {row.loss:.4f}{extras}  grad {row.grad_norm:.3f}  "
            f"tokens {row.completion_tokens}  {row.seconds:.1f}s")
    if run.main:  # live: readable (and plottable) while the run goes on, replaced atomically
        write_metrics(out, run.metrics, cfg, inputs, run.world, data_notes)
        tracker.log(row.step, numeric(row.model_dump()))


def metrics_row(cfg: TrainConfig, res: StepResult, step: int, grad_norm: float, lr: float, moved: float | None,
                seconds: float, used: int, n_rows: int, phases: dict, evals: dict | None = None) -> MetricsRow:
    n = max(res.tokens, 1)
    return MetricsRow(
        step=step + 1, method=cfg.method, loss=res.loss_sum / n if res.objective is None else res.objective,
        kl=None if res.kl_sum is None else res.kl_sum / n,
        top1_agreement=None if res.agree_sum is None else res.agree_sum / n, reward=res.reward,
        grad_norm=grad_norm, lr=lr, completion_tokens=res.tokens,
        mean_completion_length=res.tokens / max(1, res.reward_count or min(cfg.batch_size, n_rows)),
        rollout_tokens=used, tokens_per_second=res.tokens / seconds, seconds=seconds, weights_moved=moved,
        judge_unjudged=res.judge_unjudged, reward_unscored=res.reward_unscored, **health_metrics(res), **phases,
        **(evals or {}))


def health_metrics(res: StepResult) -> dict:
    """The step's health figures from the sums its objective collected (None where it collected none)."""
    h, tokens = res.health, max(res.tokens, 1)

    def ratio(num, den):
        return h[num] / h[den] if h.get(den) else None

    return {"student_entropy": h["student_entropy"] / tokens if "student_entropy" in h else None,
            "teacher_entropy": h["teacher_entropy"] / tokens if "teacher_entropy" in h else None,
            "clip_share": h["clip_share"] / tokens if "clip_share" in h else None,
            "distinct_2": ratio("distinct_bigrams", "bigrams"), "truncated_share": ratio("truncated", "completions")}


def train(cfg: TrainConfig, rows: list, out: Path, *, resume: bool = False, trust_remote_code: bool = False,
          inputs: Sequence[str] = (), data_notes: dict | None = None) -> list[MetricsRow]:
    """Run the loop and leave a Hugging Face checkpoint plus metrics.parquet in ``out``.

    ``data_notes`` (what was done to the items before training, e.g. the teacher-prompt filter) goes
    into metrics.parquet's metadata and the model card.

    Under ``torchrun``/``accelerate launch`` each process takes every ``world``-th item of the
    step's global batch; gradients and statistics are summed across processes.
    """
    cfg = resolve_precision(cfg)
    notes = data_notes if data_notes is not None else {}
    monitor = Monitor(cfg, rows, notes) if (cfg.monitor.every or cfg.monitor.keep_best or cfg.monitor.stop_when) \
        else None
    run = setup(cfg, out, resume, trust_remote_code, rows)
    clock = PhaseClock()
    method_step = step_for(cfg)
    if monitor is not None and run.start_step == 0:
        monitor.baseline(run.student, run.tok, run.compute, run.log)
    controls = control_rows(rows, cfg.teacher.contrast, cfg.seed) if cfg.teacher.contrast != "none" else None
    used = run.metrics[-1].rollout_tokens if run.metrics else 0
    tracker = open_tracker(cfg.report_to, out, cfg.model_dump(mode="json")) if run.main else Tracker()
    with progress(f"train ({cfg.method})", cfg.steps, enabled=run.main) as advance:
        advance(run.start_step)
        for step in range(run.start_step, cfg.steps):
            if cfg.max_rollout_tokens and used >= cfg.max_rollout_tokens:
                run.log(f"rollout budget of {cfg.max_rollout_tokens} tokens reached after {step} steps")
                break
            t0 = time.perf_counter()
            res, grad_norm, lr, moved = run_step(run, method_step, rows, step, clock, controls)
            if step == run.start_step:
                run.rollouts.report_sync(run.student, run.tok, run.log)
            evals = {}
            if monitor is not None and monitor.due(step):
                with clock("eval"):
                    evals = evaluate(run.student, run.tok, monitor.items, cfg, run.compute)
            seconds = time.perf_counter() - t0
            used += res.rollout_tokens
            row = metrics_row(cfg, res, step, grad_norm, lr, moved, seconds, used, len(rows), clock.take(), evals)
            stop = monitor.observe(row, lambda: save_best(run, out)) if monitor is not None else None
            record_step(run, row, out, tracker, inputs, notes)
            advance(1)
            if stop:
                run.log(stop)
                break
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out / f"checkpoint-{step + 1}", run.student, run.teacher, run.tok, run.optimizer,
                                run.scheduler, step + 1, cfg, run.metrics)
                if run.main:
                    prune_checkpoints(out, cfg.save_total_limit, keep=run.ckpt)
    final_state = sharding.full_state_dict(run.student) if run.sharded else None
    if run.main:
        tracker.close()
        write_final(out, run.student, run.tok, cfg, run.metrics, inputs, run.world, final_state, notes)
    dist.barrier()
    run.rollouts.close()
    if run.served_teacher is not None:
        run.served_teacher.close()
    return run.metrics


def resolve_precision(cfg: TrainConfig) -> TrainConfig:
    """An unset ``--precision``: bf16-mixed on CUDA, fp32 elsewhere (recorded in the run's config)."""
    if cfg.precision is not None:
        return cfg
    return cfg.model_copy(update={"precision": precision.resolve(None, pick_device().type)})
