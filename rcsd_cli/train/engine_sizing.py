"""Size train's colocated vLLM engines as vLLM will check them, before one starts.

An engine gets its share of the device (``gpu_memory_utilization``), or a fixed KV cache. Out of a share go
the weights and the profiling run's peak (one forward over ``max_num_batched_tokens`` tokens, then sampling
for ``max_num_seqs`` rows); what is left is KV cache, and vLLM refuses to start, after minutes of loading,
unless it holds one ``max_model_len`` sequence. Left unset, ``max_model_len`` is the model's own limit
(Qwen3-8B: 40,960 tokens, about 5.6 GiB of bf16 KV) although a run never needs more than its longest prompt
plus its completion. So rcsd sets both lengths from the run and checks the budget here, in one line.

The profiling peak is an estimate (one layer's activations over the batched tokens in the engine's dtype, the
sampler's fp32 logits); vLLM's own figure also depends on its kernels and CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.train.memory import kv_values_per_token, text_config

GIB = 2**30
MIN_BATCHED_TOKENS = 8192  # vLLM's own default for an offline engine on one GPU
MAX_NUM_SEQS = 256  # vLLM's default: the rows its sampler is profiled with


@dataclass(frozen=True)
class EngineSize:
    role: str
    max_model_len: int  # the engine's longest sequence: prompt plus what it generates
    max_num_batched_tokens: int  # tokens in one forward: bounds the profiling peak
    share: float | None  # of the device (None: a fixed KV cache, --vllm-kv-cache-gib)
    kv_gib: float  # left for keys and values
    sequence_gib: float  # one max_model_len sequence's keys and values

    def describe(self, device_gib: float | None) -> str:
        budget = f"{self.share:.2f} of {device_gib:.1f} GiB leaves" if self.share is not None else "a fixed"
        return (f"vllm {self.role}: max_model_len {self.max_model_len:,}, max_num_batched_tokens "
                f"{self.max_num_batched_tokens:,}; {budget} {self.kv_gib:.2f} GiB of KV cache, "
                f"{self.kv_gib / self.sequence_gib:.1f} sequences of {self.sequence_gib:.2f} GiB at full length")

    def engine_args(self) -> dict:
        """The arguments vLLM's ``LLM`` takes for this size."""
        return {"max_model_len": self.max_model_len, "max_num_batched_tokens": self.max_num_batched_tokens}


def kv_bytes_per_token(model_config, dtype_bytes: int) -> int:
    """Keys and values of one token over all layers."""
    return 2 * kv_values_per_token(model_config) * dtype_bytes


def profiling_peak_bytes(model_config, batched_tokens: int, dtype_bytes: int) -> int:
    """vLLM's profiling run, roughly: one decoder layer's activations over ``batched_tokens`` tokens (the
    residual stream, q/k/v and attention output, the MLP's gate, up and product) and the sampler's fp32 logits
    with one fp32 copy for ``MAX_NUM_SEQS`` rows."""
    text = text_config(model_config)
    h = text.hidden_size
    inter = getattr(text, "intermediate_size", 4 * h)
    return batched_tokens * (4 * h + 3 * inter) * dtype_bytes + MAX_NUM_SEQS * text.vocab_size * 4 * 2


def engine_sizes(cfg: TrainConfig, model_config, lengths: dict[str, int], *, n_params: int, dtype_bytes: int,
                 device_gib: float | None, separate_teacher: bool) -> list[EngineSize]:
    """The student engine (rollouts; with a live teacher also its reason-first analyses) and, when the run keeps
    one, the teacher engine (analyses: ``lengths["teacher_prompt"]`` already counts the analysis at its limit).
    ``device_gib`` None: the engines get ``--vllm-kv-cache-gib`` (on CPU)."""
    rollout = lengths["student_prompt"] + cfg.generation.max_new_tokens
    analyses = lengths["teacher_prompt"] if cfg.teacher.context == "reason-first" else 0
    lens = {"student engine": rollout if separate_teacher else max(rollout, analyses)}
    if separate_teacher:
        lens["teacher engine"] = analyses
    per_token = kv_bytes_per_token(model_config, dtype_bytes)
    settings = cfg.rollout.vllm
    share = cfg.rollout.memory_share / len(lens) if device_gib and not settings.kv_cache_gib else None
    sizes = []
    for role, length in lens.items():
        batched = max(length, MIN_BATCHED_TOKENS)
        if share is None or device_gib is None:
            kv = settings.kv_cache_gib or 1.0  # the trainer's CPU default
        else:
            used = n_params * dtype_bytes + profiling_peak_bytes(model_config, batched, dtype_bytes)
            kv = share * device_gib - used / GIB
        sizes.append(EngineSize(role, length, batched, share, kv, length * per_token / GIB))
    return sizes


def check_engines(sizes: list[EngineSize], device_gib: float | None) -> str | None:
    """Why an engine would refuse to start (None when each holds one sequence of its longest length)."""
    for size in sizes:
        if size.kv_gib >= size.sequence_gib:
            continue
        if size.share is None:
            return (f"vllm {size.role}: --vllm-kv-cache-gib {size.kv_gib:g} holds no {size.max_model_len:,}-token "
                    f"sequence ({size.sequence_gib:.2f} GiB of keys and values): raise --vllm-kv-cache-gib or "
                    f"lower --max-new-tokens")
        return (f"vllm {size.role}: its {size.share:.2f} of {device_gib:.1f} GiB leaves {max(size.kv_gib, 0):.2f} "
                f"GiB of KV cache after the weights and profiling, less than one {size.max_model_len:,}-token "
                f"sequence ({size.sequence_gib:.2f} GiB): raise --vllm-memory-utilization or lower --max-new-tokens")
    return None


def require_engines_fit(sizes: list[EngineSize], device_gib: float | None) -> None:
    problem = check_engines(sizes, device_gib)
    if problem:
        raise RcsdError(problem)
