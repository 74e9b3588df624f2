"""Pydantic v2 models: the single source of truth for every artifact and stage config.

Every Parquet file rcsd writes holds rows of exactly one of the *row* models below, and
its key-value metadata holds the stage's *config* model.  `schemas/` carries the JSON
Schema export of each; `tests/test_schemas.py` fails when the two drift apart.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_QUESTION_CHARS = 32_000
CheckKind = Literal["answer_equals", "regex", "max_words"]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Check(_Row):
    """A machine-checkable criterion, scored in code instead of by a judge.

    ``answer_equals``: the extracted final answer equals ``value`` (letters for multiple
    choice, normalised text or numbers otherwise). ``regex``: ``value`` matches anywhere in the
    completion (case-insensitive, multi-line). ``max_words``: the completion has at most
    ``int(value)`` words.
    """

    kind: CheckKind
    value: str

    @model_validator(mode="after")
    def _value_is_usable(self) -> Check:
        if self.kind == "max_words" and not self.value.strip().isdigit():
            raise ValueError("max_words check needs an integer value")
        if self.kind == "regex":
            import re

            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from exc
        return self


class Criterion(_Row):
    """One weighted rubric item; a negative weight marks a pitfall (points lost when met)."""

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    description: str = ""
    weight: float
    tags: list[str] = Field(default_factory=list)
    check: Check | None = None

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be a finite number")
        return v


class Problem(_Row):
    """A question to answer, with whatever gold information the source provides."""

    id: str = Field(min_length=1)
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    reference_answer: str | None = None
    choices: list[str] | None = None
    answer: str | None = Field(default=None, description="Gold final answer: a letter for multiple choice.")
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Rubric(Problem):
    """A problem together with its rubric: one row of ``rubrics.parquet``."""

    rubric: list[Criterion] = Field(min_length=1)
    rubric_origin: Literal["imported", "llm", "reference"]

    @field_validator("rubric")
    @classmethod
    def _unique_ids(cls, v: list[Criterion]) -> list[Criterion]:
        ids = [c.id for c in v]
        if len(set(ids)) != len(ids):
            raise ValueError("criterion ids must be unique within a rubric")
        return v


class RejectedRubric(_Row):
    """A generated rubric that failed validation, kept with the reason it was dropped."""

    problem_id: str
    attempt: int
    reason: str
    raw_output: str


class Sample(_Row):
    """One completion; token ids (not re-decoded text) carry it to later stages."""

    id: str
    problem_id: str
    sample_index: int = Field(ge=0)
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    completion: str
    finish_reason: Literal["stop", "length"]
    backend: str = "hf"


class CriterionVerdict(_Row):
    """Whether one criterion was met; ``met`` is None when no verdict could be obtained."""

    criterion_id: str
    weight: float
    met: bool | None
    method: Literal["check", "judge", "unjudged"]
    explanation: str = ""


class Score(_Row):
    """Rubric score of one sample: points met / positive points, clipped to [0, 1]."""

    sample_id: str
    problem_id: str
    verdicts: list[CriterionVerdict]
    score: float | None = Field(description="None when no positive criterion could be judged.")
    points_met: float
    points_possible: float
    n_unjudged: int
    extracted_answer: str | None
    correct: bool | None
    teacher_topk_ids: list[list[int]] | None = Field(
        None, description="score --teacher-logprobs: the teacher's top-k token ids per completion token.")
    teacher_topk_logprobs: list[list[float]] | None = Field(
        None, description="Log-probabilities (temperature 1) matching teacher_topk_ids.")


class EvalItem(_Row):
    """One benchmark item with its n completions; accuracy is avg@n over them."""

    id: str
    bench: str
    question: str
    choices: list[str] | None
    gold: str | None
    completions: list[str]
    completion_tokens: list[int]
    predictions: list[str | None]
    correct: list[bool | None] = Field(description="None when the item has no gold answer.")
    accuracy: float | None
    rubric_scores: list[float | None]
    rubric_score: float | None


class MetricsRow(_Row):
    """One optimizer step of ``rcsd train``."""

    step: int
    method: str
    loss: float
    kl: float | None = Field(description="Forward KL(teacher||student) on the teacher's top-k, unclipped "
                             "(GRPO: k3 KL to the initial model).")
    top1_agreement: float | None
    reward: float | None = Field(description="Mean rubric score (or correctness) of the step's rollouts.")
    grad_norm: float
    lr: float
    completion_tokens: int
    mean_completion_length: float
    rollout_tokens: int = Field(description="Rollout tokens used so far, this step included.")
    tokens_per_second: float
    seconds: float


# ----------------------------------------------------------------------------- configs


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationConfig(_Config):
    """Sampling settings shared by every generating stage."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering.")
    batch_size: int = Field(16, ge=1)
    enable_thinking: bool | None = Field(None, description="Passed to chat templates that support it (e.g. "
                                         "Qwen3); None keeps the template's default. Applied to every prompt.")


