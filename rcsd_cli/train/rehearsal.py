"""``rcsd train --dry-run``: one real training step at the run's full shapes, without weights or accelerators.

A run that does not fit should fail here, in seconds on a laptop, not an hour into a job on eight GPUs. The step
is rcsd's own: the model built from its ``config.json`` on the meta device (``student.student_and_teacher``: LoRA,
the teacher copy), the precision policy, FSDP2 sharding (``sharding.shard``) over a fake process group of the run's
world size, the teacher's forward over the longest privileged prompt, the method's chunked loss and backward
(each method's ``backward``), gradient clipping and AdamW. Completions of ``--max-new-tokens`` stand in for the
rollouts. It all runs under PyTorch's ``FakeTensorMode``: tensors carry shapes, dtypes and devices but no data, so
an 8B model sharded eight ways takes seconds and no memory. Torch's own trackers measure it: ``FSDPMemTracker``
(sharded) or ``MemTracker`` give the peak bytes per category, ``FlopCounterMode`` the FLOPs. A fake tensor has no
value to read, so a step that runs here never waits for the device (no ``.item()`` inside it).

The simulated rank is rank 0, which holds the most items (``ceil(batch / world)``); every rank runs the same shapes.
What the simulation cannot see: generation (the KV cache, sampling logits and vLLM's share come from the
hand-computed plan, ``memory.estimate``), CUDA graphs, NCCL's buffers, the CUDA context, allocator fragmentation,
and kernels that differ by device (the simulated device is the host: fake CUDA devices do not get past FSDP's
stream creation on a CPU-only build, so SDPA is measured by its CPU kernel, and ``flash_attention_2`` as SDPA).
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from concurrent.futures import Future
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.modeling import precision, sharding
from rcsd_cli.train.chunked_loss import TeacherTopK
from rcsd_cli.train.methods import distill, grpo, offline, sft
from rcsd_cli.train.methods.offline import OfflineItem
from rcsd_cli.train.rollout_engines import separate_teacher_engine
from rcsd_cli.train.step import StepContext
from rcsd_cli.train.student import enable_gradient_checkpointing, student_and_teacher, teacher_view

GIB = 2**30

# torch's tracker categories -> the names rcsd prints
_CATEGORIES = {
    "Parameter": "weights", "Sharded Param": "weights", "Buffer": "weights",
    "Unsharded Param": "gathered weights", "All Gather": "gathered weights",
    "Gradient": "gradients", "Sharded Grad": "gradients", "Unsharded Grad": "gradients",
    "Reduce Scatter": "gradients",
    "Optstate": "optimizer", "OptState": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries", "Other": "temporaries", "Inputs": "temporaries",
}

if typing.TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@contextmanager
def fake_world(world: int):
    """A fake process group of ``world`` ranks (this process is rank 0) unless one exists: collectives return
    at once and move nothing."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def _on_meta(cfg: TrainConfig, model_config, sharded: bool):
    """(student, teacher or None) on the meta device (no memory), built, wrapped and sharded as a run does."""
    from transformers import AutoModelForCausalLM


    attn = "sdpa" if cfg.attn_implementation.startswith("flash") else cfg.attn_implementation  # CUDA-only kernels
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config, dtype=precision.base_dtype(cfg.precision,
                                                                                          bool(cfg.lora.rank)),
                                                attn_implementation=attn)
    student, teacher = student_and_teacher(cfg, base)
    if sharded:
        policy = dict(mixed=cfg.precision == "bf16-mixed", offload=cfg.distributed.offload == "full", settle=False)
        student = sharding.shard(student, cfg.distributed.sharding == "full-shard", "cpu", **policy)
        teacher = None if teacher is None else sharding.shard(teacher, True, "cpu", **policy)
    return student, teacher


def _materialise(cfg: TrainConfig, student, teacher, sharded: bool):
    """Fake weights on the host (inside a fake tensor mode), the sharded roots settled, checkpointing on."""
    for module in (student, teacher):
        if module is not None:
            module.to_empty(device="cpu")  # one new tensor per module that holds a parameter: ties come undone
            lm = module.lm if sharded else module
            lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
            lm.tie_weights()
            if sharded:
                sharding.settle_root(module)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    return student, teacher


def _answered(value):
    done: Future = Future()
    done.set_result(value)
    return done


