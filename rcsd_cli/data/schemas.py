"""Pydantic v2 models: the single source of truth for every artifact and stage config.

Every Parquet file rcsd writes holds rows of exactly one of the *row* models below, and
its key-value metadata holds the stage's *config* model.  `schemas/` carries the JSON
Schema export of each; `tests/test_schemas.py` fails when the two drift apart.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rcsd_cli.data.options import nested, opt
from rcsd_cli.models import DEFAULT_MODEL

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
    finish_reason: Literal["stop", "length", "error"]
    backend: str = "hf"
    error: str | None = Field(None, description="Why the request failed after its retries (openai backend, "
                              "--max-failures); such rows have no completion and later stages skip them.")


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
    extraction_rules: list[str | None] | None = Field(None, description="Which rule found each prediction: "
                                                      "answer_line, boxed, or one of rcsd's fallbacks.")
    strict_correct: list[bool | None] | None = Field(None, description="Correct and in the format the prompt "
                                                     "asked for (Answer: line, or \\boxed{}).")
    choice_logprobs: list[float] | None = Field(None, description="--scoring loglik: summed log-probability of "
                                                "each choice as a continuation (lm-eval's protocol).")
    acc_norm: float | None = Field(None, description="--scoring loglik: correct under length normalisation.")
    gold_logprob: float | None = Field(None, description="--scoring loglik: log-probability of the gold choice.")
    errors: list[str | None] | None = Field(None, description="Per completion: why its request failed for good "
                                            "(openai backend, --max-failures); graded as an empty answer.")


class DiagnoseRow(_Row):
    """One item under one teacher condition of ``rcsd diagnose``."""

    id: str
    condition: str = Field(description="rubric, reference, shuffled or none: what the teacher saw.")
    student_correct: bool | None
    teacher_correct: bool | None
    student_score: float | None = Field(description="Rubric score of the student's own rollout.")
    teacher_score: float | None = Field(description="Rubric score of the teacher's own answer (its own rubric).")
    tokens: int = Field(description="Student rollout tokens the statistics below average over.")
    mean_loss: float = Field(description="Mean per-token loss train would apply on the student's rollout.")
    clip_share: float = Field(description="Share of (token, entry) loss terms at the clip.")
    top1_agreement: float
    gold_logprob_teacher: float | None = Field(description="Teacher's mean log-prob per token of the gold answer "
                                               "line after the student's rollout.")
    gold_logprob_student: float | None
    student_completion: str
    teacher_completion: str


class RubricQualityRow(_Row):
    """One item of ``rcsd eval-rubrics``: the judge's 1-5 scores of each rubric on the authors' six dimensions."""

    id: str
    question: str
    scores: dict[str, dict[str, float]] | None = Field(description="Rubric name -> dimension -> score (1-5; "
                                                       "overall = mean of the six); None if the judge never "
                                                       "gave a usable reply.")
    best_rubric: str | None
    brief_reason: str | None
    error: str | None = Field(None, description="Why the item is unjudged (malformed replies, a failed request).")


class MetricsRow(_Row):
    """One optimizer step of ``rcsd train``."""

    step: int
    method: str
    loss: float
    kl: float | None = Field(description="Forward KL(teacher||student) on the teacher's top-k, unclipped "
                             "(GRPO: k3 KL to the initial model).")
    top1_agreement: float | None
    reward: float | None = Field(description="Mean rubric score (or correctness) of the step's rollouts.")
    student_entropy: float | None = Field(None, description="Health: mean entropy (nats, temperature 1) of the "
                                          "student's next-token distribution over the step's completion tokens; a "
                                          "collapsing student drives it towards 0.")
    teacher_entropy: float | None = Field(None, description="Health: the same for the teacher, on the same tokens.")
    clip_share: float | None = Field(None, description="Health: share of the loss's (token, entry) terms at the "
                                     "--clip (they give no gradient); compare loss (clipped) with kl (unclipped).")
    distinct_2: float | None = Field(None, description="Health: distinct bigrams / bigrams of the step's rollouts "
                                     "(summed over processes); repetition drives it down.")
    truncated_share: float | None = Field(None, description="Health: share of rollouts that hit --max-new-tokens.")
    eval_accuracy: float | None = Field(None, description="--eval-every: held-out accuracy after this step.")
    eval_acc_norm: float | None = Field(None, description="--eval-every loglik: held-out acc_norm.")
    eval_gold_logprob: float | None = Field(None, description="--eval-every loglik: mean log-prob of the gold "
                                            "choice on the held-out items.")
    eval_strict_accuracy: float | None = Field(None, description="--eval-every generate: answers in the format the "
                                               "prompt asked for, and correct.")
    judge_unjudged: int | None = Field(None, description="--reward judge: criteria the judge could not decide this "
                                       "step (malformed replies after retries, failed requests); left out of scores.")
    reward_unscored: int | None = Field(None, description="--reward judge: rollouts with no judged positive "
                                        "criterion, given their group's mean reward (zero advantage).")
    grad_norm: float
    lr: float
    completion_tokens: int
    mean_completion_length: float
    rollout_tokens: int = Field(description="Rollout tokens used so far, this step included.")
    tokens_per_second: float
    seconds: float
    rollout_seconds: float | None = Field(None, description="Generating the student's rollouts (and weight pushes "
                                          "are not in it: see push_seconds).")
    analysis_seconds: float | None = Field(None, description="Reason-first: generating the teacher's analyses.")
    reward_seconds: float | None = Field(None, description="--reward judge: judging the step's rollouts.")
    eval_seconds: float | None = Field(None, description="--eval-every: evaluating the student on held-out items.")
    teacher_seconds: float | None = Field(None, description="Teacher forward passes (no grad).")
    student_seconds: float | None = Field(None, description="Student forward + loss + backward.")
    optimizer_seconds: float | None = Field(None, description="Gradient sync, clipping, optimizer and teacher update.")
    push_seconds: float | None = Field(None, description="--rollout-backend vllm: pushing weights into the engine.")
    peak_rss_gib: float | None = Field(None, description="Peak resident memory of this process during the step.")
    phase_peak_rss_gib: dict[str, float] | None = Field(None, description="Peak resident memory per phase.")
    peak_gpu_gib: float | None = Field(None, description="Peak CUDA memory allocated by torch during the step.")
    weights_moved: float | None = Field(None, description="Step 1 only: share of weight entries with a "
                                        "non-zero gradient that the optimizer step changed (sampled per tensor; "
                                        "pure bf16 at a small lr leaves most unchanged).")


# ----------------------------------------------------------------------------- configs


class _Config(BaseModel):
    """A stage's settings. Options of nested models may also be given flat, by option name; a nested
    group given in part keeps the stage's defaults for the rest."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, data: Any) -> Any:
        from rcsd_cli.data.options import fold_flat_options, with_group_defaults

        return with_group_defaults(cls, fold_flat_options(cls, data)) if isinstance(data, dict) else data


