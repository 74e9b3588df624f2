"""One home for prompt views: from a stage's config (and the samples' own settings where a stage reads
samples), the style, both sides' thinking and what the teacher sees, resolved once; and from a view, the
token ids of every role's prompt and the teacher-prompt filter. Train, diagnose, explain, score and the
dry run build their prompts here, so they cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rcsd_cli.data.rows import Rubric
from rcsd_cli.rubrics.prompts import analysis_prompt, reference_target, student_prompt, teacher_prompt, transition_ids

if TYPE_CHECKING:
    from rcsd_cli.configs.diagnose import DiagnoseConfig
    from rcsd_cli.configs.train import TrainConfig


@dataclass(frozen=True)
class PromptView:
    """How a run's prompts are built: the prompt style, each side's ``enable_thinking``, the task, and what
    the teacher sees (method's teacher, context, rubric ablation, the contrast control)."""

    style: str
    student_thinking: bool | None
    teacher_thinking: bool | None
    task: str = "reasoner"
    method: str = "rcsd"
    context: str = "rubric+reference"
    ablation: str | None = None
    contrast: str = "none"

    @classmethod
    def for_train(cls, cfg: TrainConfig) -> PromptView:
        own = cfg.teacher.thinking
        student = cfg.generation.enable_thinking
        return cls(cfg.prompt_style, student, student if own is None else own, cfg.task, cfg.method,
                   cfg.teacher.context, cfg.teacher.rubric_ablation, cfg.teacher.contrast)

    @classmethod
    def for_diagnose(cls, cfg: DiagnoseConfig) -> PromptView:
        own = cfg.teacher.thinking
        student = cfg.generation.enable_thinking
        return cls(cfg.prompt_style, student, student if own is None else own, contrast=cfg.teacher.contrast)

    @classmethod
    def for_samples(cls, style: str | None, teacher_thinking: bool | None, sample_config: dict[str, Any],
                    **teacher: Any) -> PromptView:
        """A teacher reading stored samples: their own style and thinking unless the stage sets them."""
        style = style or sample_config.get("prompt_style") or "answer-line"
        if teacher_thinking is None:
            teacher_thinking = (sample_config.get("generation") or {}).get("enable_thinking")
        return cls(style, (sample_config.get("generation") or {}).get("enable_thinking"), teacher_thinking,
                   **teacher)

    @property
    def reason_first(self) -> bool:
        """Whether the teacher writes an analysis before it reads the completion (the authors' two-turn teacher)."""
        return self.context == "reason-first" and self.task == "reasoner" and self.method in ("rcsd", "opsd")

    @property
    def distils(self) -> bool:
        return self.method in ("rcsd", "opsd")

    def _teacher(self) -> dict[str, Any]:
        return dict(style=self.style, thinking=self.teacher_thinking, method=self.method, context=self.context,
                    ablation=self.ablation)

    def student_ids(self, tok, row: Rubric) -> list[int]:
        return student_prompt(tok, row, style=self.style, thinking=self.student_thinking, task=self.task)

    def teacher_ids(self, tok, row: Rubric) -> list[int]:
        """The teacher's privileged prompt (not reason-first: that one is built from a sampled analysis)."""
        return teacher_prompt(tok, row, task=self.task, **self._teacher())

    def control_ids(self, tok, control: Rubric) -> list[int]:
        """``--teacher-contrast``: the teacher prompt under the control context (``control``: the row whose
        rubric and reference the control shows; ``reference``: the reference alone, as OPSD's teacher)."""
        view = replace(self, method="opsd") if self.contrast == "reference" else self
        return view.teacher_ids(tok, control)

    def analysis_ids(self, tok, row: Rubric) -> list[int]:
        return analysis_prompt(tok, row, **self._teacher())

    def transition_ids(self, tok, row: Rubric) -> list[int]:
        return transition_ids(tok, row, **self._teacher())

    def target_ids(self, tok, row: Rubric) -> list[int]:
        """SFT's target: the reference answer in the prompt style's format."""
        return reference_target(tok, row, style=self.style, task=self.task)

    def teacher_prompt_length(self, tok, row: Rubric) -> int:
        """Tokens of the prompt the teacher is given before any sampled text: the analysis prompt for
        reason-first (the authors' 2048-token filter measured that one), else the whole teacher prompt."""
        if self.context == "reason-first" and self.task == "reasoner":
            return len(self.analysis_ids(tok, row))
        return len(self.teacher_ids(tok, row))

    def within_teacher_prompt_limit(self, rows: list[Rubric], tok, limit: int | None) -> tuple[list[Rubric], int]:
        """The rows whose teacher prompt fits ``limit`` tokens (``--max-teacher-prompt-tokens``), and how many
        were dropped."""
        if not limit:
            return rows, 0
        kept = [r for r in rows if self.teacher_prompt_length(tok, r) <= limit]
        return kept, len(rows) - len(kept)

    def item_prompts(self, tok, row: Rubric) -> dict[str, list[int]]:
        """The token ids of an item's prompts: the student's, and the teacher's (reason-first: its analysis
        prompt and the transition after the analysis) when the method distils."""
        ids = {"student_prompt": self.student_ids(tok, row)}
        if self.reason_first:
            ids["analysis_prompt"] = self.analysis_ids(tok, row)
            ids["transition"] = self.transition_ids(tok, row)
        elif self.distils:
            ids["teacher_prompt"] = self.teacher_ids(tok, row)
        return ids


def longest_lengths(cfg: TrainConfig, every: list[dict[str, list[int]]]) -> dict[str, int]:
    """The longest prompt on each side over ``PromptView.item_prompts`` of every item (a reason-first teacher
    prompt with its analysis at ``--analysis-max-new-tokens``), and the completion limit: what sizes a run's
    memory and its engines' ``max_model_len``."""

    def teacher(ids: dict) -> int:
        if "analysis_prompt" in ids:
            return len(ids["analysis_prompt"]) + cfg.reason_first.max_new_tokens + len(ids["transition"])
        return len(ids.get("teacher_prompt", ids["student_prompt"]))

    return {"student_prompt": max(len(ids["student_prompt"]) for ids in every),
            "teacher_prompt": max(map(teacher, every)), "completion": cfg.generation.max_new_tokens}
