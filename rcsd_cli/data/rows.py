"""The row models: every Parquet file rcsd writes holds rows of exactly one of them.

``schemas/`` carries their JSON Schema export (``python -m rcsd_cli.configs.schemas``);
``tests/configs/test_schemas.py`` fails when the two drift apart.
"""

from __future__ import annotations

import math
import re
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


EXTRA_MODELS: dict[str, type[BaseModel]] = {"criterion": Criterion, "criterion-verdict": CriterionVerdict}

