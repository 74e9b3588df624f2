"""vLLM offline engine backend (``pip install rcsd[vllm]``; see docs/scaling.md for the CPU recipe).

Before the engine starts, one line says what is loaded and how much memory it may take. The
engine receives prompt token ids (``TokensPrompt``) and returns completion token ids, so
artifacts match the other backends. ``topk_logprobs`` scores given completions with prompt
log-probs, for ``score --teacher-logprobs``.

Inside ``rcsd train --rollout-backend vllm`` the same class runs colocated: in the training
process (vLLM's engine core in-process, so weights are handed over as tensors, not pickled),
``load_weights`` pushes the student's current weights after each optimizer step and
``sleep``/``wake`` release the engine's GPU memory while the optimizer runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable

from rcsd_cli.configs.groups import BackendConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling.generation import Generation, item_seed
from rcsd_cli.models import adapter_base, load_tokenizer, resolve_model
from rcsd_cli.ui import info


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _launched_processes() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _lora_engine(path: str) -> tuple[str, dict]:
    """For a PEFT adapter folder (what ``rcsd train --lora-rank`` writes, or the authors' stage-I
    checkpoint): the base model to load and the engine's LoRA settings with the request to send."""
    import json
    from pathlib import Path

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        return path, {}
    from vllm.lora.request import LoRARequest


    rank = int(json.loads((folder / "adapter_config.json").read_text()).get("r") or 8)
    settings = lora_engine_args(rank, str(folder))
    info(f"vllm: {folder} is a LoRA adapter (rank {rank}); serving it on its base {adapter_base(folder)}")
    return resolve_model(adapter_base(folder)), {**settings, "request": LoRARequest("adapter", 1, str(folder))}


