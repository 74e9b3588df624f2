"""``rcsd explain``'s settings.
"""

from __future__ import annotations

from rcsd_cli.configs.groups import ConfigModel, LossConfig, PromptStyle, TeacherPromptConfig
from rcsd_cli.data.options import nested, opt


class ExplainConfig(ConfigModel):
    """Settings of ``rcsd explain``: the per-token credit train would give stored samples."""

    samples: str = opt(panel="Data", argument=True, help="samples.parquet from rcsd sample.")
    rubrics: str = opt(panel="Data", help="rubrics.parquet the samples were drawn from.")
    limit: int = opt(8, ge=1, panel="Data", help="Completions to render.")
    prompt_style: PromptStyle | None = opt(None, panel="Data", help="Teacher prompt style (default: the samples' "
                                           "own).")
    model: str | None = opt(None, panel="Model", help="Model (default: the samples' model).")
    teacher: TeacherPromptConfig = nested(TeacherPromptConfig)
    loss: LossConfig = nested(LossConfig, help="The loss train would apply (same options as train).")

