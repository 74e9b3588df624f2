"""Who generates inside ``rcsd train``: the student's rollouts and the teacher's analyses.

``hf``: rcsd's own decoding loop on the training modules (always current, nothing to sync).
``vllm``: colocated vLLM engines in the training process, created once. The student engine
receives the student's weights after every optimizer step (parameter by parameter, gathered
from FSDP shards one at a time). With LoRA it receives only the adapter (saved, then served as a
LoRA request on the base it loaded once), and the same engine without the adapter is the frozen
teacher. Without LoRA, a frozen teacher's analyses come from a second engine that keeps the initial weights, an EMA
teacher's from one that follows the teacher, a live teacher's from the student engine: never
silently from the student when the teacher is meant to differ. vLLM allows sleep mode for one
engine per process (its allocator's sleep unmaps every allocation of the process), so only the
student engine sleeps while the student trains; a second engine stays resident in its share.
Waking follows vLLM's order: the cache allocator emptied, weights woken and loaded, then the KV
cache. Either way a generation is seeded per item, returns token ids (no decode/re-encode) and
keeps its end-of-sequence token.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterator, Sequence

import torch

from rcsd_cli.backends import vllm as vllm_backend
from rcsd_cli.configs.groups import BackendConfig, GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.modeling import precision, sharding
from rcsd_cli.modeling.generation import Generation, generate
from rcsd_cli.modeling.logprobs import continuation_logprobs
from rcsd_cli.train.engine_sizing import engine_sizes, require_engines_fit
from rcsd_cli.train.phases import no_clock
from rcsd_cli.ui import info

Generate = Callable[[list[list[int]], GenerationConfig, list[int]], list[Generation]]


def module_weights(module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) of a causal LM as a vLLM engine loads them, in ``dtype`` (the engine's).

    Sharded parameters are gathered one at a time (a collective: every process iterates in the
    same order), each shard first cast to ``dtype`` and moved to the compute device: under
    ``--offload full`` the shards are fp32 host tensors, and gathering them as they are would send
    twice the bytes over gloo on the host. A PEFT model yields its base weights with each LoRA delta added.
    """
    from torch.distributed.tensor import DTensor

    lm = sharding.unwrap(module)
    device = sharding.compute_device(module)
    lora = _lora_layers(lm)
    base = lm.get_base_model() if lora else lm
    for name, p in base.named_parameters(remove_duplicate=False):  # tied heads by both names
        if ".lora_" in name:
            continue
        value = _full(p.detach(), dtype, device) if isinstance(p, DTensor) else p.detach().to(device, dtype)
        owner, sep, leaf = name.rpartition(".base_layer.")
        if sep and owner in lora:
            if leaf == "weight":
                layer = lora[owner]
                value = value + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            name = f"{owner}.{leaf}"
        yield name, value.detach()


def _full(p, dtype, device) -> torch.Tensor:
    """A sharded parameter gathered in ``dtype`` on ``device`` (the local shard converted first)."""
    from torch.distributed.tensor import DTensor

    local = p.to_local().to(device, dtype or p.dtype)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()


def _lora_layers(lm) -> dict:
    if not hasattr(lm, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in lm.get_base_model().named_modules() if isinstance(m, LoraLayer)}


class EngineRollouts:
    """A colocated vLLM engine that follows a module's weights (or keeps its initial ones)."""

    keeps_weights = False  # whether sleeping keeps the weights (vLLM's level 1) while the module trains

    def __init__(self, engine, follows=None, dtype: torch.dtype | None = None, adapter: bool = True):
        self.engine, self.follows, self.dtype, self.adapter = engine, follows, dtype, adapter
        self.weights_dropped = False  # GPU sleep mode drops a following engine's weights between calls

    def _ready(self) -> None:
        if self.weights_dropped:  # e.g. the analysis and then the rollouts of one step, both from this engine
            self.push()
        self.engine.wake()  # the KV cache last: weights are woken and loaded first (``push``)

    def generate(self, prompts, gen_cfg, seeds):
        self._ready()
        out = self.engine.generate(prompts, gen_cfg, 0, seeds=seeds, adapter=self.adapter)
        self.engine.sleep(keep_weights=self.follows is None or self.keeps_weights)
        self.weights_dropped = self.follows is not None and "weights" in self.engine.asleep
        return out

    def push(self) -> None:
        """After an optimizer (or EMA) step: the module's current weights into the engine."""
        if self.follows is not None:
            self.engine.wake(tags=("weights",))  # the KV cache stays asleep until the next generation
            with torch.no_grad():
                self.engine.load_weights(module_weights(self.follows, self.dtype))
            self.weights_dropped = False

    def token_logprobs(self, prompt, continuation):
        self._ready()
        return self.engine.token_logprobs(prompt, continuation, adapter=self.adapter)

    def close(self) -> None:
        self.engine.close()


