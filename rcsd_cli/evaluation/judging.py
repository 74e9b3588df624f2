"""Scoring with the judge model: open its backend, keep its replies for a resume, show progress. The scoring
rules themselves are ``scoring.py``'s (imported by verl workers, so kept free of backends and the console)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from rcsd_cli.backends import open_backend
from rcsd_cli.backends.resume import ResumableGenerator
from rcsd_cli.configs.groups import BackendConfig, GenerationConfig
from rcsd_cli.data.rows import Criterion, Problem, Score
from rcsd_cli.evaluation.scoring import score_with_judge
from rcsd_cli.ui import progress


def judge_and_score(items: list[tuple[str, Problem, list[Criterion], str]], judge_model: str | None,
                    generation: GenerationConfig, retries: int = 2, seed: int = 0,
                    trust_remote_code: bool = False, backend: BackendConfig | None = None,
                    resume: tuple[Path, BaseModel, bool] | None = None) -> list[Score]:
    """Score (sample id, problem, rubric, completion) tuples; criteria without checks go to the judge.

    ``resume`` = (output, config, fresh): judge replies are kept in ``output.judge.partial.jsonl``.
    """
    judge, runner = None, None
    if judge_model and any(cr.check is None for _, _, rubric, _ in items for cr in rubric):
        judge = open_backend(backend or BackendConfig(), judge_model, trust_remote_code)
        if resume is not None:
            out, cfg, fresh = resume
            runner = ResumableGenerator(judge, Path(str(out) + ".judge"), cfg, fresh)
    n = sum(cr.check is None for _, _, rubric, _ in items for cr in rubric) if judge else 0
    with progress("judge", n, enabled=judge is not None) as advance:
        scores = score_with_judge(judge, items, generation, retries, seed, on_done=advance, runner=runner)
    if runner is not None:
        runner.finish()
    return scores
