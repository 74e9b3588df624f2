"""What a training run leaves on disk: checkpoints, the final model, its card, metrics, the folder rules.

Checkpoints (``--save-every``) hold the model (or LoRA adapter), the EMA teacher, optimizer and
scheduler states and the metrics so far, written to ``checkpoint-N.tmp`` and renamed, so a
killed save never looks complete; ``--save-total-limit`` prunes old ones. The final model is
saved in ``--save-dtype`` with a model card (``README.md``) and ``rcsd_train_config.json``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import clear_own_folder, library_versions, model_provenance, sha256_file, write_artifact
from rcsd_cli.data.rows import MetricsRow
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling import distributed as dist
from rcsd_cli.modeling import precision, sharding


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
    ema_state = sharding.full_state_dict(teacher) if cfg.teacher.kind == "ema" else None
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


def remove_partial_checkpoints(out: Path) -> None:
    """A save killed half-way leaves ``checkpoint-N.tmp``: incomplete by construction."""
    for partial in out.glob("checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> tuple[int, list[MetricsRow]]:
    """(step, metrics so far) of a checkpoint."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state["step"], [MetricsRow(**m) for m in state["metrics"]]


def load_optimizer(ckpt: Path, student, optimizer, scheduler) -> None:
    """Restore AdamW and the schedule. The file is memory-mapped onto the host (never onto whichever GPU
    saved it); a sharded run reads the optimizer state on rank 0 only and broadcasts each rank its shard."""
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu", mmap=True)
    sharded = sharding.is_sharded(student) and dist.is_initialized()
    state = opt_state["optimizer"] if dist.is_main() or not sharded else {}
    sharding.load_optimizer_state(student, optimizer, state, from_rank0=sharded)
    scheduler.load_state_dict(opt_state["scheduler"])


def write_final(out: Path, student, tok, cfg: TrainConfig, metrics: list[MetricsRow], inputs, world: int,
                state_dict=None, data_notes: dict | None = None) -> None:
    """Everything at the top of OUT once training ends (rank 0): weights, card, config, metrics."""
    save_final(out, student, tok, cfg, state_dict)
    (out / "README.md").write_text(model_card(cfg, metrics, list(inputs), world, data_notes))
    (out / "rcsd_train_config.json").write_text(cfg.model_dump_json(indent=2))
    write_metrics(out, metrics, cfg, inputs, world, data_notes)


def save_final(out: Path, student, tok, cfg: TrainConfig, state_dict=None) -> None:
    """The trained model: full weights, or with LoRA the PEFT adapter (plus merged weights if asked).

    Full and merged weights are written in ``--save-dtype``; the adapter keeps its training dtype.
    """
    if cfg.lora.rank:
        sharding.unwrap(student).save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tok.save_pretrained(out)
        if cfg.lora.merge:
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


def model_card(cfg: TrainConfig, metrics: list[MetricsRow], inputs: list[str], world: int,
               data_notes: dict | None = None) -> str:
    """``OUT/README.md``: what was trained from what, how, and how to load it."""
    base = model_provenance(cfg.model)
    data = {str(p): sha256_file(p) for p in inputs if Path(p).is_file()}
    last = metrics[-1] if metrics else None
    weights_dtype = str(precision.base_dtype(cfg.precision, bool(cfg.lora.rank))).removeprefix("torch.")
    kind = f"LoRA adapter (r {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, {cfg.lora.targets})" if cfg.lora.rank \
        else "full fine-tune"
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"OUT\")"
            if cfg.lora.rank else
            "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"OUT\")")
    lines = [
        "---", "library_name: " + ("peft" if cfg.lora.rank else "transformers"), f"base_model: {cfg.model}",
        "tags: [rcsd, self-distillation, rubrics]", "---", "",
        f"# {cfg.method.upper()} ({cfg.task}) of {cfg.model}", "",
        f"Trained with rcsd {library_versions()['rcsd']} (`rcsd train`), {kind}, {len(metrics)} optimizer steps of "
        f"{cfg.batch_size} prompts on {world} process(es).", "",
        "| | |", "| --- | --- |",
        f"| base model | `{cfg.model}` (weights sha256 `{base.get('weights_sha256') or 'n/a'}`) |",
        f"| method | `{cfg.method}`, teacher `{cfg.teacher.kind}` / `{cfg.teacher.context}`, "
        f"prompts `{cfg.prompt_style}` |",
        f"| loss | `{cfg.loss.kind}`, top-{cfg.loss.top_k}, T {cfg.loss.temperature:g}, clip {cfg.loss.clip}, "
        f"reduction `{cfg.loss_reduction}` |",
        f"| optimiser | AdamW lr {cfg.lr:g} ({cfg.lr_schedule}), seed {cfg.seed} |",
        f"| precision | `{cfg.precision}` (weights in {weights_dtype}{', adapters in float32' if cfg.lora.rank else ''}"
        f"), attention "
        f"`{cfg.attn_implementation}`, saved as {cfg.save_dtype} |",
    ]
    for path, digest in data.items():
        lines.append(f"| data | `{Path(path).name}` sha256 `{digest}` |")
    notes = data_notes or {}
    if (best := notes.get("best")) is not None:
        lines.append(f"| best weights | `best/`: {best['metric']} {best['value']:.4g} at step {best['step']} |")
    if (stop := notes.get("stopped")) is not None:
        lines.append(f"| stopped | after step {stop['step']}: `{stop['rule']}` ({stop['value']:.4g} against "
                     f"{stop['line']:.4g}) |")
    if (kept := notes.get("teacher_prompt_filter")) is not None:
        lines.append(f"| data filter | {kept['dropped']} of {kept['dropped'] + kept['kept']} items dropped: teacher "
                     f"prompt over {kept['max_tokens']} tokens |")
    if last is not None:
        lines.append(f"| final step | loss {last.loss:.4g}, kl {last.kl if last.kl is None else f'{last.kl:.4g}'}, "
                     f"reward {last.reward if last.reward is None else f'{last.reward:.3f}'}, "
                     f"rollout tokens {last.rollout_tokens} |")
    lines += ["", "Full settings: `rcsd_train_config.json` (rerun with `rcsd train --config rcsd_train_config.json`); "
              "per-step metrics: `metrics.parquet`.", "", "```python", load, "```", ""]
    return "\n".join(lines)


def write_metrics(out: Path, metrics: list[MetricsRow], cfg: TrainConfig, inputs, world: int,
                  data_notes: dict | None = None) -> None:
    write_artifact(out / "metrics.parquet", "metrics", metrics, stage="train", config=cfg, model_id=cfg.model,
                   inputs=inputs, overwrite=True, extra={"world_size": world, **(data_notes or {})})


# What ``rcsd train`` writes into its output folder (weights and tokenizer files via transformers/peft).
_TRAIN_FILES = re.compile(r"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|"
                          r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.json|"
                          r"merges\.txt|chat_template\.jinja|added_tokens\.json|tokenizer\.model|"
                          r"adapter_config\.json|adapter_model\.safetensors|README\.md|rcsd_train_config\.json|"
                          r"metrics\.parquet|\.metrics\.parquet\.tmp-\d+|merged|runs|wandb|best|checkpoint-\d+(\.tmp)?)")


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
