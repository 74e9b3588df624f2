"""``rcsd diagnose``'s settings.
"""

from __future__ import annotations

from pydantic import field_validator, model_validator

from rcsd_cli.configs.groups import (
    MODEL_HELP,
    PROMPT_STYLE_HELP,
    BackendConfig,
    ConfigModel,
    ContrastTeacherConfig,
    GenerationConfig,
    LossConfig,
    PromptStyle,
    generation_defaults,
)
from rcsd_cli.data.options import nested, opt, refuse_changed
from rcsd_cli.models import DEFAULT_MODEL


class DiagnoseConfig(ConfigModel):
    """Settings of ``rcsd diagnose``: does the privileged teacher carry signal, before any training?"""

    rubrics: str = opt(panel="Data", argument=True, help="rubrics.parquet (the items train would use).")
    limit: int = opt(32, ge=2, panel="Data", help="Items to diagnose (a seeded sample).")
    max_teacher_prompt_tokens: int | None = opt(
        None, ge=1, panel="Data", help="As train's: drop items whose rubric teacher prompt is longer than N tokens "
        "before the sample is drawn.")
    seed: int = opt(0, panel="Data", help="Random seed (item sample, sampling, shuffled rubrics).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=PROMPT_STYLE_HELP)
    model: str = opt(DEFAULT_MODEL, panel="Model", help=MODEL_HELP)
    conditions: str = opt("rubric,reference,shuffled,none", panel="Teacher",
                          help="Teacher contexts to compare, comma-separated: rubric (as train: rubric and "
                          "reference), reference (OPSD's), shuffled (another item's rubric and its own reference), "
                          "none (the student's own prompt: the zero point), contrast (train's --teacher-contrast "
                          "teacher: the rubric teacher minus the control named by --teacher-contrast).")
    teacher: ContrastTeacherConfig = nested(ContrastTeacherConfig, hide=("context",))
    loss: LossConfig = nested(LossConfig, help="The loss train would apply (same options as train).")
    generation: GenerationConfig = nested(
        generation_defaults(max_new_tokens=128, temperature=1.2, top_p=0.95, top_k=20),
        flags={"enable_thinking": "--student-thinking"})
    backend: BackendConfig = nested(BackendConfig, help="What generates the student's rollouts and the teachers' "
                                    "answers (the log-probs always come from the model in-process; the contrast "
                                    "teacher's answers too, as no server decodes two prompts as one).")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> DiagnoseConfig:
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

