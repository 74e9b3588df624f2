"""The training loop behind ``rcsd train``: data order, teacher, optimizer, checkpoints, metrics.

Per step it takes ``batch_size`` items in a seeded order (epoch after epoch), lets the method's
objective (``objectives.py``) accumulate gradients, clips them and steps AdamW. Teacher kinds:
``frozen`` keeps the initial weights (with LoRA: the base model with adapters disabled, no
copy), ``live`` is the current student under no-grad, ``ema`` a moving average of the student.

Checkpoints (``--save-every``) hold the model (or LoRA adapter), the EMA teacher, optimizer and
scheduler states and the metrics so far. Sampling seeds and the data order are functions of
(seed, step), so a resumed run reproduces an uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import torch

from rcsd_cli.data.artifacts import clear_own_folder, write_artifact
from rcsd_cli.data.schemas import MetricsRow, TrainConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling import distributed as dist
from rcsd_cli.modeling import precision, sharding
from rcsd_cli.modeling.batching import aligned_hidden
from rcsd_cli.models import load_model, pick_device
from rcsd_cli.train.objectives import OBJECTIVES, StepContext
from rcsd_cli.train.phases import PhaseClock
from rcsd_cli.train.rollout_engines import build_rollouts
from rcsd_cli.train.tracking import Tracker, numeric, open_tracker
from rcsd_cli.ui import info, progress, warn


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


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out`` (``checkpoint-N`` with its trainer state), oldest first."""
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(path: Path, student, teacher, tokenizer, optimizer, scheduler, step: int, cfg: TrainConfig,
                    metrics: list[MetricsRow]) -> None:
    """Write everything a resume needs into ``path`` atomically (temporary folder, then rename).

    Every process must call this (gathering sharded state is collective); only rank 0 writes.
    Weights are saved unsharded and the optimizer state by parameter name, so the checkpoint
    resumes on any number of processes, sharded or not.
    """
    from safetensors.torch import save_file

    model_state = sharding.full_state_dict(student) if sharding.is_sharded(student) else None
    ema_state = sharding.full_state_dict(teacher) if cfg.teacher == "ema" else None
    optimizer_state = sharding.optimizer_state(student, optimizer)
    if not dist.is_main():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sharding.unwrap(student).save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if ema_state is not None:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, tmp / "ema_teacher.safetensors")
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    state = {"step": step, "config": cfg.model_dump(mode="json"), "metrics": [m.model_dump() for m in metrics]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def enable_gradient_checkpointing(student) -> None:
    """Decoder-layer activation checkpointing (non-reentrant, so frozen inputs and LoRA work)."""
    lm = sharding.unwrap(student)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise RcsdError(f"--gradient-checkpointing: {type(lm).__name__} does not support it")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False


def lora_targets(spec: str) -> str | list[str]:
    """``--lora-targets``: ``all-linear`` or a comma-separated list of module names."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise RcsdError("--lora-targets: give module names (e.g. q_proj,v_proj) or all-linear")
    return "all-linear" if names == ["all-linear"] else names


def save_final(out: Path, student, tok, cfg: TrainConfig, state_dict=None) -> None:
    """The trained model: full weights, or with LoRA the PEFT adapter (plus merged weights if asked).

    Full and merged weights are written in ``--save-dtype``; the adapter keeps its training dtype.
    """
    if cfg.lora_rank:
        sharding.unwrap(student).save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tok.save_pretrained(out)
        if cfg.merge_lora:
            merged = copy.deepcopy(student).merge_and_unload()
            _save_weights(merged, sharding.full_state_dict(merged), out / "merged", tok, cfg.save_dtype)
        return
    lm = sharding.unwrap(student)
    _save_weights(lm, state_dict if state_dict is not None else sharding.full_state_dict(lm), out, tok,
                  cfg.save_dtype)


def _save_weights(lm, state: dict, folder: Path, tok, choice: str) -> None:
    """``save_pretrained`` of ``state`` cast to the chosen dtype, the config saying that dtype."""
    dtype = precision.save_dtype(choice, lm.config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    declared = lm.config.dtype
    lm.config.dtype = dtype
    try:
        lm.save_pretrained(folder, state_dict=state, safe_serialization=True)
    finally:
        lm.config.dtype = declared
    tok.save_pretrained(folder)
    _drop_private_config_keys(folder / "config.json")


def prune_checkpoints(out: Path, limit: int | None, keep: Path | None) -> list[Path]:
    """``--save-total-limit``: delete all but the newest ``limit`` complete checkpoints.

    Never the one this run resumed from (``keep``), never a ``.tmp`` being written (it is not a
    complete checkpoint). Returns what was deleted.
    """
    if not limit:
        return []
    old = [p for p in checkpoints(out)[:-limit] if keep is None or p.resolve() != keep.resolve()]
    for p in old:
        shutil.rmtree(p)
    return old


def _drop_private_config_keys(path: Path) -> None:
    """transformers keeps loader bookkeeping (``_name_or_path`` of a GGUF cache, ...) that says nothing true."""
    if path.is_file():
        data = json.loads(path.read_text())
        cleaned = {k: v for k, v in data.items() if not k.startswith("_") or k == "_attn_implementation_autoset"}
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def model_card(cfg: TrainConfig, metrics: list[MetricsRow], inputs: list[str], world: int) -> str:
    """``OUT/README.md``: what was trained from what, how, and how to load it."""
    from rcsd_cli.data.artifacts import library_versions, model_provenance, sha256_file

    base = model_provenance(cfg.model)
    data = {str(p): sha256_file(p) for p in inputs if Path(p).is_file()}
    last = metrics[-1] if metrics else None
    weights_dtype = str(precision.base_dtype(cfg.precision, bool(cfg.lora_rank))).removeprefix("torch.")
    kind = f"LoRA adapter (r {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, {cfg.lora_targets})" if cfg.lora_rank \
        else "full fine-tune"
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"OUT\")"
            if cfg.lora_rank else
            "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"OUT\")")
    lines = [
        "---", "library_name: " + ("peft" if cfg.lora_rank else "transformers"), f"base_model: {cfg.model}",
        "tags: [rcsd, self-distillation, rubrics]", "---", "",
        f"# {cfg.method.upper()} ({cfg.task}) of {cfg.model}", "",
        f"Trained with rcsd {library_versions()['rcsd']} (`rcsd train`), {kind}, {len(metrics)} optimizer steps of "
        f"{cfg.batch_size} prompts on {world} process(es).", "",
        "| | |", "| --- | --- |",
        f"| base model | `{cfg.model}` (weights sha256 `{base.get('weights_sha256') or 'n/a'}`) |",
        f"| method | `{cfg.method}`, teacher `{cfg.teacher}` / `{cfg.teacher_context}`, prompts `{cfg.prompt_style}` |",
        f"| loss | `{cfg.loss.kind}`, top-{cfg.loss.top_k}, T {cfg.loss.temperature:g}, clip {cfg.loss.clip}, "
        f"reduction `{cfg.loss_reduction}` |",
        f"| optimiser | AdamW lr {cfg.lr:g} ({cfg.lr_schedule}), seed {cfg.seed} |",
        f"| precision | `{cfg.precision}` (weights in {weights_dtype}{', adapters in float32' if cfg.lora_rank else ''}"
        f"), attention "
        f"`{cfg.attn_implementation}`, saved as {cfg.save_dtype} |",
    ]
    for path, digest in data.items():
        lines.append(f"| data | `{Path(path).name}` sha256 `{digest}` |")
    if last is not None:
        lines.append(f"| final step | loss {last.loss:.4g}, kl {last.kl if last.kl is None else f'{last.kl:.4g}'}, "
                     f"reward {last.reward if last.reward is None else f'{last.reward:.3f}'}, "
                     f"rollout tokens {last.rollout_tokens} |")
    lines += ["", "Full settings: `rcsd_train_config.json` (rerun with `rcsd train --config rcsd_train_config.json`); "
              "per-step metrics: `metrics.parquet`.", "", "```python", load, "```", ""]
    return "\n".join(lines)


def _build_models(cfg: TrainConfig, ckpt: Path | None, trust_remote_code: bool, on_cpu: bool = False):
    """(student, teacher module or None, tokenizer); the teacher is None when it is the student itself.

    ``on_cpu``: load into host memory (in the compute dtype) so that sharding moves only each
    process's shard to the GPU, instead of a full student and teacher per GPU.
    """
    where = dict(device=torch.device("cpu") if on_cpu else pick_device(),
                 dtype=precision.base_dtype(cfg.precision, bool(cfg.lora_rank)),
                 attn_implementation=cfg.attn_implementation)
    loaded = load_model(cfg.model, trust_remote_code, **where)
    base, tok = loaded.model, loaded.tokenizer
    if cfg.lora_rank:
        from peft import LoraConfig, PeftModel, get_peft_model

        if cfg.teacher == "ema":
            raise RcsdError("--teacher ema is not supported with LoRA; use frozen or live")
        if ckpt is not None:
            student = PeftModel.from_pretrained(base, ckpt, is_trainable=True)
        else:
            student = get_peft_model(base, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                      lora_dropout=cfg.lora_dropout,
                                                      target_modules=lora_targets(cfg.lora_targets)))
            student.peft_config["default"].base_model_name_or_path = cfg.model
        return student, None, tok
    teacher = None if cfg.teacher == "live" else copy.deepcopy(base)
    student = load_model(str(ckpt), trust_remote_code, **where).model if ckpt is not None else base
    if teacher is not None and cfg.teacher == "ema" and ckpt is not None:
        from safetensors.torch import load_file

        teacher.load_state_dict(load_file(ckpt / "ema_teacher.safetensors"))
    if teacher is not None:
        teacher.requires_grad_(False).eval()
        if cfg.teacher == "frozen":  # no gradients, no optimizer state: no master copy needed
            teacher.to(precision.frozen_dtype(cfg.precision))
    return student, teacher, tok


def _teacher_view(cfg: TrainConfig, student, teacher, compute):
    """(hidden-state function, output head, scope) of the teacher; ``scope`` turns a LoRA student into its
    frozen base (for HF generation too). ``compute``: the precision's autocast context."""
    from contextlib import nullcontext

    if teacher is not None:
        module, head, scope = teacher, teacher.get_output_embeddings(), nullcontext
    elif cfg.lora_rank and cfg.teacher == "frozen":
        module, head, scope = student, student.get_output_embeddings(), student.disable_adapter
    else:
        module, head, scope = student, student.get_output_embeddings(), nullcontext

    def hidden(side):
        with scope(), compute():
            return aligned_hidden(module, side)

    return hidden, head, scope


@torch.no_grad()
def _ema_update(teacher, student, decay: float) -> None:
    sharding.reshard(teacher)  # sharded: both sides' parameters are then matching shards
    sharding.reshard(student)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)