PromptStyle = Literal["paper", "answer-line"]
_PROMPT_STYLE_HELP = ("paper: the authors' prompts (Question: ..., \\boxed{} answer; teacher with reference answer "
                      "and rubric JSON); answer-line: question and an 'Answer: X' line instruction.")


AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]
Precision = Literal["fp32", "bf16-mixed", "bf16"]  # what each means: rcsd_cli/modeling/precision.py
SaveDtype = Literal["auto", "fp32", "bf16", "fp16"]


def attn_option(panel: str):
    """``--attn-implementation``, the same on every stage that loads a model with transformers."""
    return opt("sdpa", panel=panel, help="Attention kernel of every model load: sdpa (PyTorch), flash_attention_2 "
               "(needs the flash-attn package; what the authors' launch used) or eager.")


class GenerationConfig(_Config):
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
        "(examples/bench_decoding.py).")
    ignore_eos: bool = Field(False, description="Benchmarks (hf and vllm engines): always generate max_new_tokens "
                             "tokens; end-of-sequence tokens do not stop a completion.")


class LossConfig(_Config):
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
        from rcsd_cli.data.options import refuse_changed

        if self.kind == "sampled_rkl":
            refuse_changed(self, ("beta", "clip", "tail_bucket", "top_k"), "with --loss sampled_rkl")
        if self.kind == "jsd":
            refuse_changed(self, ("top_k", "tail_bucket"), "with --loss jsd (full vocabulary)")
        return self


ROLLOUT_MEMORY_SHARE = 0.3  # train's engines share the GPU with the student, its gradients and AdamW state


class VllmConfig(_Config):
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


class BackendConfig(_Config):
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
        from rcsd_cli.data.options import refuse_changed

        if self.kind != "vllm":
            refuse_changed(self.vllm, tuple(VllmConfig.model_fields), "without --backend vllm")
        refuse_changed(self.vllm, ("sleep",), "outside train --rollout-backend vllm")
        return self


def _generation(**defaults):
    return lambda: GenerationConfig(**defaults)


_MODEL_HELP = "HF model id, local folder, or the embedded default."


class GenRubricsConfig(_Config):
    data: str = opt(panel="Data", argument=True, help="Problems: JSONL, JSON, Parquet or CSV file, a folder of "
                    "them, a bundled benchmark name, or a Hugging Face dataset id (e.g. ScaleAI/RaR-Science).")
    split: str = opt("train", panel="Data", help="Hub datasets: the split to read.")
    subset: str | None = opt(None, panel="Data", help="Hub datasets: the configuration (subset) name.")
    generator: Literal["auto", "llm", "reference"] = opt(
        "auto", panel="Data", help="llm: the rubric-designer prompt; reference: built from the gold answer, no LLM; "
        "auto: llm for rows without a rubric.")
    regenerate: bool = opt(False, panel="Data", help="Regenerate rubrics even for rows that carry one.")
    fallback: Literal["none", "reference"] = opt(
        "none", panel="Data", help="llm: what a problem gets when every attempt failed: none (dropped, reasons in "
        "the rejected file) or reference (the check-based rubric from its gold answer, rubric_origin 'reference', "
        "counted in the summary line).")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N problems.")
    offset: int = opt(0, ge=0, panel="Data", help="Skip this many problems (benchmarks: after the seeded shuffle).")
    source_filter: str | None = opt(None, panel="Data", help="Keep rows whose source is one of these "
                                    "(comma-separated; the authors' RubricHub science split: "
                                    "RaR_science.jsonl,MegeScience.jsonl).")
    sample_size: int | None = opt(None, ge=1, panel="Data", help="Sample N rows as the authors' RubricHub loader "
                                  "does: DATA's files (DATA may be a folder of shards) in a --seed-shuffled order, "
                                  "from each the first rows up to an equal share of what is still missing "
                                  "(--seed 42 is their order).")
    prompt_style: Literal["paper", "short"] = opt(
        "paper", panel="Data", help="llm: paper = the authors' rubric designer prompt, replies read by their rule "
        "(first JSON array; criteria need text; weight defaults to 1, title to 'Criterion i'); short = rcsd's "
        "one-paragraph designer, replies checked against its format (3-25 criteria, an essential one, a pitfall).")
    model: str = opt(DEFAULT_MODEL, panel="Model", help=_MODEL_HELP)
    retries: int = opt(3, ge=0, panel="Generation", help="Extra attempts after an invalid LLM rubric.")
    seed: int = opt(0, panel="Data", help="Random seed (sampling, shuffles).")
    generation: GenerationConfig = nested(_generation(temperature=0.7, max_new_tokens=512, top_p=0.95, top_k=20,
                                                               batch_size=8))
    backend: BackendConfig = nested(BackendConfig)

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> GenRubricsConfig:
        from rcsd_cli.data.options import refuse_changed

        if self.generator == "reference":
            refuse_changed(self, ("fallback", "retries"), "with --generator reference (no model is asked)")
        return self