def _step(cfg: TrainConfig, student, teacher, optimizer, lengths: dict, sequences: int, pad: int):
    """The method's backward over ``sequences`` items of the given lengths, then clipping and AdamW (unless
    ``optimizer`` is None)."""
    compute = lambda: precision.compute(cfg.precision, "cpu")  # noqa: E731
    hidden, head, _ = teacher_view(cfg, student, teacher, compute)
    stand_in = typing.cast("PreTrainedTokenizerBase", SimpleNamespace(pad_token_id=pad))  # all backward reads
    ctx = StepContext(student, stand_in, hidden, head, cfg, 0, compute=compute)
    prompts = [[pad] * lengths["student_prompt"]] * sequences
    completions = [[pad] * lengths["completion"]] * sequences
    if cfg.samples:  # an offline round: stored teacher top-k instead of a teacher forward
        k = cfg.loss.top_k or 20
        item = OfflineItem(prompts[0], completions[0], [list(range(k))] * lengths["completion"],
                                      [[0.0] * k] * lengths["completion"])
        res = offline.step(ctx, [item] * sequences)
    elif cfg.method in ("rcsd", "opsd"):
        if cfg.teacher.base_url:  # a served teacher: its top-k arrives, no teacher forward here
            k = cfg.loss.top_k
            ctx.teacher_topk = lambda _prompts, part: _answered(TeacherTopK.from_rows(
                [[[0] * k] * len(c) for c in part], [[[0.0] * k] * len(c) for c in part], max(len(c) for c in part), k))
        res = distill.backward(ctx, prompts, [[pad] * lengths["teacher_prompt"]] * sequences, completions)
    elif cfg.method == "grpo":  # whole groups of the sequences simulated, with rewards that differ within each
        group = math.gcd(sequences, cfg.grpo.group_size)
        ctx = dataclasses.replace(ctx, cfg=cfg.model_copy(update={"grpo": cfg.grpo.model_copy(
            update={"group_size": group})}))
        res = grpo.backward(ctx, prompts, completions, [float(i % 2) for i in range(sequences)], {})
    else:
        res = sft.backward(ctx, prompts, completions)
    if teacher is not None:  # as ``trainer.run_step``: a sharded teacher's root is sharded again
        sharding.reshard(teacher)
    if optimizer is not None:
        params = [p for p in student.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # the run reads this norm once, after backward
        optimizer.step()
    return res


def rehearse(cfg: TrainConfig, model_config, *, lengths: dict, world: int) -> dict:
    """Run one step of ``cfg`` at ``lengths`` (student_prompt, teacher_prompt, completion tokens) for rank 0 of
    ``world`` under fake tensors. Returns the peak GiB per category, the state left resident after the step, the
    teacher's weights, the step's FLOPs and the seconds the simulation took.

    Two passes, because each tracker changes what the other sees (``FlopCounterMode`` keeps every micro-batch's
    tensors alive): the memory pass runs two micro-batches (the second one meets the first one's gradients) and
    the optimizer step; the FLOP pass runs one micro-batch, and the step's FLOPs are its count times the
    micro-batches a rank runs (AdamW's few FLOPs per weight are left out)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    start = time.perf_counter()
    sharded = cfg.distributed.sharding in ("full-shard", "shard-grad-op")
    rows = -(-cfg.batch_size // world)
    sequences = rows * (cfg.grpo.group_size if cfg.method == "grpo" and not cfg.samples else 1)
    micro = min(cfg.micro_batch_size, sequences)
    pad = getattr(model_config, "pad_token_id", None) or getattr(model_config, "eos_token_id", None) or 0
    pad = pad[0] if isinstance(pad, list) else pad
    out: dict = {"sequences": sequences, "micro_batches": -(-sequences // micro)}
    for counting in (False, True):
        with fake_world(world):
            student, teacher = _on_meta(cfg, model_config, sharded)
            out["parameters"] = sum(p.numel() for p in student.parameters())  # all of them, on the meta device
            with FakeTensorMode(allow_non_fake_inputs=True):  # the meta-device model goes in
                student, teacher = _materialise(cfg, student, teacher, sharded)
                params = [p for p in student.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                _warm(optimizer, params)
                if counting:
                    flops = FlopCounterMode(display=False)
                    with flops:
                        _step(cfg, student, teacher, None, lengths, micro, pad)
                    out["flops"] = float(flops.get_total_flops()) * out["micro_batches"]
                    continue
                tracker = type("StepFSDPMemTracker", (_GlobalPeak, FSDPMemTracker), {})(student, optimizer) \
                    if sharded else type("StepMemTracker", (_GlobalPeak, MemTracker), {})()
                if not sharded:
                    tracker.track_external(student, optimizer, *([teacher] if teacher is not None else []))
                    for module in (student, teacher):
                        if module is not None:
                            _hook_gradients_now(tracker, module)
                with tracker:
                    _step(cfg, student, teacher, optimizer, lengths, min(sequences, 2 * micro), pad)
                optimizer.zero_grad(set_to_none=True)  # as the run does after each step
                teacher_gib = 0.0 if teacher is None else sum(_local_bytes(p) for p in teacher.parameters()) / GIB
                # the frozen teacher copy: tracked among the weights when replicated; a sharded one is a module of
                # its own that FSDPMemTracker (given the student) does not count
                peak = _with_teacher(_by_category(tracker.get_tracker_snapshot("peak")), teacher_gib, not sharded)
                resident = _with_teacher(_by_category(tracker.get_tracker_snapshot("current")), teacher_gib,
                                         not sharded)
                out["peak"] = peak
                out["resident"] = {k: resident.get(k, 0.0) for k in ("weights", "teacher", "optimizer")}
    out["seconds"] = time.perf_counter() - start
    return out


class _GlobalPeak:
    """Torch's memory trackers, reduced to what rcsd reads: the global peak per category.

    They also keep per-module peaks, updated by a walk over every tracked module at every operation (most of the
    simulation's time at 36 layers), and refuse a top-level module entered twice in one step, as the teacher's and
    the student's forward through one LoRA model are. Here the per-module records start afresh on re-entry and
    the walk is skipped; the global peak and the current snapshot are the trackers' own."""

    # the tracker's own state, set by the class this mixes into (torch's MemTracker or FSDPMemTracker)
    memory_tracking: dict
    _mod_tracker: Any
    _curr_mem_snap: dict
    _peak_mem: dict
    _peak_mem_snap: dict

    def _forget_if_entered_again(self, module) -> None:
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
            if parents <= {"Global"}:
                del self.memory_tracking[module]

    def _pre_fw_hook(self, module, inputs):
        self._forget_if_entered_again(module)
        return super()._pre_fw_hook(module, inputs)

    def _fsdp_state_pre_forward(self, fsdp_mod, orig):  # FSDPMemTracker's own re-entry check
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

        def forget_then_enter(*args, **kwargs):
            self._forget_if_entered_again(fsdp_mod)
            return inner(*args, **kwargs)

        return forget_then_enter

    def _update_peak_stats(self, peak_state) -> None:
        from torch.distributed._tools.mem_tracker import _TOTAL_KEY

        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)


def _warm(optimizer, params) -> None:
    """AdamW's moments exist from the first step on: create them (one step on zero gradients) so the measured
    step is a steady-state one, not the first."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _with_teacher(gib: dict[str, float], teacher: float, among_weights: bool) -> dict[str, float]:
    """The teacher copy as a category of its own."""
    if not teacher:
        return gib
    out = dict(gib)
    if among_weights:
        out["weights"] = out.get("weights", 0.0) - teacher
    else:
        out["total"] = out.get("total", 0.0) + teacher
    out["teacher"] = teacher
    return out


class _NoHook:
    def remove(self) -> None:
        pass


def _hook_gradients_now(tracker, module) -> None:
    """``MemTracker`` hooks the parameters of each module it enters for their gradients, which fails on a frozen
    one: a LoRA base, and the adapters themselves while peft's ``disable_adapter`` (the frozen teacher) has
    switched their ``requires_grad`` off. So hook the trainable ones now, and mark the frozen ones as done."""
    for p in module.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker._track_module_params_and_buffers(module, install_grad_hooks=True)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _by_category(snapshot: dict) -> dict[str, float]:
    """One device's tracker snapshot as GiB per rcsd category (and ``total``)."""
    out: dict[str, float] = {}
    for device, kinds in snapshot.items():
        for kind, nbytes in kinds.items():
            name = getattr(kind, "value", kind)
            if name == "Total":
                out["total"] = out.get("total", 0.0) + nbytes / GIB
                continue
            key = _CATEGORIES.get(name, "temporaries")
            out[key] = out.get(key, 0.0) + nbytes / GIB
    return out


def fits(cfg: TrainConfig, measured: dict, plan: dict[str, float], device_gib: float, on_gpu: bool) \
        -> tuple[dict[str, float], str | None]:
    """Each phase's GiB per device, and why the run does not fit ``device_gib`` (None when it does).

    Training: the measured step's peak, plus what stays resident beside it: the vLLM engines that do not sleep
    (a frozen teacher's analysis engine; all of them without ``--vllm-sleep``) and the runtime. Generation: the
    training state left after the step (weights, teacher, AdamW moments; gradients are freed) plus what
    generating needs, from the plan: the engines' whole share, or the KV cache, sampling logits and gathered
    weights of HF decoding."""
    resident = sum(measured["resident"].values())
    runtime = plan.get("runtime", 0.0)
    if cfg.rollout.backend == "vllm":
        engines = plan.get("vllm_engines", 0.0)
        asleep = on_gpu and cfg.rollout.vllm.sleep
        awake_in_training = engines / 2 if asleep and separate_teacher_engine(cfg) else 0.0 if asleep else engines
        phases = {"training": measured["peak"]["total"] + awake_in_training + runtime,
                  "generation": resident + engines + runtime}
        generation_fix = "--vllm-memory-utilization"
    else:
        decoding = sum(plan.get(k, 0.0) for k in ("rollout_kv_cache", "sampling_logits", "gathered_for_generation"))
        phases = {"training": measured["peak"]["total"] + runtime, "generation": resident + decoding + runtime}
        generation_fix = "--gen-batch-size"
    if phases["training"] > device_gib:
        peak = {k: v for k, v in measured["peak"].items() if k != "total"}
        largest = max(peak, key=lambda k: peak[k])
        fix = {"activations": "--micro-batch-size or --gradient-checkpointing",
               "temporaries": "--micro-batch-size or --chunk-size"}.get(
            largest, "--sharding full-shard, more processes, or --lora-rank")
        return phases, (f"the training step needs {phases['training']:.1f} GiB of {device_gib:.1f} GiB per device "
                        f"({largest} {peak[largest]:.1f} GiB): change {fix}")
    if phases["generation"] > device_gib:
        return phases, (f"generation needs {phases['generation']:.1f} GiB of {device_gib:.1f} GiB per device "
                        f"(training state {resident:.1f} GiB stays resident): change {generation_fix}")
    return phases, None


NOT_SIMULATED = ("generation (the KV cache, sampling logits and vLLM engines are the plan's figures); CUDA graphs; "
                 "NCCL buffers; the CUDA context (the plan's 0.5 GiB); allocator fragmentation; device-specific "
                 "kernels (attention is measured as SDPA on the host)")


def format_rehearsal(measured: dict, phases: dict[str, float], problem: str | None, *, world: int, lengths: dict,
                     device_gib: float, tflops: float | None, utilisation: float) -> str:
    """The simulated step as the dry run prints it: per-rank GiB by category, the phases, the verdict, FLOPs (and
    the step time they imply at ``tflops``, None for a CPU target)."""
    peak, rows = measured["peak"], []
    rows.append(f"rank 0 of {world}: {measured['sequences']} sequences of {lengths['student_prompt']} prompt + "
                f"{lengths['completion']} completion tokens (teacher prompt {lengths['teacher_prompt']}), "
                f"{measured['micro_batches']} micro-batches; simulated in {measured['seconds']:.0f} s")
    width = max(len(k) for k in peak)
    rows += [f"{k:<{width}}  {v:8.2f} GiB" for k, v in sorted(peak.items(), key=lambda kv: -kv[1])
             if k != "total" and v > 0.005]
    rows.append(f"{'peak':<{width}}  {peak['total']:8.2f} GiB per rank (measured, torch's memory tracker)")
    rows.append(f"phases: training {phases['training']:.1f} GiB, generation {phases['generation']:.1f} GiB of "
                f"{device_gib:.1f} GiB per device")
    rows.append(f"fits: no - {problem}" if problem else "fits: yes")
    flops = f"FLOPs: {measured['flops'] / 1e12:,.1f} TFLOP per rank for forward, backward and loss (FlopCounterMode)"
    if tflops:  # the time they imply on the target GPU
        seconds = measured["flops"] / (tflops * 1e12 * utilisation)
        flops += f": {seconds:.1f} s at {utilisation:.0%} of {tflops:g} TFLOP/s, rollouts not included"
    rows.append(flops)
    rows.append(f"not simulated: {NOT_SIMULATED}")
    return "\n".join(rows)
