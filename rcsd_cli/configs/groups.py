"""Option groups shared by several stages (generation, loss, backend, vLLM, the teacher's prompt) and
the base every stage config builds on: options may be given flat, by option name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rcsd_cli.data.options import fold_flat_options, nested, opt, refuse_changed, with_group_defaults


class ConfigModel(BaseModel):
    """A stage's settings. Options of nested models may also be given flat, by option name; a nested
    group given in part keeps the stage's defaults for the rest."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, data: Any) -> Any:

        return with_group_defaults(cls, fold_flat_options(cls, data)) if isinstance(data, dict) else data


PromptStyle = Literal["paper", "answer-line"]


PROMPT_STYLE_HELP = ("paper: the authors' prompts (Question: ..., \\boxed{} answer; teacher with reference answer "
                      "and rubric JSON); answer-line: question and an 'Answer: X' line instruction.")


AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]


Precision = Literal["fp32", "bf16-mixed", "bf16"]  # what each means: rcsd_cli/modeling/precision.py


SaveDtype = Literal["auto", "fp32", "bf16", "fp16"]


def attn_option(panel: str):
    """``--attn-implementation``, the same on every stage that loads a model with transformers."""
    return opt("sdpa", panel=panel, help="Attention kernel of every model load: sdpa (PyTorch), flash_attention_2 "
               "(needs the flash-attn package; what the authors' launch used) or eager.")


class GenerationConfig(ConfigModel):
    """Sampling settings shared by every generating stage (each stage sets its own defaults)."""

    max_new_tokens: int = opt(256, ge=1, panel="Generation", help="Tokens to generate at most.")
    temperature: float = opt(1.0, ge=0.0, panel="Generation", help="Sampling temperature; 0 = greedy.")
    top_p: float = opt(1.0, gt=0.0, le=1.0, panel="Generation", help="Nucleus sampling mass.")
    top_k: int = opt(0, ge=0, panel="Generation", help="Top-k filtering; 0 = off.")
    batch_size: int = opt(16, ge=1, panel="Generation", flag="--gen-batch-size", help="Prompts per generation batch.")
    enable_thinking: bool | None = opt(None, panel="Generation", flag="--thinking",
                                       help="enable_thinking for chat templates that have it (e.g. Qwen3); unset "
                                       "keeps the template's default.")
    compile_decoding: bool | None = opt(
        None, panel="Generation", help="hf: decode from a static KV cache with a compiled step (torch.compile; CUDA "
        "graphs on GPU) and no host sync per token; same tokens as the plain loop. Unset: on for CUDA, off on CPU "
        "(benchmarks/bench_decoding.py).")
    ignore_eos: bool = Field(False, description="Benchmarks (hf and vllm engines): always generate max_new_tokens "
                             "tokens; end-of-sequence tokens do not stop a completion.")


class LossConfig(ConfigModel):
    """The distillation loss: ``train`` applies it, ``diagnose`` and ``explain`` measure exactly it."""

    kind: Literal["topk_kl", "jsd", "sampled_rkl"] = opt(
        "topk_kl", panel="Loss", flag="--loss", help="topk_kl: divergence on the teacher's top-k; jsd: full "
        "vocabulary; sampled_rkl: sampled-token reverse KL (O(1) memory per token).")
    top_k: int = opt(20, ge=1, panel="Loss", flag="--loss-top-k", help="Teacher top-k tokens the loss is computed "
                     "on.")
    tail_bucket: bool = opt(False, panel="Loss", help="Keep the mass outside the top-k as one extra entry.")
    beta: float = opt(0.0, ge=0.0, le=1.0, panel="Loss", help="Generalized JSD mixing: 0 forward KL, 1 reverse KL.")
    temperature: float = opt(1.2, gt=0, panel="Loss", flag="--loss-temperature", help="Logits are divided by this "
                             "before the loss.")
    clip: float | None = opt(0.05, gt=0, panel="Loss", help="Per (token, entry) clip of the loss terms; none = off.")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> LossConfig:
        if self.kind == "sampled_rkl":
            refuse_changed(self, ("beta", "clip", "tail_bucket", "top_k"), "with --loss sampled_rkl")
        if self.kind == "jsd":
            refuse_changed(self, ("top_k", "tail_bucket"), "with --loss jsd (full vocabulary)")
        return self


ROLLOUT_MEMORY_SHARE = 0.3  # train's engines share the GPU with the student, its gradients and AdamW state


