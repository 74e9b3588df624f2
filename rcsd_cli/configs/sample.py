"""``rcsd sample``'s settings.
"""

from __future__ import annotations

from rcsd_cli.configs.groups import (
    MODEL_HELP,
    PROMPT_STYLE_HELP,
    BackendConfig,
    ConfigModel,
    GenerationConfig,
    PromptStyle,
    generation_defaults,
)
from rcsd_cli.data.options import nested, opt
from rcsd_cli.models import DEFAULT_MODEL


class SampleConfig(ConfigModel):
    rubrics: str = opt(panel="Data", argument=True, help="rubrics.parquet (or a problems file).")
    n: int = opt(1, ge=1, panel="Data", help="Completions per problem.")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N problems.")
    seed: int = opt(0, panel="Data", help="Random seed (sampling).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=PROMPT_STYLE_HELP)
    model: str = opt(DEFAULT_MODEL, panel="Model", help=MODEL_HELP)
    generation: GenerationConfig = nested(generation_defaults(temperature=1.0, top_p=0.95, top_k=20))
    backend: BackendConfig = nested(BackendConfig)