def train(cfg: TrainConfig, rows: list, out: Path, *, resume: bool = False, trust_remote_code: bool = False,
          inputs: list[str] = (), objective=None) -> list[MetricsRow]:
    """Run the loop and leave a Hugging Face checkpoint plus metrics.parquet in ``out``.

    Under ``torchrun``/``accelerate launch`` each process takes every ``world``-th item of the
    step's global batch; gradients and statistics are summed across processes.
    """
    rank, world = dist.setup()
    main = rank == 0
    log = info if main else (lambda *_: None)
    cfg = resolve_precision(cfg)
    device_type = pick_device().type
    compute = lambda: precision.compute(cfg.precision, device_type)  # noqa: E731
    torch.manual_seed(cfg.seed)
    ckpt = latest_checkpoint(out) if resume else None
    start_step, metrics = 0, []
    if resume and main:  # a save killed half-way leaves checkpoint-N.tmp: incomplete by construction
        for partial in out.glob("checkpoint-*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_step, metrics = state["step"], [MetricsRow(**m) for m in state["metrics"]]
        log(f"resuming from {ckpt} (step {start_step})")
    sharded = cfg.sharding != "replicate" and dist.is_initialized()
    student, teacher, tok = _build_models(cfg, ckpt, trust_remote_code, on_cpu=sharded)
    dist.broadcast_from_main(student)
    dist.broadcast_from_main(teacher)
    if sharded:  # fully_shard moves each shard to the device
        policy = dict(mixed=cfg.precision == "bf16-mixed", offload=cfg.offload == "full")
        reshard = cfg.sharding == "full-shard"
        student = sharding.shard(student, reshard, device_type, **policy)
        teacher = None if teacher is None else sharding.shard(teacher, reshard, device_type, **policy)
        log(f"FSDP2 {cfg.sharding} over {world} processes")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if ckpt is not None:
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        sharding.load_optimizer_state(student, optimizer, opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    teacher_hidden, teacher_head, teacher_scope = _teacher_view(cfg, student, teacher, compute)
    rollouts = build_rollouts(cfg, student, teacher, tok, teacher_scope, compute,
                              trust_remote_code=trust_remote_code)
    if ckpt is not None:  # engines start from --model: give them the resumed weights
        rollouts.after_update()
    clock = PhaseClock()
    objective = objective or OBJECTIVES[cfg.method]
    used = metrics[-1].rollout_tokens if metrics else 0
    tracker = open_tracker(cfg.report_to, out, cfg.model_dump(mode="json")) if main else Tracker()
    with progress(f"train ({cfg.method})", cfg.steps, enabled=main) as advance:
        advance(start_step)
        for step in range(start_step, cfg.steps):
            if cfg.max_rollout_tokens and used >= cfg.max_rollout_tokens:
                log(f"rollout budget of {cfg.max_rollout_tokens} tokens reached after {step} steps")
                break
            t0 = time.perf_counter()
            batch = [rows[i] for i in batch_order(len(rows), cfg.batch_size, step, cfg.seed)[rank::world]]
            ctx = StepContext(student, tok, teacher_hidden, teacher_head, cfg, step, rollouts.teacher, rank,
                              student_generate=rollouts.student, clock=clock, compute=compute)
            optimizer.zero_grad(set_to_none=True)
            res = objective(ctx, batch)
            with clock("optimizer"):
                if world > 1:
                    if not sharded:  # FSDP already summed (reduce-scattered) them
                        dist.sum_gradients(params)
                    res = _combine(res)
                grad_norm = sharding.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                lr = scheduler.get_last_lr()[0]
                first = step == 0  # once per run history: a resumed run's metrics equal an uninterrupted one's
                before = precision.snapshot(params) if first else None
                if math.isfinite(grad_norm):
                    optimizer.step()
                moved = precision.moved_share(params, before) if first else None
                scheduler.step()
                if cfg.teacher == "ema" and teacher is not None:
                    _ema_update(teacher, student, cfg.ema_decay)
            rollouts.after_update(clock)
            if step == start_step:
                rollouts.report_sync(student, tok, log)
            seconds = time.perf_counter() - t0
            used += res.rollout_tokens
            n = max(res.tokens, 1)
            metrics.append(MetricsRow(
                step=step + 1, method=cfg.method, loss=res.loss_sum / n if res.objective is None else res.objective,
                kl=None if res.kl_sum is None else res.kl_sum / n,
                top1_agreement=None if res.agree_sum is None else res.agree_sum / n, reward=res.reward,
                grad_norm=grad_norm, lr=lr, completion_tokens=res.tokens,
                mean_completion_length=res.tokens / max(1, res.reward_count or min(cfg.batch_size, len(rows))),
                rollout_tokens=used, tokens_per_second=res.tokens / seconds, seconds=seconds, weights_moved=moved,
                **clock.take()))
            if cfg.precision == "bf16" and moved is not None and moved < 0.99:
                if main:
                    warn(f"--precision bf16: only {moved:.1%} of the weights that got a gradient moved in step "
                         f"{step + 1} (an update of ~lr {cfg.lr:g} rounds away for weights above "
                         f"{precision.vanishing_below(cfg.lr):.1e}); --precision bf16-mixed keeps fp32 master weights")
            advance(1)
            m = metrics[-1]
            extras = "".join(f"  {k} {v:.4f}" for k, v in (("kl", m.kl), ("top1", m.top1_agreement),
                                                           ("reward", m.reward)) if v is not None)
            log(f"step {m.step}/{cfg.steps}  loss {m.loss:.4f}{extras}  grad {m.grad_norm:.3f}  "
                f"tokens {m.completion_tokens}  {m.seconds:.1f}s")
            if main:  # live: readable (and plottable) while the run goes on, replaced atomically
                write_metrics(out, metrics, cfg, inputs, world)
                tracker.log(m.step, numeric(m.model_dump()))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out / f"checkpoint-{step + 1}", student, teacher, tok, optimizer, scheduler, step + 1,
                                cfg, metrics)
                if main:
                    prune_checkpoints(out, cfg.save_total_limit, keep=ckpt)
    final_state = sharding.full_state_dict(student) if sharded else None
    if main:
        tracker.close()
        save_final(out, student, tok, cfg, final_state)
        (out / "README.md").write_text(model_card(cfg, metrics, list(inputs), world))
        (out / "rcsd_train_config.json").write_text(cfg.model_dump_json(indent=2))
        write_metrics(out, metrics, cfg, inputs, world)
    dist.barrier()
    rollouts.close()
    return metrics


def resolve_precision(cfg: TrainConfig) -> TrainConfig:
    """An unset ``--precision``: bf16-mixed on CUDA, fp32 elsewhere (recorded in the run's config)."""
    if cfg.precision is not None:
        return cfg
    return cfg.model_copy(update={"precision": precision.resolve(None, pick_device().type)})


def write_metrics(out: Path, metrics: list[MetricsRow], cfg: TrainConfig, inputs, world: int) -> None:
    write_artifact(out / "metrics.parquet", "metrics", metrics, stage="train", config=cfg, model_id=cfg.model,
                   inputs=inputs, overwrite=True, extra={"world_size": world})


def _combine(res):
    """Sum a step's statistics over processes (``tokens`` is already global)."""
    from rcsd_cli.train.objectives import StepResult

    count = dist.reduce_sum(res.reward_count)
    reward = None
    if res.reward is not None and count:
        reward = dist.reduce_sum(res.reward * res.reward_count) / count
    return StepResult(dist.reduce_sum(res.loss_sum), int(res.tokens),
                      None if res.kl_sum is None else dist.reduce_sum(res.kl_sum),
                      None if res.agree_sum is None else dist.reduce_sum(res.agree_sum), reward,
                      int(dist.reduce_sum(res.rollout_tokens)), int(count),
                      None if res.objective is None else dist.reduce_sum(res.objective))


# What ``rcsd train`` writes into its output folder (weights and tokenizer files via transformers/peft).
_TRAIN_FILES = re.compile(r"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|"
                          r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.json|"
                          r"merges\.txt|chat_template\.jinja|added_tokens\.json|tokenizer\.model|"
                          r"adapter_config\.json|adapter_model\.safetensors|README\.md|rcsd_train_config\.json|"
                          r"metrics\.parquet|\.metrics\.parquet\.tmp-\d+|merged|runs|wandb|checkpoint-\d+(\.tmp)?)")


def _is_train_output(path: Path) -> bool:
    return bool(_TRAIN_FILES.fullmatch(path.name))


def _train_marker(path: Path) -> bool:
    return path.name == "rcsd_train_config.json" or (path.name.startswith("checkpoint-")
                                                      and (path / "trainer_state.json").is_file())


def check_output_folder(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RcsdError(f"{out}: output exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise RcsdError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to replace it")
    if out.exists() and overwrite and not resume:
        clear_own_folder(out, _is_train_output, _train_marker, "a training run")
    out.mkdir(parents=True, exist_ok=True)
