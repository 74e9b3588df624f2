"""Numeric precision of training: what the weights are stored in, and what the matmuls compute in.

- ``fp32``: weights, gradients, AdamW moments and compute in fp32 (the CPU default).
- ``bf16-mixed``: fp32 *master* weights, gradients and AdamW moments; forward and backward
  matmuls in bf16 (``torch.autocast``; under FSDP2 also a ``MixedPrecisionPolicy`` that gathers
  bf16 parameters and reduces gradients in fp32). This is what HF Trainer/TRL call
  ``bf16=True`` and what the authors' DeepSpeed bf16 run kept. The CUDA default.
- ``bf16``: weights, gradients and AdamW moments stored in bf16, no master copy. Half the
  memory, but an update smaller than half a bf16 ulp of its weight rounds away. bf16 keeps 8
  significant bits, so half an ulp of a weight ``w`` is more than ``|w| / 512``; AdamW's first
  step moves every weight by about ``lr``, so at lr 5e-6 no weight above ~2e-3 in magnitude
  (the power of two above ``256 * lr``) moves at all (measured: 1% of SmolLM2-135M's weights
  move). A pure-bf16 run where most weights stay put warns once, with the measured share.

A frozen teacher has no gradients and no optimizer state, so under ``bf16-mixed`` its own copy
is held in bf16 (half its memory). With LoRA the frozen base is held in bf16 the same way (as HF
Trainer + peft with ``bf16=True``) and only the adapters are fp32 master weights.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import get_args

import torch

from rcsd_cli.configs.groups import Precision
from rcsd_cli.modeling import distributed as dist

PRECISIONS: tuple[str, ...] = get_args(Precision)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Of a weight entry: share sampled per tensor to measure how many moved (exact below this size).
_SAMPLE = 1 << 16


def resolve(precision: str | None, device_type: str) -> str:
    """``None`` (auto): bf16-mixed on CUDA, fp32 elsewhere."""
    if precision is not None:
        return precision
    return "bf16-mixed" if device_type == "cuda" else "fp32"


def param_dtype(precision: str | None) -> torch.dtype:
    """The dtype trainable weights (and so AdamW's moments) are stored in."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def base_dtype(precision: str | None, lora: bool) -> torch.dtype:
    """The dtype the model loads in: with LoRA the base is frozen (no master copy needed), so it is
    bf16 unless the run computes in fp32; peft keeps the adapters themselves in fp32."""
    return frozen_dtype(precision) if lora else param_dtype(precision)


def frozen_dtype(precision: str | None) -> torch.dtype:
    """A frozen copy (teacher) only runs forward: bf16 unless the run computes in fp32 (or precision is still
    unset, which the dtype functions read as fp32: train resolves it first)."""
    return torch.bfloat16 if precision in ("bf16-mixed", "bf16") else torch.float32


def compute(precision: str | None, device_type: str) -> AbstractContextManager:
    """The context forward passes run in: bf16 autocast for ``bf16-mixed``, else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


def save_dtype(choice: str, model_config) -> torch.dtype:
    """``--save-dtype``: ``auto`` keeps the dtype the model's config declares (fp32 if none)."""
    if choice != "auto":
        return _DTYPES[choice]
    declared = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


def vanishing_below(lr: float) -> float:
    """From this magnitude up, a pure-bf16 weight ignores an update of size ``lr``.

    A bf16 weight in [2^e, 2^(e+1)) has an ulp of 2^(e-7); an update under half of it, 2^(e-8),
    rounds away. So every weight in a binade with 2^e > 256 * lr ignores it: the threshold is
    the power of two above 256 * lr (1.95e-3 at lr 5e-6; some weights from 1.28e-3 up already).
    """
    return 2.0 ** math.ceil(math.log2(256.0 * lr))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sample_index(n: int) -> torch.Tensor | None:
    return None if n <= _SAMPLE else torch.arange(_SAMPLE) * (n // _SAMPLE)  # evenly strided, in bounds


def _sampled(t: torch.Tensor) -> torch.Tensor:
    """This process's entries of ``t``, flat; an evenly strided subset of a large tensor."""
    flat = _local(t.detach()).reshape(-1)
    idx = _sample_index(flat.numel())
    return flat if idx is None else flat[idx.to(flat.device)]


def snapshot(params) -> list[torch.Tensor]:
    """A (sampled) copy of the trainable weights, to measure afterwards which ones an update moved."""
    return [_sampled(p).clone() for p in params]


@torch.no_grad()
def moved_share(params, before: list[torch.Tensor]) -> float | None:
    """Share of weight entries that received a non-zero gradient and changed since ``before``.

    Entries without gradient (embedding rows of tokens the step never saw) are left out: no
    optimizer moves them in the first step, whatever the precision.
    """
    moved: float = 0
    counted: float = 0
    for p, old in zip(params, before, strict=True):
        if p.grad is None:
            continue
        got = _sampled(p.grad) != 0
        counted += int(got.sum())
        moved += int((got & (_sampled(p) != old)).sum())

    moved, counted = dist.reduce_sum(moved), dist.reduce_sum(counted)
    return moved / counted if counted else None
