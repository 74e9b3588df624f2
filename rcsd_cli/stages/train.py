"""``rcsd train``: RCSD and its baselines (OPSD, GRPO, SFT), online or from stored samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcsd_cli.backends import vllm as vllm_backend
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.options import with_options
from rcsd_cli.data.samples import read_samples
from rcsd_cli.errors import RcsdError, where
from rcsd_cli.modeling import distributed as dist
from rcsd_cli.modeling import precision
from rcsd_cli.modeling.generation import check_static_attention, use_compiled_decoding
from rcsd_cli.modeling.sharding import from_launcher_env
from rcsd_cli.models import load_model_config, load_tokenizer, pick_device
from rcsd_cli.rubrics.ablations import ablate
from rcsd_cli.rubrics.views import PromptView, longest_lengths
from rcsd_cli.train.checkpoints import check_output_folder
from rcsd_cli.train.engine_sizing import check_engines, engine_sizes
from rcsd_cli.train.memory import estimate, format_plan
from rcsd_cli.train.methods.offline import OfflineItem
from rcsd_cli.train.monitor import held_out_items
from rcsd_cli.train.rehearsal import fits, format_rehearsal, rehearse
from rcsd_cli.train.rollout_engines import separate_teacher_engine
from rcsd_cli.train.served_teacher import placement
from rcsd_cli.train.trainer import train
from rcsd_cli.ui import info


def offline_items(samples_path: str, scores_path: str, top_k: int) -> list[OfflineItem]:
    """Join samples with the teacher top-k stored by ``score --teacher-logprobs``, each token's entries cut to
    the ``top_k`` most likely (``--loss-top-k``)."""
    samples, _ = read_samples(samples_path)
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
        stored = min(len(entries) for entries in sc.teacher_topk_ids)
        if stored < top_k:
            raise RcsdError(f"{where(scores_path, i)}: {stored} teacher log-probs stored per token, fewer than "
                            f"--loss-top-k {top_k} (rcsd score --teacher-top-k {top_k} stores enough)")
        ids, lps = zip(*(_most_likely(i_, lp, top_k) for i_, lp in zip(sc.teacher_topk_ids, sc.teacher_topk_logprobs,
                                                                         strict=True)), strict=True)
        items.append(OfflineItem(s.prompt_token_ids, s.completion_token_ids, list(ids), list(lps)))
    return items


def _most_likely(ids: list[int], logprobs: list[float], k: int) -> tuple[list[int], list[float]]:
    order = sorted(range(len(ids)), key=lambda j: -logprobs[j])[:k]
    return [ids[j] for j in order], [logprobs[j] for j in order]


def check_batch(cfg: TrainConfig, world: int) -> None:
    """Every process trains on its share of each step's items (``[rank::world]``), so each needs one."""
    if cfg.batch_size < world:
        raise RcsdError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes: every process needs "
                        f"at least one item per step; use --batch-size {world} or more, or fewer processes")
    sharding = cfg.distributed.sharding
    if sharding in ("full-shard", "shard-grad-op") and cfg.batch_size % world:
        raise RcsdError(f"--sharding {sharding}: --batch-size {cfg.batch_size} must be a multiple of the "
                        f"{world} processes (every process runs the same number of passes)")


def check_sharding(cfg: TrainConfig, world: int) -> None:
    """FSDP needs every process to run the same number of forward passes."""
    check_batch(cfg, world)
    sharding, offload = cfg.distributed.sharding, cfg.distributed.offload
    if offload != "none" and (sharding == "replicate" or not dist.is_initialized()):
        raise RcsdError(f"--offload {offload} needs a sharded run: launch with torchrun (even one process) and "
                        "--sharding full-shard or shard-grad-op")
    if sharding == "replicate":
        return
    if not dist.is_initialized():
        info(f"--sharding {sharding} has no effect in a single process without a launcher")
        return
    if cfg.lora.merge:
        raise RcsdError(f"--merge-lora is not available with --sharding {sharding}: the adapter in OUTPUT loads "
                        "merged with --model OUTPUT in every stage")
    if cfg.rollout.backend == "vllm" and cfg.lora.rank:
        raise RcsdError(f"--rollout-backend vllm with --lora-rank is not available with --sharding {sharding}; "
                        "use --sharding replicate (adapters are small)")
    if cfg.rollout.backend == "hf" and cfg.generation.compile_decoding:
        raise RcsdError(f"--compile-decoding is not available with --sharding {sharding}: FSDP2's hooks split the "
                        "compiled step into about two graphs per layer and the gathered weights are new tensors "
                        "every rollout (CUDA graphs recorded again each step); use --no-compile-decoding, "
                        "--sharding replicate or --rollout-backend vllm")