class BackendConfig(_Config):
    """Which engine generates: transformers in-process, vLLM, or an OpenAI-compatible server."""

    kind: Literal["hf", "vllm", "openai"] = "hf"
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8000/v1")
    served_model: str | None = Field(None, description="openai: model name the server expects (default --model).")
    tokenizer: str | None = Field(None, description="Local tokenizer for prompts (default --model).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once.")
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles each attempt.")
    timeout_s: float = Field(300.0, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine.")
    memory_utilization: float | None = Field(None, gt=0, le=1, description="vllm: fraction of each GPU's "
                                             "memory (default 0.85) or, on CPU, of the machine's memory (default "
                                             "0.3) the engine may reserve.")


class GenRubricsConfig(_Config):
    data: str
    generator: Literal["auto", "llm", "reference"] = "auto"
    regenerate: bool = Field(False, description="Regenerate rubrics even for rows that carry one.")
    model: str
    retries: int = Field(3, ge=0, description="Extra attempts after an invalid LLM rubric.")
    limit: int | None = None
    seed: int = 0
    generation: GenerationConfig
    backend: BackendConfig = Field(default_factory=BackendConfig)


class SampleConfig(_Config):
    rubrics: str
    model: str
    n: int = Field(1, ge=1, description="Completions per problem.")
    limit: int | None = None
    seed: int = 0
    generation: GenerationConfig
    backend: BackendConfig = Field(default_factory=BackendConfig)


class ScoreConfig(_Config):
    samples: str
    rubrics: str
    judge_model: str | None = None
    judge_retries: int = 2
    teacher_logprobs: bool = Field(False, description="Store the teacher's top-k log-probs per completion token.")
    teacher_model: str | None = None
    teacher_top_k: int = Field(20, ge=1)
    teacher_method: Literal["rcsd", "opsd"] = "rcsd"
    teacher_context: Literal["rubric", "rubric+reference"] = "rubric+reference"
    seed: int = 0
    generation: GenerationConfig
    backend: BackendConfig = Field(default_factory=BackendConfig, description="Judge and teacher engine.")


class TrainConfig(_Config):
    """Settings of one ``rcsd train`` run; stored in every checkpoint and in metrics.parquet."""

    rubrics: str | None = None
    samples: str | None = Field(None, description="Offline round: samples.parquet to train on (no resampling).")
    scores: str | None = Field(None, description="Offline round: scores.parquet with teacher top-k log-probs.")
    model: str
    task: Literal["reasoner", "rubric-generator"] = Field(
        "reasoner", description="rubric-generator: stage I, the student writes rubrics, the teacher also sees the "
        "reference rubric.")
    method: Literal["rcsd", "opsd", "grpo", "sft"] = Field(
        "rcsd", description="rcsd: rubric teacher; opsd: reference-answer teacher; grpo: rubric/correctness "
        "reward; sft: cross-entropy on reference answers.")
    teacher: Literal["frozen", "live", "ema"] = Field("frozen", description="frozen: initial weights; live: "
                                                     "current weights; ema: moving average of the student.")
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    teacher_context: Literal["rubric", "rubric+reference", "reason-first"] = Field(
        "rubric+reference", description="reason-first: the teacher first writes an analysis of the rubric, "
        "which is then added to its context (with the reference answer).")
    steps: int = Field(10, ge=1)
    max_rollout_tokens: int | None = Field(None, ge=1, description="Stop once this many rollout tokens were used.")
    batch_size: int = Field(4, ge=1, description="Prompts per optimizer step.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward pass.")
    group_size: int = Field(4, ge=1, description="GRPO: rollouts per prompt.")
    reward: Literal["rubric", "correct"] = Field("rubric", description="GRPO reward: rubric score or correctness.")
    clip_eps: float = Field(0.2, gt=0.0, description="GRPO ratio clip.")
    kl_coef: float = Field(0.0, ge=0.0, description="GRPO: weight of the k3 KL to the frozen initial model.")
    lr: float = Field(5e-6, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(1.0, gt=0)
    lora_rank: int = Field(0, ge=0, description="0: full fine-tuning; >0: LoRA adapters on all linear layers.")
    lora_alpha: float = Field(16.0, gt=0)
    loss: Literal["topk_kl", "jsd", "sampled_rkl"] = "topk_kl"
    top_k_loss: int = Field(20, ge=1, description="Teacher top-k tokens the loss is computed on.")
    tail_bucket: bool = Field(False, description="Keep the mass outside the top-k as one extra entry.")
    beta: float = Field(0.0, ge=0.0, le=1.0, description="Generalized JSD mixing: 0 forward KL, 1 reverse KL.")
    loss_temperature: float = Field(1.2, gt=0)
    clip: float | None = Field(0.05, description="Per (token, entry) clip of the loss terms; None disables.")
    skip_first_tokens: int = Field(0, ge=0, description="Leave the first N completion tokens out of the loss.")
    chunk_size: int = Field(128, ge=1, description="Completion tokens per loss chunk (bounds logits memory).")
    save_every: int = Field(0, ge=0)
    limit: int | None = None
    seed: int = 0
    sharding: Literal["replicate", "full-shard", "shard-grad-op"] = Field(
        "replicate", description="Under torchrun/accelerate: replicate (plain data parallel), full-shard (FSDP2, "
        "ZeRO-3-like) or shard-grad-op (FSDP2 without resharding after forward, ZeRO-2-like).")
    generation: GenerationConfig


class EvalConfig(_Config):
    bench: str
    data: str | None = None
    model: str
    n: int = Field(1, ge=1, description="Completions per item (avg@n).")
    limit: int | None = None
    offset: int = Field(0, ge=0, description="Skip this many items after the seeded shuffle.")
    seed: int = 0
    judge_model: str | None = None
    generation: GenerationConfig
    backend: BackendConfig = Field(default_factory=BackendConfig)


ROW_MODELS: dict[str, type[BaseModel]] = {
    "problems": Problem,
    "rubrics": Rubric,
    "rejected-rubrics": RejectedRubric,
    "samples": Sample,
    "scores": Score,
    "eval": EvalItem,
    "metrics": MetricsRow,
}
CONFIG_MODELS: dict[str, type[BaseModel]] = {
    "gen-rubrics": GenRubricsConfig,
    "sample": SampleConfig,
    "score": ScoreConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
EXTRA_MODELS: dict[str, type[BaseModel]] = {"criterion": Criterion, "criterion-verdict": CriterionVerdict}


def export_json_schemas() -> dict[str, dict]:
    """JSON Schema of every row and config model, keyed by the file name in ``schemas/``."""
    out = {}
    for name, model in {**ROW_MODELS, **EXTRA_MODELS}.items():
        out[f"{name}.schema.json"] = model.model_json_schema()
    for name, model in CONFIG_MODELS.items():
        out[f"{name}-config.schema.json"] = model.model_json_schema()
    return out


def write_json_schemas(folder) -> list:
    """Regenerate ``schemas/``: ``python -m rcsd_cli.schemas``."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, schema in export_json_schemas().items():
        (folder / fname).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(folder / fname)
    return written


if __name__ == "__main__":  # pragma: no cover
    import sys

    for p in write_json_schemas(sys.argv[1] if len(sys.argv) > 1 else "schemas"):
        print(p)
