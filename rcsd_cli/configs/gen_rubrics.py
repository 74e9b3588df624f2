"""``rcsd gen-rubrics``'s settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from rcsd_cli.configs.groups import MODEL_HELP, BackendConfig, ConfigModel, GenerationConfig, generation_defaults
from rcsd_cli.data.options import nested, opt, refuse_changed
from rcsd_cli.models import DEFAULT_MODEL


class GenRubricsConfig(ConfigModel):
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
    model: str = opt(DEFAULT_MODEL, panel="Model", help=MODEL_HELP)
    retries: int = opt(3, ge=0, panel="Generation", help="Extra attempts after an invalid LLM rubric.")
    seed: int = opt(0, panel="Data", help="Random seed (sampling, shuffles).")
    generation: GenerationConfig = nested(generation_defaults(temperature=0.7, max_new_tokens=512, top_p=0.95, top_k=20,
                                                               batch_size=8))
    backend: BackendConfig = nested(BackendConfig)

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> GenRubricsConfig:
        if self.generator == "reference":
            refuse_changed(self, ("fallback", "retries"), "with --generator reference (no model is asked)")
        return self