class VllmConfig(ConfigModel):
    """vLLM engine settings: the same for a stage's ``--backend vllm`` and train's ``--rollout-backend vllm``."""

    tensor_parallel_size: int = opt(1, ge=1, panel="vLLM", help="vllm: GPUs per engine.")
    memory_utilization: float | None = opt(
        None, gt=0, le=1, panel="vLLM", flag="--vllm-memory-utilization", help="vllm: share of memory the engines "
        f"may reserve. Unset: 0.85 of each GPU for a stage's engine, {ROLLOUT_MEMORY_SHARE} for train's rollout "
        "engines (they share the GPU with training; split between student and teacher engines), 0.3 of the "
        "machine's memory on CPU.")
    kv_cache_gib: float | None = opt(None, gt=0, panel="vLLM", flag="--vllm-kv-cache-gib", help="vllm: KV cache "
                                     "per engine in GiB instead of a memory share (train on CPU: 1 unless set).")
    enforce_eager: bool = opt(False, panel="vLLM", flag="--vllm-enforce-eager", help="vllm: skip graph "
                              "compilation (on CPU the engine starts in ~6 s instead of ~45 s, decodes ~20% slower).")
    sleep: bool = opt(True, panel="vLLM", flag="--vllm-sleep", help="train on GPU: free the engines' memory "
                      "while the student trains (vLLM sleep mode), wake them for the next rollouts. vLLM has no "
                      "sleep mode on CPU.")


class BackendConfig(ConfigModel):
    """Which engine generates: transformers in-process, vLLM, or an OpenAI-compatible server."""

    kind: Literal["hf", "vllm", "openai"] = opt("hf", panel="Backend", flag="--backend",
                                                help="Generation engine: hf (transformers), vllm or openai.")
    base_url: str | None = opt(None, panel="Backend", help="openai: server URL, e.g. http://127.0.0.1:8000/v1")
    served_model: str | None = opt(None, panel="Backend", help="openai: model name on the server (default --model).")
    tokenizer: str | None = Field(None, description="Local tokenizer for prompts (default --model).")
    api_key_env: str | None = opt("OPENAI_API_KEY", panel="Backend",
                                  help="Environment variable holding the API key (never logged).")
    concurrency: int = opt(8, ge=1, panel="Backend", help="openai: requests in flight at once.")
    max_retries: int = opt(5, ge=0, panel="Backend", help="openai: retries per request.")
    backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles each attempt.")
    timeout_s: float = opt(300.0, gt=0, panel="Backend", flag="--request-timeout", help="openai: seconds per request.")
    max_failures: int = opt(0, ge=0, panel="Backend", help="openai: requests that may still fail after their "
                            "retries; each is recorded with its reason (samples: an error column) and the stage "
                            "goes on. One more and it stops, keeping every finished row for a rerun to resume.")
    attn_implementation: AttnImplementation = attn_option("Backend")
    vllm: VllmConfig = nested(VllmConfig, hide=("sleep",))

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> BackendConfig:
        if self.kind != "vllm":
            refuse_changed(self.vllm, tuple(VllmConfig.model_fields), "without --backend vllm")
        refuse_changed(self.vllm, ("sleep",), "outside train --rollout-backend vllm")
        return self


def generation_defaults(**defaults):
    return lambda: GenerationConfig(**defaults)


MODEL_HELP = "HF model id, local folder, or the embedded default."


class TeacherPromptConfig(ConfigModel):
    """What the privileged teacher sees besides the question, and its chat template's thinking switch:
    the same for score, explain, diagnose and train."""

    context: Literal["rubric", "rubric+reference"] = opt(
        "rubric+reference", panel="Teacher", flag="--teacher-context", help="What the rcsd teacher sees besides "
        "the question.")
    thinking: bool | None = opt(None, panel="Teacher", flag="--teacher-thinking", help="enable_thinking of the "
                                "teacher prompts (default: the student's setting).")


class ContrastTeacherConfig(TeacherPromptConfig):
    """``--teacher-contrast``: the same teacher under a control context, subtracted (train and diagnose)."""

    contrast: Literal["none", "shuffled", "reference", "generic"] = opt(
        "none", panel="Teacher", flag="--teacher-contrast", help="A contrastive teacher: logits (1+w)*z_rubric - "
        "w*z_control, where z_control is the same teacher under a control context: shuffled (another item's "
        "rubric and this item's reference), reference (the reference alone) or generic (the authors' generic "
        "rubric); top-k is taken after the contrast. The rubric-specific part of the signal, amplified; one more "
        "teacher forward per step.")
    contrast_weight: float = opt(1.0, gt=0.0, panel="Teacher", flag="--contrast-weight",
                                 help="w of --teacher-contrast.")

    @model_validator(mode="after")
    def _weight_needs_contrast(self) -> ContrastTeacherConfig:
        if self.contrast == "none":
            refuse_changed(self, ("contrast_weight",), "without --teacher-contrast")
        return self

