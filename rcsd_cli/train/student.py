"""The student and teacher modules of a run: loading (or restoring) them, LoRA adapters, the teacher's
copy and dtype, gradient checkpointing, the teacher's view (hidden states, head, the scope that turns a
LoRA student into its frozen base) and the EMA update."""

from __future__ import annotations

import copy
import typing
from contextlib import nullcontext
from pathlib import Path

import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling import precision, sharding
from rcsd_cli.modeling.batching import aligned_hidden
from rcsd_cli.models import load_model, pick_device

if typing.TYPE_CHECKING:
    from transformers import PreTrainedModel


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


def build_models(cfg: TrainConfig, ckpt: Path | None, trust_remote_code: bool, on_cpu: bool = False):
    """(student, teacher module or None, tokenizer); the teacher is None when it is the student itself.

    ``on_cpu``: load into host memory (in the compute dtype) so that sharding moves only each
    process's shard to the GPU, instead of a full student and teacher per GPU.
    """
    device = torch.device("cpu") if on_cpu else pick_device()
    dtype = precision.base_dtype(cfg.precision, bool(cfg.lora.rank))
    loaded = load_model(cfg.model, trust_remote_code, device, dtype, cfg.attn_implementation)
    base, tok = loaded.model, loaded.tokenizer
    if cfg.lora.rank and ckpt is not None:
        from peft import PeftModel

        _refuse_ema_with_lora(cfg)
        # the adapter's tensors go where the base is (a bare "cuda" would be GPU 0 on every rank)
        adapted = PeftModel.from_pretrained(base, ckpt, is_trainable=True, torch_device=str(device))
        return typing.cast("PreTrainedModel", adapted), None, tok  # peft forwards the model's attributes
    student, teacher = student_and_teacher(cfg, base)
    if ckpt is not None and not cfg.lora.rank:
        student = load_model(str(ckpt), trust_remote_code, device, dtype, cfg.attn_implementation).model
    if teacher is not None and cfg.teacher.kind == "ema" and ckpt is not None:
        from safetensors.torch import load_file

        teacher.load_state_dict(load_file(ckpt / "ema_teacher.safetensors"))
    return student, teacher, tok


def student_and_teacher(cfg: TrainConfig, base):
    """(student, teacher module or None) from a freshly built base model: LoRA adapters on it (the teacher is
    then the base with adapters disabled), or a teacher copy (``frozen``: in the frozen dtype, no grad; none
    when the teacher is served)."""
    if cfg.lora.rank:
        from peft import LoraConfig, get_peft_model

        _refuse_ema_with_lora(cfg)
        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # any number
                          lora_dropout=cfg.lora.dropout, target_modules=lora_targets(cfg.lora.targets))
        student = get_peft_model(base, lora)
        student.peft_config["default"].base_model_name_or_path = cfg.model
        return student, None
    # a served teacher (--teacher-base-url) runs elsewhere: no copy here
    teacher = None if cfg.teacher.kind == "live" or cfg.teacher.base_url else copy.deepcopy(base)
    if teacher is not None:
        teacher.requires_grad_(False).eval()
        if cfg.teacher.kind == "frozen":  # no gradients, no optimizer state: no master copy needed
            teacher.to(precision.frozen_dtype(cfg.precision))
    return base, teacher


def _refuse_ema_with_lora(cfg: TrainConfig) -> None:
    if cfg.teacher.kind == "ema":
        raise RcsdError("--teacher ema is not supported with LoRA; use frozen or live")


def teacher_view(cfg: TrainConfig, student, teacher, compute):
    """(hidden-state function, output head, scope) of the teacher; ``scope`` turns a LoRA student into its
    frozen base (for HF generation too). ``compute``: the precision's autocast context."""
    if teacher is not None:
        module, head, scope = teacher, teacher.get_output_embeddings(), nullcontext
    elif cfg.lora.rank and cfg.teacher.kind == "frozen":
        module, head, scope = student, student.get_output_embeddings(), student.disable_adapter
    else:
        module, head, scope = student, student.get_output_embeddings(), nullcontext

    def hidden(side):
        with scope(), compute():
            return aligned_hidden(module, side)

    return hidden, head, scope


@torch.no_grad()
def ema_update(teacher, student, decay: float) -> None:
    sharding.reshard(teacher)  # sharded: both sides' parameters are then matching shards
    sharding.reshard(student)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