class SampleConfig(_Config):
    rubrics: str = opt(panel="Data", argument=True, help="rubrics.parquet (or a problems file).")
    n: int = opt(1, ge=1, panel="Data", help="Completions per problem.")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N problems.")
    seed: int = opt(0, panel="Data", help="Random seed (sampling).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=_PROMPT_STYLE_HELP)
    model: str = opt(DEFAULT_MODEL, panel="Model", help=_MODEL_HELP)
    generation: GenerationConfig = nested(_generation(temperature=1.0, top_p=0.95, top_k=20))
    backend: BackendConfig = nested(BackendConfig)


class TeacherPromptConfig(_Config):
    """What the privileged teacher sees besides the question, and its chat template's thinking switch:
    the same for score, explain, diagnose and train."""

    context: Literal["rubric", "rubric+reference"] = opt(
        "rubric+reference", panel="Teacher", flag="--teacher-context", help="What the rcsd teacher sees besides "
        "the question.")
    thinking: bool | None = opt(None, panel="Teacher", flag="--teacher-thinking", help="enable_thinking of the "
                                "teacher prompts (default: the student's setting).")


class ScoreTeacherConfig(TeacherPromptConfig):
    """``score --teacher-logprobs``: the teacher whose top-k log-probs an offline round trains on."""

    logprobs: bool = opt(False, panel="Teacher", flag="--teacher-logprobs", help="Store the teacher's top-k "
                         "log-probs per completion token (for train --samples).")
    model: str | None = opt(None, panel="Teacher", flag="--teacher-model", help="Teacher model (default: the "
                            "samples' model).")
    top_k: int = opt(20, ge=1, panel="Teacher", flag="--teacher-top-k", help="Top-k entries stored per token.")
    method: Literal["rcsd", "opsd"] = opt("rcsd", panel="Teacher", flag="--teacher-method", help="rcsd: rubric "
                                          "(+ reference) teacher; opsd: reference-answer teacher.")


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
        from rcsd_cli.data.options import refuse_changed

        if self.contrast == "none":
            refuse_changed(self, ("contrast_weight",), "without --teacher-contrast")
        return self


class TrainTeacherConfig(ContrastTeacherConfig):
    """The training teacher: which weights, what it sees, and the authors' rubric ablations."""

    kind: Literal["frozen", "live", "ema"] = opt("frozen", panel="Teacher", flag="--teacher", help="frozen: "
                                                 "initial weights; live: current weights; ema: moving average of "
                                                 "the student.")
    ema_decay: float = opt(0.99, gt=0.0, lt=1.0, panel="Teacher", flag="--ema-decay",
                           help="ema teacher: decay per step.")
    context: Literal["rubric", "rubric+reference", "reason-first"] = opt(
        "rubric+reference", panel="Teacher", flag="--teacher-context", help="What the rcsd teacher sees besides "
        "the question. reason-first: the teacher first writes an analysis of the reference and rubric (its own "
        "sampled turn), then a transition text, then the student's rollout (the authors' published run).")
    rubric_ablation: Literal["none", "generic", "shuffled", "noisy", "reduced"] | None = opt(
        None, panel="Teacher", flag="--rubric-ablation", help="The authors' ablations: none (no rubric, reference "
        "only), generic (the authors' six-criterion rubric for every item), shuffled (another item's rubric), noisy "
        "(criteria reordered, 30% of weights negated), reduced (a random half of the criteria). Rubrics from "
        "another generator: --rubrics from that file.")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> TrainTeacherConfig:
        from rcsd_cli.data.options import refuse_changed

        if self.kind != "ema":
            refuse_changed(self, ("ema_decay",), f"with --teacher {self.kind}")
        if self.contrast != "none" and self.context == "reason-first":
            raise ValueError("--teacher-contrast is not available with --teacher-context reason-first (the control "
                             "would need analyses of its own)")
        return self


class ScoreConfig(_Config):
    samples: str = opt(panel="Data", argument=True, help="samples.parquet from rcsd sample.")
    rubrics: str = opt(panel="Data", help="rubrics.parquet the samples were drawn from.")
    judge_model: str | None = opt(None, panel="Model", help="LLM judge for criteria without a machine check "
                                  "(unset: they stay unjudged).")
    judge_retries: int = opt(2, ge=0, panel="Model", help="Retries after a malformed judge reply.")
    teacher: ScoreTeacherConfig = nested(ScoreTeacherConfig)
    prompt_style: PromptStyle | None = opt(None, panel="Teacher", help="Teacher prompt style (default: the "
                                           "samples' own). " + _PROMPT_STYLE_HELP)
    seed: int = opt(0, panel="Data", help="Random seed (judge sampling).")
    generation: GenerationConfig = nested(_generation(temperature=0.0, max_new_tokens=192), hide=("enable_thinking",))
    backend: BackendConfig = nested(BackendConfig)


class ReasonFirstConfig(_Config):
    """``--teacher-context reason-first``: how the teacher's own analysis turn is sampled."""

    by: Literal["teacher", "student"] = opt(
        "teacher", panel="Teacher", flag="--analysis-by", help="reason-first: who writes the analysis. teacher = "
        "the frozen teacher; student = the current student (what the authors' vLLM path did).")
    temperature: float = opt(1.2, ge=0.0, panel="Teacher", flag="--analysis-temperature",
                             help="reason-first: analysis temperature.")
    top_p: float = opt(0.95, gt=0.0, le=1.0, panel="Teacher", flag="--analysis-top-p",
                       help="reason-first: analysis top-p.")
    top_k: int = opt(20, ge=0, panel="Teacher", flag="--analysis-top-k", help="reason-first: analysis top-k (0 = off).")
    max_new_tokens: int = opt(4096, ge=1, panel="Teacher", flag="--analysis-max-new-tokens",
                              help="reason-first: analysis length limit.")


class GRPOConfig(_Config):
    """``--method grpo``: group size, reward and the surrogate's clip and KL."""

    group_size: int = opt(4, ge=1, panel="Optimiser", flag="--group-size", help="GRPO: rollouts per prompt.")
    reward: Literal["rubric", "correct", "judge"] = opt(
        "rubric", panel="Optimiser", flag="--reward", help="GRPO reward: rubric (the rubric's machine checks), "
        "correct (answer correctness) or judge (every criterion without a check judged by --judge-model, score = "
        "the weighted share as rcsd score computes it; a rollout with nothing judged gets its group's mean).")
    clip_eps: float = opt(0.2, gt=0.0, panel="Optimiser", flag="--clip-eps", help="GRPO ratio clip.")
    kl_coef: float = opt(0.0, ge=0.0, panel="Optimiser", flag="--kl-coef",
                         help="GRPO: weight of the k3 KL to the frozen initial model.")
    judge_model: str | None = opt(None, panel="Optimiser", flag="--judge-model", help="--reward judge: the judge "
                                  "model (a local model, or the model name on --judge-base-url).")
    judge_backend: Literal["hf", "vllm", "openai"] = opt(
        "hf", panel="Optimiser", flag="--judge-backend", help="--reward judge: hf (in this process), vllm or "
        "openai (an OpenAI-compatible server at --judge-base-url; key from OPENAI_API_KEY).")
    judge_base_url: str | None = opt(None, panel="Optimiser", flag="--judge-base-url", help="--reward judge with "
                                     "--judge-backend openai: the server URL, e.g. http://127.0.0.1:8000/v1")
    judge_retries: int = opt(2, ge=0, panel="Optimiser", flag="--judge-retries", help="--reward judge: retries "
                             "after a malformed judge reply; then the criterion is unjudged (counted per step).")

    @model_validator(mode="after")
    def _judge_settings(self) -> GRPOConfig:
        from rcsd_cli.data.options import refuse_changed

        if self.reward != "judge":
            refuse_changed(self, ("judge_model", "judge_backend", "judge_base_url", "judge_retries"),
                           f"with --reward {self.reward}")
        elif not self.judge_model:
            raise ValueError("--reward judge needs --judge-model")
        elif (self.judge_backend == "openai") != bool(self.judge_base_url):
            raise ValueError("--judge-base-url goes with --judge-backend openai, and openai needs it")
        return self

    def judge_backend_config(self) -> BackendConfig:
        return BackendConfig(kind=self.judge_backend, base_url=self.judge_base_url)


class LoraConfig(_Config):
    """LoRA adapters (peft) instead of full fine-tuning, when ``rank`` > 0."""

    rank: int = opt(0, ge=0, panel="LoRA", flag="--lora-rank", help="0: full fine-tuning; >0: LoRA adapters of "
                    "this rank.")
    alpha: float = opt(32.0, gt=0, panel="LoRA", flag="--lora-alpha", help="LoRA scaling alpha.")
    dropout: float = opt(0.05, ge=0.0, lt=1.0, panel="LoRA", flag="--lora-dropout", help="LoRA dropout.")
    targets: str = opt("q_proj,v_proj", panel="LoRA", flag="--lora-targets", help="Comma-separated module names, "
                       "or all-linear.")
    merge: bool = opt(False, panel="LoRA", flag="--merge-lora", help="Also write merged full weights (to "
                      "OUTPUT/merged).")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> LoraConfig:
        from rcsd_cli.data.options import refuse_changed

        if not self.rank:
            refuse_changed(self, ("alpha", "dropout", "targets", "merge"), "without --lora-rank")
        return self


class RolloutConfig(_Config):
    """Who generates training rollouts (and reason-first analyses): rcsd's own loop, or colocated vLLM."""

    backend: Literal["hf", "vllm"] = opt(
        "hf", panel="Rollouts", flag="--rollout-backend", help="Engine for rollouts and reason-first analyses: hf "
        "(rcsd's decoding loop on the training modules) or vllm (colocated vLLM engine in this process, the "
        "student's weights (with LoRA: its adapter) pushed after every optimizer step; a frozen teacher's analyses "
        "from a second engine (with LoRA: the same engine without the adapter); "
        "needs rcsd[vllm]).")
    vllm: VllmConfig = nested(VllmConfig, hide=("tensor_parallel_size",))

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> RolloutConfig:
        from rcsd_cli.data.options import refuse_changed

        if self.backend != "vllm":
            refuse_changed(self.vllm, tuple(VllmConfig.model_fields), "without --rollout-backend vllm")
        refuse_changed(self.vllm, ("tensor_parallel_size",), "in train (one rollout engine per process)")
        return self

    @property
    def memory_share(self) -> float:
        """Share of the GPU all of the run's engines together may reserve."""
        return self.vllm.memory_utilization or ROLLOUT_MEMORY_SHARE


class DistributedConfig(_Config):
    """How a launched run (torchrun, accelerate) spreads the student over processes."""

    sharding: Literal["replicate", "full-shard", "shard-grad-op"] | None = opt(
        None, panel="Distributed", help="Under torchrun/accelerate: replicate (plain data parallel), full-shard "
        "(FSDP2, ZeRO-3-like) or shard-grad-op (ZeRO-2-like). Unset: what an accelerate FSDP config asks for, "
        "else replicate.")
    offload: Literal["none", "full"] = opt(
        "none", panel="Distributed", help="Sharded runs: full keeps parameter shards, gradients and AdamW state in "
        "host memory and steps the optimizer there (FSDP2 CPUOffloadPolicy; DeepSpeed's offload_param + "
        "offload_optimizer); each layer is copied to the GPU for its forward and backward.")


_STOP_RULE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*([<>])\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
                        r"\s*(\*\s*start)?\s*$")