def decoding_for(cfg: TrainConfig, sharded: bool) -> TrainConfig:
    """Sharded HF rollouts decode with the plain loop (see ``check_sharding``), whatever the device's default."""
    sharded = sharded and cfg.distributed.sharding not in (None, "replicate")
    if sharded and cfg.rollout.backend == "hf" and cfg.generation.compile_decoding is None:
        return cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"compile_decoding": False})})
    return cfg


def resolve_sharding(cfg: TrainConfig) -> TrainConfig:
    """An unset ``sharding`` takes what an accelerate FSDP config asks for, else replicate."""
    if cfg.distributed.sharding is not None:
        return cfg
    sharding, note = from_launcher_env(None)
    if note and dist.is_main():
        info(note)
    return with_options(cfg, sharding=sharding)


def filter_long_teacher_prompts(rows: list, cfg: TrainConfig, trust_remote_code: bool) -> tuple[list, dict]:
    """``--max-teacher-prompt-tokens``: the rows kept, and what to record about the ones dropped."""
    if not cfg.max_teacher_prompt_tokens:
        return rows, {}

    kept, dropped = PromptView.for_train(cfg).within_teacher_prompt_limit(
        rows, load_tokenizer(cfg.model, trust_remote_code), cfg.max_teacher_prompt_tokens)
    what = f"teacher prompt over {cfg.max_teacher_prompt_tokens} tokens"
    if not kept:
        raise RcsdError(f"{cfg.rubrics}: every one of {len(rows)} items has a {what} (--max-teacher-prompt-tokens)")
    if dist.is_main():
        info(f"dropped {dropped} of {len(rows)} items: {what}")
    return kept, {"teacher_prompt_filter": {"max_tokens": cfg.max_teacher_prompt_tokens, "dropped": dropped,
                                            "kept": len(kept)}}


def run_train(cfg: TrainConfig, output: Path, *, overwrite: bool = False, resume: bool = False,
              trust_remote_code: bool = False):
    """Validate inputs, then train online (``cfg.rubrics``) or one offline round (``cfg.samples``)."""
    cfg = resolve_sharding(cfg)
    if cfg.samples or cfg.scores:
        if not (cfg.samples and cfg.scores):
            raise RcsdError("an offline round needs both --samples and --scores")
        rows: list[Any] = offline_items(cfg.samples, cfg.scores, cfg.loss.top_k)  # stored samples, or rubric rows below
        inputs = [cfg.samples, cfg.scores]
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
    if cfg.rollout.backend == "vllm":
        if not vllm_backend.vllm_available():  # before any folder is made or weight loaded
            raise RcsdError("--rollout-backend vllm needs vLLM: pip install 'rcsd[vllm]' (CPU: examples/test_vllm.sh)")
    if cfg.teacher.rubric_ablation:
        rows = ablate(rows, cfg.teacher.rubric_ablation, cfg.seed)
    rows, data_notes = filter_long_teacher_prompts(rows, cfg, trust_remote_code)
    if cfg.monitor.every:  # refuse held-out items that are training items before any folder is made

        held_out_items(cfg, rows)
    if cfg.rollout.backend == "hf":  # before any weight is loaded
        if use_compiled_decoding(cfg.generation, pick_device()):
            check_static_attention(cfg.attn_implementation)
    rank, world = dist.setup(always=cfg.distributed.sharding != "replicate")
    check_sharding(cfg, world)
    cfg = decoding_for(cfg, dist.is_initialized())
    if rank == 0:
        check_output_folder(output, overwrite, resume)
    dist.barrier()
    try:
        metrics = train(cfg, rows, output, resume=resume, trust_remote_code=trust_remote_code, inputs=inputs,
                        data_notes=data_notes)
    finally:
        dist.teardown()
    if metrics and rank == 0:
        info(f"trained {metrics[-1].step} steps ({cfg.method}); final loss {metrics[-1].loss:.4f}; model in {output}")
    return metrics