def lora_engine_args(rank: int, what: str) -> dict:
    """An engine that serves one LoRA adapter of ``rank`` at a time (``what`` names it in the error)."""
    max_rank = next((r for r in _LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise RcsdError(f"{what}: LoRA rank {rank} is above vLLM's largest ({_LORA_RANKS[-1]})")
    return {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1}


@contextmanager
def _rng_kept():
    """Python's, NumPy's and torch's random states as they were before: an engine started in this process
    seeds them all globally (its ``seed``), which would reset a training run's RNG whatever its ``--seed``."""
    import random

    import numpy as np
    import torch

    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy_state)


class VLLMBackend:
    name = "vllm"

    def __init__(self, cfg: BackendConfig, model_name: str, trust_remote_code: bool = False, *,
                 dtype: str = "auto", in_process: bool = False, role: str = "", engine_args: dict | None = None):
        """``cfg.vllm`` holds the engine settings; ``in_process``: colocated in a training run; ``engine_args``:
        the run's sizing (``max_model_len``, ``max_num_batched_tokens``: see ``train.engine_sizing``)."""
        if not vllm_available():
            raise RcsdError("vllm: vLLM is not installed: pip install 'rcsd[vllm]' (see docs/scaling.md)")
        if in_process:  # engine core in this process: weight pushes hand over tensors, nothing is pickled
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM


        path = resolve_model(model_name)
        self.tokenizer = load_tokenizer(model_name, trust_remote_code)
        path, lora = _lora_engine(path)  # an adapter folder: its base model, the adapter as a LoRA request
        self.lora_request = lora.pop("request", None)
        self.adapters = 1 if self.lora_request else 0  # adapters served so far (each has its own request id)
        try:
            import torch

            gpu = torch.cuda.is_available()
            total = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else 0.0
        except Exception:  # noqa: BLE001 - memory report only
            gpu, total = False, 0.0
        self.gpu = gpu
        label = f"vllm{' ' + role if role else ''}"
        extra = dict(engine_args or {})
        if in_process and _launched_processes() > 1:  # torchrun: one engine per process, on the launcher's group
            extra["distributed_executor_backend"] = "external_launcher"
        if not gpu:  # vLLM 0.32 CPU: a seeded request split by chunked prefill crashes the engine
            extra["enable_chunked_prefill"] = False  # ("CPU Generator does not use offset")
        settings = cfg.vllm
        kv_cache_gib = settings.kv_cache_gib
        if kv_cache_gib:
            extra["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if gpu:
            share = settings.memory_utilization or 0.85
            sized = f"{kv_cache_gib:g} GiB of KV cache" if kv_cache_gib else f"up to {share:.0%} of each GPU's " \
                f"{total:.1f} GiB"
            info(f"{label}: loading {path} (tensor parallel {settings.tensor_parallel_size}); it may take {sized}")
        else:
            share = settings.memory_utilization or 0.3
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            sized = f"{kv_cache_gib:g} GiB of KV cache" if kv_cache_gib else \
                f"up to {share:.0%} of this machine's {ram:.1f} GiB"
            info(f"{label}: loading {path} on CPU; it may reserve {sized}")
        self.sleep_mode = settings.sleep and in_process and gpu  # vLLM has no sleep mode on CPU
        self.asleep: set[str] = set()  # what sleep released: "weights", "kv_cache"
        try:
            with _rng_kept():
                self.llm = LLM(model=path, tokenizer=path, trust_remote_code=trust_remote_code, dtype=dtype,
                               tensor_parallel_size=settings.tensor_parallel_size, gpu_memory_utilization=share,
                               seed=0, enforce_eager=settings.enforce_eager, enable_sleep_mode=self.sleep_mode,
                               **lora, **extra)
        except Exception as exc:  # noqa: BLE001 - the engine's own log above has the details
            raise RcsdError(f"{label}: engine failed to start ({_first_line(exc)})") from exc

    def use_adapter(self, folder: str) -> None:
        """Serve later requests (those that ask for the adapter) with the LoRA adapter saved in ``folder``. Each
        folder gets a new id, so the engine loads it at its next request; the base weights stay as they are,
        and vLLM evicts the adapter before (``max_loras`` 1)."""
        from vllm.lora.request import LoRARequest

        self.adapters += 1
        self.lora_request = LoRARequest(f"adapter-{self.adapters}", self.adapters, folder)

    def _run(self, prompts, params, adapter: bool = True):
        try:
            return self.llm.generate(prompts, params, use_tqdm=False,
                                     lora_request=self.lora_request if adapter else None)
        except Exception as exc:  # noqa: BLE001 - engine failures become one clean line
            raise RcsdError(f"vllm: generation failed ({_first_line(exc)})") from exc

    def _params(self, cfg, seed, **extra):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k if cfg.top_k else -1, seed=seed, ignore_eos=cfg.ignore_eos, **extra)

    def generate(self, prompts, cfg, seed, on_done=None, seeds=None, adapter: bool = True):
        """Sampled completions of token-id prompts; ``adapter`` False: from the base model even when an adapter
        is being served (a LoRA run's frozen teacher)."""
        from vllm.inputs import TokensPrompt


        seeds = seeds if seeds is not None else [item_seed(seed, i) for i in range(len(prompts))]
        chunk_size = max(cfg.batch_size, 64)
        results = []
        for start in range(0, len(prompts), chunk_size):
            chunk = prompts[start: start + chunk_size]
            params = [self._params(cfg, seeds[start + i] % 2**31) for i in range(len(chunk))]
            outs = self._run([TokensPrompt(prompt_token_ids=p) for p in chunk], params, adapter)
            batch = []
            for out in outs:
                o = out.outputs[0]
                batch.append(Generation(list(o.token_ids), o.text, "stop" if o.finish_reason == "stop" else "length"))
            results.extend(batch)
            if on_done:
                on_done(list(range(start, start + len(batch))), batch)
        return results

    def topk_logprobs(self, teacher_prompts, completions, k):
        """Top-k (ids, log-probs) of the teacher at every completion position, from prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0)
        outs = self._run([TokensPrompt(prompt_token_ids=p + c)
                          for p, c in zip(teacher_prompts, completions, strict=True)], params)
        ids, lps = [], []
        for out, p, c in zip(outs, teacher_prompts, completions, strict=True):
            row_i, row_v = [], []
            for pos in range(len(p), len(p) + len(c)):  # logprobs at pos are for the token at pos
                entries = sorted(out.prompt_logprobs[pos].items(), key=lambda kv: -kv[1].logprob)[:k]
                row_i.append([t for t, _ in entries])
                row_v.append([round(v.logprob, 5) for _, v in entries])
            ids.append(row_i)
            lps.append(row_v)
        return ids, lps

    def token_logprobs(self, prompt: list[int], continuation: list[int], adapter: bool = True) -> list[float]:
        """The engine's log-probability of each continuation token after ``prompt`` (the sync check)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = self._run([TokensPrompt(prompt_token_ids=prompt + continuation)],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), adapter)[0]
        ids = prompt + continuation
        return [out.prompt_logprobs[pos][ids[pos]].logprob for pos in range(len(prompt), len(ids))]

    # ------------------------------------------------------------------ colocated training

    def load_weights(self, weights: Iterable) -> None:
        """Replace the engine's weights in place with (checkpoint name, tensor) pairs and drop the
        prefix cache, whose entries were computed with the old weights."""
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                               "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
        except Exception as exc:  # noqa: BLE001 - a failed push must stop the run, in one line
            raise RcsdError(f"vllm: pushing the student's weights into the engine failed ({_first_line(exc)})") \
                from exc

    def sleep(self, keep_weights: bool) -> None:
        """GPU only: free the KV cache (and the weights unless ``keep_weights``) until ``wake``."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Give back what ``sleep`` released (``tags``: part of it, weights before the KV cache as vLLM
        recommends: weights, load them, then the cache). The training step's cached blocks go back first."""
        todo = [t for t in tags if t in self.asleep]
        if todo:
            import torch

            torch.cuda.empty_cache()
            self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)

    def close(self) -> None:
        """Shut the engine down now, while a launcher's process group it shares still exists."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