def parse_stop_rule(text: str) -> tuple[str, str, float, bool]:
    """``"eval_accuracy<0.5*start"`` -> (metric, "<", 0.5, relative to the run's first value)."""
    m = _STOP_RULE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not METRIC<VALUE or METRIC>VALUE (VALUE may be F*start)")
    return m.group(1), m.group(2), float(m.group(3)), bool(m.group(4))


def numeric_metrics() -> list[str]:
    """The metrics.parquet columns --keep-best and --stop-when may name."""
    skip = {"step", "method", "phase_peak_rss_gib"}
    return [name for name in MetricsRow.model_fields if name not in skip]


class DryRunConfig(_Config):
    """The target of ``rcsd train --dry-run``'s simulated step: the world and one accelerator."""

    processes: int | None = opt(None, ge=1, panel="Dry run", flag="--processes", help="Processes to simulate "
                                "(the run's world size). Unset: the launcher's WORLD_SIZE, else 1.")
    device_memory: float | None = opt(None, gt=0, panel="Dry run", flag="--device-memory", help="GiB of the "
                                      "accelerator each process gets (H100: 80; the 8B recipes set it): the step "
                                      "is planned for a CUDA device of that size. Unset: this machine's device.")
    device_tflops: float = opt(989.0, gt=0, panel="Dry run", flag="--device-tflops", help="Dense bf16 TFLOP/s of "
                               "one accelerator (H100 SXM: 989), for the step time the counted FLOPs imply on a GPU "
                               "target.")
    utilisation: float = opt(0.4, gt=0, le=1, panel="Dry run", flag="--utilisation", help="Share of "
                             "--device-tflops the step is assumed to reach.")
    prompt_tokens: int = opt(2048, ge=1, panel="Dry run", flag="--dry-run-prompt-tokens", help="Without --rubrics "
                             "or without the model's tokenizer: the longest prompt on each side, in tokens (the "
                             "authors' 2048-token filter).")


