"""Data-parallel helpers: the same ``rcsd train`` under ``torchrun`` or ``accelerate launch``.

Each process holds a full replica, takes its share of every step's global batch, and after
backward the gradients are summed across processes. Every objective divides its token-loss sum
by the *global* token count (``reduce_sum``), so the summed gradient equals the single-process
gradient of the same global batch. Only rank 0 writes files and logs. Without the launcher's
environment (``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(always: bool = False) -> tuple[int, int]:
    """Join the launcher's process group (also for one process when ``always`` and launched)."""
    rank, size = world()
    launched = "MASTER_ADDR" in os.environ
    if (size > 1 or (always and launched)) and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():  # NCCL for CUDA tensors, gloo for host ones (metrics, host-loaded weights)
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return rank, size


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return world()[0] == 0


def reduce_sum(value: float) -> float:
    """A host number summed over processes (through gloo on the host: no device work to wait for).
    Host numbers stay real inside the dry run's fake tensor mode."""
    if not is_initialized():
        return value
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over processes in place (its device's backend: NCCL on CUDA, gloo on the host)."""
    dist.all_reduce(tensor)


def sum_gradients(params) -> None:
    """Sum every gradient across processes (flattened into one buffer per call)."""
    if not is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).clone()
        offset += n


@torch.no_grad()
def broadcast_from_main(module) -> None:
    """Copy rank 0's weights to every process, as DDP does on construction.

    Needed beyond hygiene: under ``accelerate launch`` with FSDP's RAM-efficient loading,
    transformers loads real weights on local rank 0 only and zeros elsewhere.
    """
    if not is_initialized() or module is None:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()
