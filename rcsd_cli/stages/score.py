"""``rcsd score``: per-criterion verdicts, weighted rubric score and correctness per sample."""

from __future__ import annotations

from pathlib import Path

from rcsd_cli.backends import open_backend
from rcsd_cli.configs.score import ScoreConfig
from rcsd_cli.data.artifacts import ensure_writable, read_artifact, write_artifact
from rcsd_cli.data.options import with_options
from rcsd_cli.data.rows import Score
from rcsd_cli.data.samples import read_samples
from rcsd_cli.errors import RcsdError, where
from rcsd_cli.evaluation.judging import judge_and_score
from rcsd_cli.evaluation.stats import mean_interval
from rcsd_cli.models import DEFAULT_MODEL
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.ui import info, progress


def add_teacher_logprobs(scores: list[Score], samples, by_id: dict, cfg: ScoreConfig, model_name: str,
                         trust_remote_code: bool, view: PromptView) -> list[Score]:
    """Attach the teacher's top-k log-probs over each sample's own completion ids."""
    engine = open_backend(cfg.backend, model_name, trust_remote_code)
    if not hasattr(engine, "topk_logprobs"):
        raise RcsdError(f"--teacher-logprobs needs a backend that scores given tokens (hf, vllm or openai), not "
                       f"{engine.name}")
    tok = engine.tokenizer
    prompts = [view.teacher_ids(tok, by_id[s.problem_id]) for s in samples]
    ids, lps = [], []
    with progress("teacher log-probs", len(samples)) as advance:
        for j in range(0, len(samples), 8):
            part = samples[j: j + 8]
            completions = [s.completion_token_ids for s in part]
            i, lp = engine.topk_logprobs(prompts[j: j + 8], completions, cfg.teacher.top_k)
            ids += i
            lps += lp
            advance(len(part))
    return [sc.model_copy(update={"teacher_topk_ids": i, "teacher_topk_logprobs": lp})
            for sc, i, lp in zip(scores, ids, lps, strict=True)]


def run_score(cfg: ScoreConfig, output: Path, *, overwrite: bool = False,
              trust_remote_code: bool = False) -> list[Score]:
    """Verdicts per criterion, weighted score and correctness; optionally the teacher's top-k log-probs."""
    ensure_writable(output, overwrite)
    samples_path, rubrics_path = cfg.samples, cfg.rubrics
    samples, samples_meta = read_samples(samples_path)
    sample_cfg = samples_meta.get("config") or {}
    if cfg.teacher.logprobs and not cfg.teacher.model:
        cfg = with_options(cfg, teacher_model=samples_meta.get("model") or DEFAULT_MODEL)
    rubrics, _ = read_artifact(rubrics_path, "rubrics")
    by_id = {r.id: r for r in rubrics}
    items = []
    for i, s in enumerate(samples):
        if s.problem_id not in by_id:
            raise RcsdError(f"{where(samples_path, i)}: problem_id {s.problem_id!r} is not in {rubrics_path}")
        r = by_id[s.problem_id]
        items.append((s.id, r, r.rubric, s.completion))
    scores = judge_and_score(items, cfg.judge_model, cfg.generation, cfg.judge_retries, cfg.seed, trust_remote_code,
                             cfg.backend, resume=(output, cfg, overwrite))
    if cfg.teacher.logprobs:
        # The teacher prompt follows the samples' own style and thinking unless told otherwise.
        view = PromptView.for_samples(cfg.prompt_style, cfg.teacher.thinking, sample_cfg, method=cfg.teacher.method,
                                      context=cfg.teacher.context)
        assert cfg.teacher.model is not None  # set above from the samples' model when not given
        scores = add_teacher_logprobs(scores, samples, by_id, cfg, cfg.teacher.model, trust_remote_code, view)
    write_artifact(output, "scores", scores, stage="score", config=cfg, model_id=cfg.judge_model,
                   inputs=[samples_path, rubrics_path], overwrite=overwrite)
    vals = [s.score for s in scores if s.score is not None]
    mean, lo, hi = mean_interval(vals)
    unjudged = sum(s.n_unjudged for s in scores)
    info(f"wrote {len(scores)} scores to {output}: mean rubric score {mean:.3f} [{lo:.3f}, {hi:.3f}]"
         + (f", {unjudged} criteria unjudged" if unjudged else ""))
    return scores
