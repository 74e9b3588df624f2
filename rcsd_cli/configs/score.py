"""``rcsd score``'s settings, and the teacher whose top-k log-probs an offline round trains on.
"""

from __future__ import annotations

from typing import Literal

from rcsd_cli.configs.groups import (
    PROMPT_STYLE_HELP,
    BackendConfig,
    ConfigModel,
    GenerationConfig,
    PromptStyle,
    TeacherPromptConfig,
    generation_defaults,
)
from rcsd_cli.data.options import nested, opt


class ScoreTeacherConfig(TeacherPromptConfig):
    """``score --teacher-logprobs``: the teacher whose top-k log-probs an offline round trains on."""

    logprobs: bool = opt(False, panel="Teacher", flag="--teacher-logprobs", help="Store the teacher's top-k "
                         "log-probs per completion token (for train --samples).")
    model: str | None = opt(None, panel="Teacher", flag="--teacher-model", help="Teacher model (default: the "
                            "samples' model).")
    top_k: int = opt(20, ge=1, panel="Teacher", flag="--teacher-top-k", help="Top-k entries stored per token.")
    method: Literal["rcsd", "opsd"] = opt("rcsd", panel="Teacher", flag="--teacher-method", help="rcsd: rubric "
                                          "(+ reference) teacher; opsd: reference-answer teacher.")


class ScoreConfig(ConfigModel):
    samples: str = opt(panel="Data", argument=True, help="samples.parquet from rcsd sample.")
    rubrics: str = opt(panel="Data", help="rubrics.parquet the samples were drawn from.")
    judge_model: str | None = opt(None, panel="Model", help="LLM judge for criteria without a machine check "
                                  "(unset: they stay unjudged).")
    judge_retries: int = opt(2, ge=0, panel="Model", help="Retries after a malformed judge reply.")
    teacher: ScoreTeacherConfig = nested(ScoreTeacherConfig)
    prompt_style: PromptStyle | None = opt(None, panel="Teacher", help="Teacher prompt style (default: the "
                                           "samples' own). " + PROMPT_STYLE_HELP)
    seed: int = opt(0, panel="Data", help="Random seed (judge sampling).")
    generation: GenerationConfig = nested(generation_defaults(temperature=0.0, max_new_tokens=192),
                                          hide=("enable_thinking",))
    backend: BackendConfig = nested(BackendConfig)