def dry_run_target(cfg: TrainConfig) -> tuple[str, float]:
    """(device type, GiB per process) the dry run plans for: ``--device-memory`` GiB of CUDA device, else this
    machine's GPU, else its RAM."""
    import os

    import torch

    if cfg.dry_run.device_memory:
        return "cuda", cfg.dry_run.device_memory
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(0).total_memory / 2**30
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def dry_run(cfg: TrainConfig, trust_remote_code: bool = False) -> dict:
    """What a run would feed the model and whether its step fits, without loading weights or writing anything.

    Returns (and the command prints) the resolved config; the first item's student prompt, teacher prompt, and
    for reason-first the analysis prompt and transition, decoded from the very token ids training would use;
    where the teacher runs (``teacher``: in this process, or a server's URL);
    the estimated peak memory per device (``memory``); and one step simulated at the run's full shapes under
    fake tensors (``rehearsal``), with the verdict under ``problem`` (None when it fits).
    """
    device_type, device_gib = dry_run_target(cfg)
    cfg = resolve_sharding(cfg)
    cfg = cfg.model_copy(update={"precision": precision.resolve(cfg.precision, device_type)})
    shown: dict = {"config": cfg.model_dump(mode="json")}
    tok, why = None, "no --rubrics"
    if cfg.rubrics or (cfg.samples and cfg.scores):  # items to measure need the tokenizer
        try:
            tok = load_tokenizer(cfg.model, trust_remote_code)
        except RcsdError as exc:
            why = f"no tokenizer: {exc}"
    lengths = _item_lengths(cfg, tok, shown, trust_remote_code) if tok is not None else None
    new = cfg.generation.max_new_tokens
    if lengths is None:
        lengths = _limit_lengths(cfg)
        shown["lengths"] = (f"from the run's limits ({why}): student prompt {lengths['student_prompt']} tokens "
                            f"(--dry-run-prompt-tokens), teacher prompt {lengths['teacher_prompt']}, completion {new}")
    else:
        shown["lengths"] = (f"the longest item: student prompt {lengths['student_prompt']} tokens, teacher prompt "
                            f"{lengths['teacher_prompt']}, completion {new} (--max-new-tokens)")
    shown["teacher"] = placement(cfg)
    world = cfg.dry_run.processes or dist.world()[1]
    check_batch(cfg, world)
    cfg = decoding_for(cfg, world > 1)
    model_config = load_model_config(cfg.model, trust_remote_code)
    plan = estimate(cfg, model_config, student_tokens=lengths["student_prompt"] + new,
                    teacher_tokens=lengths["teacher_prompt"] + new, world=world, device_type=device_type,
                    device_gib=device_gib)
    shown["memory"] = format_plan(plan)
    measured = rehearse(cfg, model_config, lengths=lengths, world=world)
    phases, problem = fits(cfg, measured, plan, device_gib, device_type == "cuda")
    if cfg.rollout.backend == "vllm":  # the engines as vLLM will check them at start
        gpu_gib = device_gib if device_type == "cuda" else None
        sizes = engine_sizes(cfg, model_config, lengths, n_params=measured["parameters"],
                             dtype_bytes=precision.frozen_dtype(cfg.precision).itemsize, device_gib=gpu_gib,
                             separate_teacher=separate_teacher_engine(cfg))
        shown["vllm engines"] = "\n".join(size.describe(gpu_gib) for size in sizes)
        problem = problem or check_engines(sizes, gpu_gib)
    shown["simulated step"] = format_rehearsal(measured, phases, problem, world=world, lengths=lengths,
                                               device_gib=device_gib,
                                               tflops=cfg.dry_run.device_tflops if device_type == "cuda" else None,
                                               utilisation=cfg.dry_run.utilisation)
    shown["problem"] = problem
    return shown


def _limit_lengths(cfg: TrainConfig) -> dict[str, int]:
    """Sequence lengths from the run's limits alone: the longest prompt (``--dry-run-prompt-tokens``, or
    ``--max-teacher-prompt-tokens`` on the teacher's side), plus a reason-first analysis at its limit."""
    student = cfg.dry_run.prompt_tokens
    teacher = cfg.max_teacher_prompt_tokens or student
    if PromptView.for_train(cfg).reason_first:
        teacher += cfg.reason_first.max_new_tokens
    return {"student_prompt": student, "teacher_prompt": teacher, "completion": cfg.generation.max_new_tokens}


def _item_lengths(cfg: TrainConfig, tok, shown: dict, trust_remote_code: bool) -> dict[str, int] | None:
    """The longest item's lengths (the longest, not the first, sizes the run), and the first item's prompts
    decoded into ``shown``; None without items to read."""
    new = cfg.generation.max_new_tokens
    if cfg.samples:
        items = offline_items(cfg.samples, cfg.scores, cfg.loss.top_k) if cfg.scores else []
        if not items:
            return None
        shown["student_prompt"] = tok.decode(items[0].prompt_ids)
        n = max(len(item.prompt_ids) for item in items)
        return {"student_prompt": n, "teacher_prompt": n, "completion": new}
    if not cfg.rubrics:
        return None
    rows, _ = read_artifact(cfg.rubrics, "rubrics")

    rows, notes = filter_long_teacher_prompts(ablate(rows, cfg.teacher.rubric_ablation, cfg.seed), cfg,
                                              trust_remote_code)
    if notes:
        kept = notes["teacher_prompt_filter"]
        shown["data_filter"] = (f"dropped {kept['dropped']} of {kept['dropped'] + kept['kept']} items: teacher "
                                f"prompt over {kept['max_tokens']} tokens")
    shown["item"] = rows[0].id
    view = PromptView.for_train(cfg)
    every = [view.item_prompts(tok, row) for row in rows]
    shown.update({k: tok.decode(v) for k, v in every[0].items()})
    return longest_lengths(cfg, every)
