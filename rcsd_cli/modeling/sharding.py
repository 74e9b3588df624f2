"""Fully sharded training (PyTorch FSDP2) for ``rcsd train --sharding full-shard|shard-grad-op``.

Each decoder layer is its own FSDP unit; the embeddings, final norm and output head (tied or
not) form the root unit, owned by ``FinalHidden``, a thin root module whose forward returns the
decoder's final hidden states. Because the root unit stays gathered from its forward to its
backward, the chunked losses can apply the output head outside the forward, as they do without
sharding. Gradients are *summed* across processes (not averaged): every objective already
divides by the global token count.

Generation gathers every unit once, turns resharding off and decodes without further
collectives, so ranks may stop at different lengths. Checkpoints hold full (unsharded) weights
and an optimizer state keyed by parameter name, so they resume on any number of processes,
sharded or not.

``full-shard`` reshards parameters after each forward (ZeRO-3-like memory); ``shard-grad-op``
keeps them gathered until backward ends (ZeRO-2-like: less communication, more memory).
"""

from __future__ import annotations

import os
import typing
from contextlib import contextmanager

import torch
from torch import nn

from rcsd_cli.errors import RcsdError

SHARDINGS = ("replicate", "full-shard", "shard-grad-op")


class FinalHidden(nn.Module):
    """Root FSDP module around a causal LM: ``forward`` gives the final hidden states [B, L, H]."""

    compute_device: torch.device  # where its forward runs (set by ``shard``)

    def __init__(self, lm, reshard_after_forward: bool = True):
        super().__init__()
        self.lm = lm
        self.reshard_after_forward = reshard_after_forward  # of the layer units, restored after generation

    def forward(self, input_ids, attention_mask, position_ids):
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # a LoRA (peft) model
        return lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state

    # What training and generation use of a causal LM, forwarded to the wrapped model.
    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def disable_adapter(self):
        """A LoRA student's frozen base (the ``frozen`` teacher), as ``PeftModel.disable_adapter``."""
        return self.lm.disable_adapter()

    @property
    def generation_config(self):
        return self.lm.generation_config

    def generate(self, **kwargs):
        with gathered(self):
            return self.lm.generate(**kwargs)


def _units(root) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def _decoder_layers(lm) -> nn.ModuleList:
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) and "DecoderLayer" in type(module[0]).__name__:
            return module
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__} to shard")


def shard(lm, reshard_after_forward: bool, device_type: str, mixed: bool = False,
          offload: bool = False, settle: bool = True) -> FinalHidden:
    """Wrap ``lm`` in a ``FinalHidden`` root and shard it over all processes; gradients sum.

    ``mixed`` (``--precision bf16-mixed``): the fp32 shards stay the optimizer's master weights,
    units gather them as bf16 for compute and reduce gradients in fp32. ``offload``
    (``--offload full``): shards, gradients and so the optimizer state live in host memory.
    ``settle=False``: the caller materialises a meta-device model first, then calls ``settle_root``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed \
        else MixedPrecisionPolicy()
    off = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in _decoder_layers(lm):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=off)
    root = FinalHidden(lm, reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=off)  # in place: root is now also an FSDPModule
    for unit in _units(root):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    # Where it computes: offloaded shards live in host memory, the forward runs on the mesh's device.
    root.compute_device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" \
        else torch.device(device_type)
    return settle_root(root) if settle else root


def settle_root(root: FinalHidden) -> FinalHidden:
    """The first forward decides which unit is the root: run it through the root, then reshard so
    that ``parameters()`` yields the sharded parameters the optimizer must own."""
    one = torch.zeros((1, 1), dtype=torch.long, device=root.compute_device)
    with torch.no_grad():
        root(one, torch.ones_like(one), one)
    for unit in _units(root):
        unit.reshard()
    return root


def compute_device(module) -> torch.device:
    """Where ``module``'s forward runs, so where its inputs go: a sharded root's mesh device (under
    ``--offload full`` its parameters report the host), else its parameters' device."""
    device = getattr(module, "compute_device", None)
    return device if isinstance(device, torch.device) else next(module.parameters()).device


def is_sharded(module) -> bool:
    return isinstance(module, FinalHidden) and bool(_units(module))


@contextmanager
def gathered(root):
    """Every unit gathered and kept so, so that ``generate`` issues no collective."""
    units = _units(root)
    for unit in units:
        unit.unshard()
    for unit in units:
        if unit is not root:  # the root never reshards after forward
            unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            if unit is not root:
                unit.set_reshard_after_forward(root.reshard_after_forward, recurse=False)
            unit.reshard()


def reshard(module) -> None:
    """Return every unit to its sharded state (``parameters()`` then yields the shards)."""
    for unit in _units(module):
        unit.reshard()


def unwrap(module):
    """The causal LM inside a ``FinalHidden`` root (or the module itself)."""
    return module.lm if isinstance(module, FinalHidden) else module


def full_state_dict(module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, on rank 0 (empty elsewhere); a collective call when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lm = unwrap(module)
    if is_sharded(module):
        reshard(module)
        state = typing.cast(dict[str, torch.Tensor],  # full_state_dict: plain tensors, not DTensors
                            get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    else:
        state = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
    # Tied weights (an output head sharing the embedding) are stored once, as save_pretrained does.
    kept = {name for name, _ in lm.named_parameters()}
    tied = {name for name, _ in lm.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in state.items() if k not in tied}


def optimizer_state(module, optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded (rank 0 holds it when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(module)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if is_sharded(module) else None
    return get_optimizer_state_dict(unwrap(module), optimizer, options=options)


def load_optimizer_state(module, optimizer, state: dict, from_rank0: bool = False) -> None:
    """``from_rank0``: ``state`` is the full state on rank 0 (empty elsewhere), broadcast shard by shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    reshard(module)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0) if is_sharded(module) else None
    set_optimizer_state_dict(unwrap(module), optimizer, optim_state_dict=state, options=options)


def grad_norm_value(norm) -> float:
    """``clip_grad_norm_``'s result as a float (a DTensor when gradients are sharded)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def from_launcher_env(requested: str | None) -> tuple[str, str | None]:
    """(sharding, note): ``--sharding`` if given, else what ``accelerate launch`` asked for.

    ``accelerate launch --use_fsdp`` (or an FSDP config file) sets ``ACCELERATE_USE_FSDP``; rcsd
    honours its sharding strategy / reshard-after-forward with its own FSDP2 wrapping. DeepSpeed
    is not integrated, so a DeepSpeed launch fails instead of silently running unsharded.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise RcsdError("rcsd train does not run DeepSpeed; launch without --use_deepspeed and pass --sharding "
                        "full-shard (ZeRO-3-like) or --sharding shard-grad-op (ZeRO-2-like) instead")
    if requested is not None:
        return requested, None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return "replicate", None
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if strategy in ("NO_SHARD", "3"):
        return "replicate", "accelerate FSDP config: NO_SHARD -> --sharding replicate"
    grad_op = strategy in ("SHARD_GRAD_OP", "2") or reshard == "false"
    chosen = "shard-grad-op" if grad_op else "full-shard"
    return chosen, f"accelerate FSDP config -> --sharding {chosen} (rcsd's own FSDP2 wrapping)"
