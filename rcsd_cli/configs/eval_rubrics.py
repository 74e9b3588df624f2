"""``rcsd eval-rubrics``'s settings.
"""

from __future__ import annotations

from rcsd_cli.configs.groups import BackendConfig, ConfigModel, GenerationConfig, generation_defaults
from rcsd_cli.data.options import nested, opt


class EvalRubricsConfig(ConfigModel):
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
    generation: GenerationConfig = nested(generation_defaults(temperature=0.0, max_new_tokens=1024))
    backend: BackendConfig = nested(BackendConfig)