class MonitorConfig(_Config):
    """Held-out evaluation during training, and what to do with it: keep the best weights, stop a collapse."""

    every: int = opt(0, ge=0, panel="Evaluation", flag="--eval-every", help="Evaluate the student on held-out "
                     "items every N steps and before the first (0 = never); results in metrics.parquet (eval_*).")
    bench: str | None = opt(None, panel="Evaluation", flag="--eval-bench", help="The held-out bench (the names "
                            "of rcsd eval --bench); its items must not be training items (checked by id and "
                            "question).")
    limit: int = opt(100, ge=1, panel="Evaluation", flag="--eval-limit", help="Held-out items per evaluation.")
    offset: int = opt(0, ge=0, panel="Evaluation", flag="--eval-offset", help="Skip this many items of the bench's "
                      "seeded shuffle (as rcsd eval --offset), e.g. past the ones gen-rubrics took for training.")
    scoring: Literal["loglik", "generate"] = opt(
        "loglik", panel="Evaluation", flag="--eval-scoring", help="loglik: multiple-choice log-likelihood as rcsd "
        "eval --scoring loglik (eval_accuracy, eval_acc_norm, eval_gold_logprob); generate: greedy answers "
        "(--max-new-tokens) graded as rcsd eval (eval_accuracy, eval_strict_accuracy).")
    keep_best: str | None = opt(None, panel="Evaluation", flag="--keep-best", help="A metrics.parquet column "
                                "(e.g. eval_accuracy; loss and kl count lower as better): the weights at its best "
                                "step are kept in OUTPUT/best and the model card names the step.")
    stop_when: str | None = opt(None, panel="Evaluation", flag="--stop-when", help="Stop the run when a metric "
                                "crosses a line, e.g. 'eval_accuracy<0.5*start' (start: its first value) or "
                                "'student_entropy<0.3'; one line says why, the final weights are written.")

    @model_validator(mode="after")
    def _consistent(self) -> MonitorConfig:
        known = numeric_metrics()
        if self.every and not self.bench:
            raise ValueError("--eval-every needs --eval-bench")
        if self.bench and not self.every:
            raise ValueError("--eval-bench needs --eval-every N")
        for flag, name in (("--keep-best", self.keep_best),
                           ("--stop-when", parse_stop_rule(self.stop_when)[0] if self.stop_when else None)):
            if name and name not in known:
                raise ValueError(f"{flag}: unknown metric {name!r} (metrics.parquet has {', '.join(known)})")
            if name and name.startswith("eval_") and not self.every:
                raise ValueError(f"{flag} {name} needs --eval-every N --eval-bench NAME")
        return self