class AdapterRollouts(EngineRollouts):
    """LoRA: the engine loads the base weights once and serves the student as the base plus its current
    adapter. A push saves the adapter (megabytes, not the base's gigabytes) to this process's folder and hands
    the engine the new folder; the base is never reloaded, so sleeping keeps the weights. The frozen teacher
    (the base with adapters disabled) is the same engine asked without the adapter (``adapter=False``), so no
    second engine is resident."""

    keeps_weights = True

    def __init__(self, engine, follows):
        import tempfile
        from pathlib import Path

        super().__init__(engine, follows)
        self.folder = Path(tempfile.mkdtemp(prefix="rcsd-adapter-"))
        self.pushes = 0

    def push(self) -> None:
        import shutil

        self.pushes += 1
        folder = self.folder / f"push-{self.pushes}"
        with torch.no_grad():
            sharding.unwrap(self.follows).save_pretrained(str(folder))  # the adapter alone (safetensors)
        self.engine.use_adapter(str(folder))
        shutil.rmtree(self.folder / f"push-{self.pushes - 1}", ignore_errors=True)  # loaded, or never needed

    def close(self) -> None:
        import shutil

        super().close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Rollouts:
    """The step's generation functions plus what must happen after each optimizer step."""

    def __init__(self, student: Generate, teacher: Generate, engines: Sequence[EngineRollouts] = ()):
        self.student, self.teacher, self.engines = student, teacher, list(engines)

    def after_update(self, clock=no_clock) -> None:
        if not any(e.follows is not None for e in self.engines):
            return
        with clock("push"):
            for e in self.engines:
                e.push()

    def close(self) -> None:
        for e in self.engines:
            e.close()

    def report_sync(self, student, tok, log=info) -> None:
        """Once, after the first push: the student engine's log-probs of a probe text vs the student's."""
        if self.engines:
            log(f"vllm: weights pushed; engine and student log-probs of a probe text differ by at most "
                f"{sync_gap(self.engines[0], student, tok):.2g}")


PROBE = "Question: What is 12 times 7?\nLet me think step by step. 12 times 7 is 84.\nAnswer: 84"


def sync_gap(engine: EngineRollouts, student, tok, text: str = PROBE) -> float:
    """Largest |engine - student| log-probability over the probe's tokens: ~1e-5 in fp32 when the
    push worked, the size of a training step's change when it silently did not."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt, continuation = ids[:4], ids[4:]
    ours = continuation_logprobs(student, prompt, continuation, tok.pad_token_id)
    theirs = engine.token_logprobs(prompt, continuation)
    return max(abs(a - b) for a, b in zip(ours, theirs, strict=True))


def hf_generate(module, tok, scope=nullcontext, compute=nullcontext) -> Generate:
    def gen(prompts, gen_cfg, seeds):
        with scope(), compute():
            return generate(module, tok, prompts, gen_cfg, 0, seeds=seeds)

    return gen


def separate_teacher_engine(cfg: TrainConfig) -> bool:
    """Whether a vLLM run keeps a second engine for the frozen (or EMA) teacher's reason-first analyses (with
    LoRA the student's engine serves the frozen base too)."""
    needs_teacher = (cfg.teacher.context == "reason-first" and cfg.reason_first.by == "teacher"
                     and cfg.task == "reasoner" and cfg.method in ("rcsd", "opsd"))
    return (cfg.rollout.backend == "vllm" and needs_teacher and cfg.teacher.kind != "live" and not cfg.lora.rank
            and not cfg.teacher.base_url)  # a served teacher samples its analyses on its server


def build_rollouts(cfg: TrainConfig, student, teacher, tok, teacher_scope, compute=nullcontext, *,
                   trust_remote_code: bool, lengths: dict[str, int] | None = None) -> Rollouts:
    """HF generation on the modules (under the precision's ``compute`` context), or vLLM engines
    mirroring them (see the module docstring): bf16 engines unless the run computes in fp32, sized for
    ``lengths`` (the run's longest prompts, ``views.longest_lengths``) and checked before they start."""
    if cfg.rollout.backend == "hf":
        t_module = teacher if teacher is not None else student
        return Rollouts(hf_generate(student, tok, compute=compute),
                        hf_generate(t_module, tok, teacher_scope, compute))

    separate_teacher = separate_teacher_engine(cfg)
    dtype = str(precision.frozen_dtype(cfg.precision)).removeprefix("torch.")  # bf16 unless the run is fp32
    on_gpu = torch.cuda.is_available()
    settings = cfg.rollout.vllm.model_copy(update={
        "kv_cache_gib": cfg.rollout.vllm.kv_cache_gib or (None if on_gpu else 1.0),
        "memory_utilization": cfg.rollout.memory_share / (2 if separate_teacher else 1)})
    device_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 \
        if on_gpu else None
    sizes = {}
    if lengths is not None:
        found = engine_sizes(cfg, student.config, lengths, n_params=sum(p.numel() for p in student.parameters()),
                             dtype_bytes=getattr(torch, dtype).itemsize, device_gib=device_gib,
                             separate_teacher=separate_teacher)
        require_engines_fit(found, device_gib)  # before minutes of loading, not after
        sizes = {size.role: size.engine_args() for size in found}

    def engine(role, sleep: bool = True, **engine_args):
        vllm = settings.model_copy(update={"sleep": settings.sleep and sleep})
        return vllm_backend.VLLMBackend(BackendConfig.model_construct(kind="vllm", vllm=vllm), cfg.model,
                                        trust_remote_code, dtype=dtype, in_process=True, role=role,
                                        engine_args={**sizes.get(role, {}), **engine_args})

    if cfg.lora.rank:  # one engine: base weights once, the student's adapter pushed, the base for the teacher

        shared = engine("student engine", **vllm_backend.lora_engine_args(cfg.lora.rank, "--lora-rank"))
        adapter = AdapterRollouts(shared, follows=student)
        frozen = EngineRollouts(shared, adapter=False).generate if cfg.teacher.kind == "frozen" else None
        return Rollouts(adapter.generate, frozen or adapter.generate, [adapter])
    s_engine = EngineRollouts(engine("student engine"), follows=student, dtype=getattr(torch, dtype))
    engines: list[EngineRollouts] = [s_engine]
    t_gen = s_engine.generate
    if separate_teacher:  # vLLM's sleep mode serves one engine per process: the teacher's stays resident
        follows = teacher if cfg.teacher.kind == "ema" else None
        t_engine = EngineRollouts(engine("teacher engine", sleep=False), follows=follows, dtype=getattr(torch, dtype))
        engines.append(t_engine)
        t_gen = t_engine.generate
    return Rollouts(s_engine.generate, t_gen, engines)
