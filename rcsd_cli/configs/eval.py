"""``rcsd eval``'s settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from rcsd_cli.configs.groups import (
    MODEL_HELP,
    PROMPT_STYLE_HELP,
    BackendConfig,
    ConfigModel,
    GenerationConfig,
    PromptStyle,
    generation_defaults,
)
from rcsd_cli.data.options import nested, opt, refuse_changed
from rcsd_cli.models import DEFAULT_MODEL


class EvalConfig(ConfigModel):
    bench: str = opt(panel="Data", help="Benchmark name, or rubric (with --data rubrics.parquet).")
    data: str | None = opt(None, panel="Data", help="Local data file (GPQA CSV, rubrics.parquet for --bench rubric).")
    n: int = opt(1, ge=1, panel="Data", help="Completions per item (avg@n).")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N items.")
    offset: int = opt(0, ge=0, panel="Data", help="Skip this many items after the seeded shuffle.")
    seed: int = opt(0, panel="Data", help="Random seed (shuffle, sampling).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=PROMPT_STYLE_HELP)
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
    model: str = opt(DEFAULT_MODEL, panel="Model", help=MODEL_HELP)
    judge_model: str | None = opt(None, panel="Model", help="LLM judge for rubric criteria without a machine check.")
    generation: GenerationConfig = nested(generation_defaults(temperature=0.0))
    backend: BackendConfig = nested(BackendConfig)

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> EvalConfig:
        if self.scoring == "loglik":
            refuse_changed(self, ("grader",), "with --scoring loglik (choices are scored, not extracted)")
        else:
            refuse_changed(self, ("num_fewshot",), "with --scoring generate")
        return self