Reduction = Literal["sequence", "token"]


class TrainConfig(_Config):
    """Settings of one ``rcsd train`` run; stored in every checkpoint and in metrics.parquet."""

    rubrics: str | None = opt(None, panel="Data", help="rubrics.parquet (online training).")
    samples: str | None = opt(None, panel="Data", help="Offline round: samples.parquet to train on (no resampling).")
    scores: str | None = opt(None, panel="Data", help="Offline round: scores.parquet with teacher top-k log-probs.")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N problems.")
    max_teacher_prompt_tokens: int | None = opt(
        None, ge=1, panel="Data", help="Drop items whose teacher prompt is longer than N tokens, counted on the "
        "exact ids the teacher gets (reason-first: the analysis prompt). The authors dropped items over 2048; the "
        "count is printed (--dry-run too) and recorded in metrics.parquet and the model card.")
    seed: int = opt(0, panel="Data", help="Random seed (data order, sampling).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=_PROMPT_STYLE_HELP)
    model: str = opt(DEFAULT_MODEL, panel="Model", help=_MODEL_HELP)
    attn_implementation: AttnImplementation = attn_option("Model")
    task: Literal["reasoner", "rubric-generator"] = opt(
        "reasoner", panel="Model", help="rubric-generator: stage I, the student writes rubrics, the teacher also sees "
        "the reference rubric.")
    method: Literal["rcsd", "opsd", "grpo", "sft"] = opt(
        "rcsd", panel="Model", help="rcsd: rubric teacher; opsd: reference-answer teacher; grpo: rubric/correctness "
        "reward; sft: cross-entropy on reference answers.")
    teacher: TrainTeacherConfig = nested(TrainTeacherConfig)
    reason_first: ReasonFirstConfig = nested(ReasonFirstConfig)
    loss: LossConfig = nested(LossConfig)
    loss_reduction: Reduction = opt(
        "sequence", panel="Loss", help="sequence: mean over sequences of each sequence's token mean (the authors'); "
        "token: sum over the step's completion tokens / their number.")
    skip_first_tokens: int = opt(0, ge=0, panel="Loss", help="Leave the first N completion tokens out of the loss.")
    chunk_size: int = opt(128, ge=1, panel="Loss", help="Completion tokens per loss chunk (bounds logits memory).")
    steps: int = opt(10, ge=1, panel="Optimiser", help="Optimizer steps.")
    max_rollout_tokens: int | None = opt(None, ge=1, panel="Optimiser",
                                         help="Stop once this many rollout tokens were used.")
    batch_size: int = opt(4, ge=1, panel="Optimiser", help="Prompts per optimizer step (all processes together).")
    micro_batch_size: int = opt(4, ge=1, panel="Optimiser", help="Sequences per forward/backward pass.")
    gradient_checkpointing: bool = opt(False, panel="Optimiser", help="Recompute the student's decoder layers in "
                                       "backward instead of holding their activations (less memory, more time).")
    precision: Precision | None = opt(
        None, panel="Optimiser", help="fp32; bf16-mixed: fp32 master weights and AdamW state, bf16 compute (HF "
        "Trainer's bf16=True, the authors' DeepSpeed bf16); bf16: weights and AdamW state in bf16 (updates under "
        "half a bf16 ulp vanish: at lr 5e-6 about 99% of weights never move). Unset: bf16-mixed on CUDA, fp32 on CPU.")
    lr: float = opt(5e-6, gt=0, panel="Optimiser", help="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt(
        "linear", panel="Optimiser", help="After warm-up: constant, linear decay to 0 at --steps (the Trainer "
        "default the authors used) or cosine.")
    warmup_steps: int = opt(0, ge=0, panel="Optimiser", help="Linear warm-up steps.")
    weight_decay: float = opt(0.0, ge=0.0, panel="Optimiser", help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, gt=0, panel="Optimiser", help="Gradient clipping norm.")
    grpo: GRPOConfig = nested(GRPOConfig)
    lora: LoraConfig = nested(LoraConfig)
    distributed: DistributedConfig = nested(DistributedConfig)
    save_every: int = opt(0, ge=0, panel="Output", help="Checkpoint every N steps (0 = only the final model).")
    save_total_limit: int | None = opt(None, ge=1, panel="Output", help="Keep only the newest N checkpoints (never "
                                       "the one a run resumed from); unset keeps all.")
    save_dtype: SaveDtype = opt(
        "auto", panel="Output", help="dtype of the final weights (full or merged); auto: the dtype the model's "
        "config declares. Checkpoints always keep the training weights (fp32 master under bf16-mixed).")
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = opt(
        "none", panel="Output", help="Also log every step to TensorBoard (OUTPUT/runs), Weights & Biases or Trackio "
        "(optional extras). metrics.parquet is always written.")
    rollout: RolloutConfig = nested(RolloutConfig)
    monitor: MonitorConfig = nested(MonitorConfig)
    dry_run: DryRunConfig = nested(DryRunConfig)
    generation: GenerationConfig = nested(_generation(temperature=1.2, top_p=0.95, top_k=20),
                                          flags={"enable_thinking": "--student-thinking"})

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> TrainConfig:
        from rcsd_cli.data.options import refuse_changed

        def refuse(names, why):
            refuse_changed(self, names, why)

        offline = bool(self.samples or self.scores)
        reason_first = tuple(ReasonFirstConfig.model_fields)
        if self.method != "rcsd" or self.task != "reasoner":
            refuse_changed(self.teacher, ("rubric_ablation", "contrast", "contrast_weight"),
                           f"with --method {self.method} --task {self.task} (RCSD reasoner only)")
        if offline or self.method in ("grpo", "sft"):
            refuse(("max_teacher_prompt_tokens",), "on an offline round or with --method grpo/sft (no teacher "
                   "prompt is built)")
        if offline:
            why = "on an offline round (--samples/--scores: the teacher's log-probs are stored)"
            refuse_changed(self.teacher, tuple(TrainTeacherConfig.model_fields), why)
            refuse_changed(self.reason_first, reason_first, why)
        if self.method != "grpo":
            refuse_changed(self.grpo, tuple(GRPOConfig.model_fields), f"with --method {self.method} (GRPO only)")
        if self.teacher.context != "reason-first":
            refuse_changed(self.reason_first, reason_first, "without --teacher-context reason-first")
        elif self.task == "rubric-generator":
            raise ValueError("--teacher-context reason-first is not available with --task rubric-generator (the "
                             "authors' stage I run used the plain teacher)")
        if offline or self.method == "sft":
            refuse_changed(self.rollout, ("backend",), "on an offline round or with --method sft (nothing is "
                           "generated)")
        return self


class DiagnoseConfig(_Config):
    """Settings of ``rcsd diagnose``: does the privileged teacher carry signal, before any training?"""

    rubrics: str = opt(panel="Data", argument=True, help="rubrics.parquet (the items train would use).")
    limit: int = opt(32, ge=2, panel="Data", help="Items to diagnose (a seeded sample).")
    max_teacher_prompt_tokens: int | None = opt(
        None, ge=1, panel="Data", help="As train's: drop items whose rubric teacher prompt is longer than N tokens "
        "before the sample is drawn.")
    seed: int = opt(0, panel="Data", help="Random seed (item sample, sampling, shuffled rubrics).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=_PROMPT_STYLE_HELP)
    model: str = opt(DEFAULT_MODEL, panel="Model", help=_MODEL_HELP)
    conditions: str = opt("rubric,reference,shuffled,none", panel="Teacher",
                          help="Teacher contexts to compare, comma-separated: rubric (as train: rubric and "
                          "reference), reference (OPSD's), shuffled (another item's rubric and its own reference), "
                          "none (the student's own prompt: the zero point), contrast (train's --teacher-contrast "
                          "teacher: the rubric teacher minus the control named by --teacher-contrast).")
    teacher: ContrastTeacherConfig = nested(ContrastTeacherConfig, hide=("context",))
    loss: LossConfig = nested(LossConfig, help="The loss train would apply (same options as train).")
    generation: GenerationConfig = nested(_generation(max_new_tokens=128, temperature=1.2, top_p=0.95, top_k=20),
                                          flags={"enable_thinking": "--student-thinking"})
    backend: BackendConfig = nested(BackendConfig, help="What generates the student's rollouts and the teachers' "
                                    "answers (the log-probs always come from the model in-process; the contrast "
                                    "teacher's answers too, as no server decodes two prompts as one).")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> DiagnoseConfig:
        from rcsd_cli.data.options import refuse_changed

        refuse_changed(self.teacher, ("context",), "in diagnose (--conditions names the teacher contexts)")
        has_contrast = "contrast" in self.conditions.split(",")
        if has_contrast and self.teacher.contrast == "none":
            raise ValueError("the contrast condition needs --teacher-contrast shuffled|reference|generic (its control)")
        if not has_contrast:
            refuse_changed(self.teacher, ("contrast", "contrast_weight"), "without the contrast condition")
        return self

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, v: str) -> str:
        names = [c.strip() for c in v.split(",") if c.strip()]
        bad = [c for c in names if c not in ("rubric", "reference", "shuffled", "none", "contrast")]
        if bad or not names:
            raise ValueError(f"unknown condition {bad[0]!r}" if bad else "give at least one condition")
        return ",".join(names)


class ExplainConfig(_Config):
    """Settings of ``rcsd explain``: the per-token credit train would give stored samples."""

    samples: str = opt(panel="Data", argument=True, help="samples.parquet from rcsd sample.")
    rubrics: str = opt(panel="Data", help="rubrics.parquet the samples were drawn from.")
    limit: int = opt(8, ge=1, panel="Data", help="Completions to render.")
    prompt_style: PromptStyle | None = opt(None, panel="Data", help="Teacher prompt style (default: the samples' "
                                           "own).")
    model: str | None = opt(None, panel="Model", help="Model (default: the samples' model).")
    teacher: TeacherPromptConfig = nested(TeacherPromptConfig)
    loss: LossConfig = nested(LossConfig, help="The loss train would apply (same options as train).")


class EvalConfig(_Config):
    bench: str = opt(panel="Data", help="Benchmark name, or rubric (with --data rubrics.parquet).")
    data: str | None = opt(None, panel="Data", help="Local data file (GPQA CSV, rubrics.parquet for --bench rubric).")
    n: int = opt(1, ge=1, panel="Data", help="Completions per item (avg@n).")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N items.")
    offset: int = opt(0, ge=0, panel="Data", help="Skip this many items after the seeded shuffle.")
    seed: int = opt(0, panel="Data", help="Random seed (shuffle, sampling).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=_PROMPT_STYLE_HELP)
    scoring: Literal["generate", "loglik"] = opt(
        "generate", panel="Data", help="generate: sample answers and extract them; loglik: multiple-choice "
        "log-likelihood with the protocol of lm-evaluation-harness's own task for the bench (arc_easy, "
        "arc_challenge, sciq with its support passage, openbookqa's bare stem, mmlu_* with letters; acc, acc_norm, "
        "gold log-prob), no generation. gpqa and rubric files have no published protocol: ARC's template.")
    num_fewshot: int = opt(0, ge=0, panel="Data", help="--scoring loglik on mmlu-stem: worked examples from each "
                           "subject's dev split before the question (lm-eval's first_n); 0-shot otherwise.")
    grader: Literal["rcsd", "authors", "simple-evals"] = opt(
        "rcsd", panel="Data", help="generate: how answers are extracted and compared. rcsd: Answer: line, else the "
        "last \\boxed{}, else fallbacks; math-verify for open answers. authors: the paper's eval/evaluate_math.py "
        "(only the last \\boxed{} counts; math-verify without fallback parsing). simple-evals: OpenAI "
        "simple-evals' multiple-choice rule (the first 'Answer: X', X in A-D; multiple choice only).")
    model: str = opt(DEFAULT_MODEL, panel="Model", help=_MODEL_HELP)
    judge_model: str | None = opt(None, panel="Model", help="LLM judge for rubric criteria without a machine check.")
    generation: GenerationConfig = nested(_generation(temperature=0.0))
    backend: BackendConfig = nested(BackendConfig)

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> EvalConfig:
        from rcsd_cli.data.options import refuse_changed

        if self.scoring == "loglik":
            refuse_changed(self, ("grader",), "with --scoring loglik (choices are scored, not extracted)")
        else:
            refuse_changed(self, ("num_fewshot",), "with --scoring generate")
        return self


class EvalRubricsConfig(_Config):
    """``rcsd eval-rubrics``: the authors' rubric-quality protocol, generated rubrics against reference ones."""

    generated: str = opt(panel="Data", argument=True, help="Generated rubrics (rubrics.parquet from gen-rubrics, "
                         "or any problems file with a rubric per row).")
    reference: str = opt(panel="Data", help="Reference rubrics (e.g. the dataset's own, imported by gen-rubrics); "
                         "items are matched by question text, as the authors match them.")
    name: str = opt("generated", panel="Data", help="The generated rubrics' name in the judge prompt (the "
                    "reference's is GT).")
    limit: int | None = opt(100, ge=1, panel="Data", help="Items to judge (their --num_examples).")
    shuffle: bool = opt(False, panel="Data", help="Take a --seed-shuffled sample of the matched items instead of "
                        "the first ones in the reference's order (their --shuffle).")
    seed: int = opt(42, panel="Data", help="Random seed (the sample; their default 42).")
    judge_model: str = opt(panel="Model", help="The judge (a local model, or the model name on --base-url).")
    judge_retries: int = opt(4, ge=0, panel="Model", help="Retries after an unusable judge reply (their 5 "
                             "attempts); then the item is recorded as unjudged.")
    generation: GenerationConfig = nested(_generation(temperature=0.0, max_new_tokens=1024))
    backend: BackendConfig = nested(BackendConfig)


class ServeConfig(_Config):
    """``rcsd serve``: one model behind an OpenAI-compatible HTTP API, refusing what it cannot serve."""

    model: str = opt(DEFAULT_MODEL, panel="Model", help=_MODEL_HELP)
    served_name: str | None = opt(None, panel="Model", help="Model name clients use (default --model).")
    host: str = opt("127.0.0.1", panel="Server", help="Interface to bind (loopback by default).")
    port: int = opt(8000, ge=0, le=65535, panel="Server", help="0 picks a free port.")
    max_tokens_limit: int | None = opt(None, ge=1, panel="Server", help="Largest max_tokens a request may ask "
                                       "for (default: the model's context length); above it: 400.")
    max_n: int = opt(64, ge=1, panel="Server", help="Largest n (completions per request); above it: 400.")
    max_queue: int = opt(64, ge=1, panel="Server", help="Requests running or waiting at once; one more gets 503 "
                         "with Retry-After instead of stalling.")
    batch_rows: int = opt(32, ge=1, panel="Server", help="Completions decoded at once: the requests waiting are "
                          "batched together (continuous batching; a finished row takes the next completion).")


ROW_MODELS: dict[str, type[BaseModel]] = {
    "problems": Problem,
    "rubrics": Rubric,
    "rejected-rubrics": RejectedRubric,
    "samples": Sample,
    "scores": Score,
    "eval": EvalItem,
    "metrics": MetricsRow,
    "diagnose": DiagnoseRow,
    "rubric-quality": RubricQualityRow,
}
CONFIG_MODELS: dict[str, type[BaseModel]] = {
    "gen-rubrics": GenRubricsConfig,
    "sample": SampleConfig,
    "score": ScoreConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "diagnose": DiagnoseConfig,
    "explain": ExplainConfig,
    "eval-rubrics": EvalRubricsConfig,
    "serve": ServeConfig,
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
    """Regenerate ``schemas/``: ``python -m rcsd_cli.data.schemas``."""
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
