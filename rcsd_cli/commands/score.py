"""``rcsd score``: per-criterion verdicts, weighted rubric score and correctness per sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rcsd_cli.artifacts import ensure_writable, read_artifact, write_artifact
from rcsd_cli.commands import common as c
from rcsd_cli.errors import RcsdError, where
from rcsd_cli.schemas import BackendConfig, Criterion, GenerationConfig, Problem, Score, ScoreConfig
from rcsd_cli.scoring import JudgeRequest, run_judge, score_completion
from rcsd_cli.stats import mean_interval
from rcsd_cli.ui import info, progress


def judge_and_score(items: list[tuple[str, Problem, list[Criterion], str]], judge_model: str | None,
                    generation: GenerationConfig, retries: int = 2, seed: int = 0,
                    trust_remote_code: bool = False, backend: BackendConfig | None = None,
                    resume: tuple[Path, object, bool] | None = None) -> list[Score]:
    """Score (sample id, problem, rubric, completion) tuples; criteria without checks go to the judge.

    ``resume`` = (output, config, fresh): judge replies are kept in ``output.judge.partial.jsonl``.
    """
    requests = [JudgeRequest((sid, cr.id), prob, text, cr) for sid, prob, rubric, text in items
                for cr in rubric if cr.check is None]
    verdicts: dict = {}
    if requests and judge_model:
        from rcsd_cli.backends import open_backend
        from rcsd_cli.resume import ResumableGenerator

        judge = open_backend(backend or BackendConfig(), judge_model, trust_remote_code)
        runner = None
        if resume is not None:
            out, cfg, fresh = resume
            runner = ResumableGenerator(judge, Path(str(out) + ".judge"), cfg, fresh)
        with progress("judge", len(requests)) as advance:
            verdicts = run_judge(judge, requests, generation, retries, seed, on_done=advance, runner=runner)
        if runner is not None:
            runner.finish()
    per_sample: dict[str, dict] = {}
    for (sid, cid), v in verdicts.items():
        per_sample.setdefault(sid, {})[cid] = v
    return [score_completion(sid, prob, rubric, text, per_sample.get(sid)) for sid, prob, rubric, text in items]


def add_teacher_logprobs(scores: list[Score], samples, by_id: dict, cfg: ScoreConfig, model_name: str,
                         trust_remote_code: bool, enable_thinking: bool | None = None) -> list[Score]:
    """Attach the teacher's top-k log-probs over each sample's own completion ids."""
    from types import SimpleNamespace

    from rcsd_cli.backends import open_backend
    from rcsd_cli.objectives import teacher_prompt, teacher_topk

    if cfg.backend.kind == "openai":
        raise RcsdError("--teacher-logprobs needs the hf or vllm backend (prompt log-probs of given tokens)")
    engine = open_backend(cfg.backend, model_name, trust_remote_code)
    loaded = SimpleNamespace(tokenizer=engine.tokenizer, model=getattr(engine, "model", None))
    view = SimpleNamespace(task="reasoner", method=cfg.teacher_method, teacher_context=cfg.teacher_context,
                           generation=SimpleNamespace(enable_thinking=enable_thinking))
    prompts = [teacher_prompt(loaded.tokenizer, by_id[s.problem_id], view) for s in samples]
    ids, lps = [], []
    with progress("teacher log-probs", len(samples)) as advance:
        for j in range(0, len(samples), 8):
            part = samples[j: j + 8]
            completions = [s.completion_token_ids for s in part]
            if cfg.backend.kind == "vllm":
                i, lp = engine.teacher_topk(prompts[j: j + 8], completions, cfg.teacher_top_k)
            else:
                i, lp = teacher_topk(loaded.model, loaded.tokenizer, prompts[j: j + 8], completions, cfg.teacher_top_k)
            ids += i
            lps += lp
            advance(len(part))
    return [sc.model_copy(update={"teacher_topk_ids": i, "teacher_topk_logprobs": lp})
            for sc, i, lp in zip(scores, ids, lps)]


def run_score(samples_path: Path, rubrics_path: Path, output: Path, *, judge_model: str | None = None,
              judge_retries: int = 2, seed: int = 0, generation: GenerationConfig | None = None,
              teacher_logprobs: bool = False, teacher_model: str | None = None, teacher_top_k: int = 20,
              teacher_method: str = "rcsd", teacher_context: str = "rubric+reference",
              backend: BackendConfig | None = None, overwrite: bool = False,
              trust_remote_code: bool = False) -> list[Score]:
    ensure_writable(output, overwrite)
    generation = generation or GenerationConfig(temperature=0.0, max_new_tokens=192)
    samples, samples_meta = read_artifact(samples_path, "samples")
    if teacher_logprobs:
        teacher_model = teacher_model or samples_meta.get("model") or c.DEFAULT
    cfg = ScoreConfig(samples=str(samples_path), rubrics=str(rubrics_path), judge_model=judge_model,
                      judge_retries=judge_retries, seed=seed, generation=generation,
                      teacher_logprobs=teacher_logprobs, teacher_model=teacher_model, teacher_top_k=teacher_top_k,
                      teacher_method=teacher_method, teacher_context=teacher_context,
                      backend=backend or BackendConfig())
    rubrics, _ = read_artifact(rubrics_path, "rubrics")
    by_id = {r.id: r for r in rubrics}
    items = []
    for i, s in enumerate(samples):
        if s.problem_id not in by_id:
            raise RcsdError(f"{where(samples_path, i)}: problem_id {s.problem_id!r} is not in {rubrics_path}")
        r = by_id[s.problem_id]
        items.append((s.id, r, r.rubric, s.completion))
    scores = judge_and_score(items, judge_model, generation, judge_retries, seed, trust_remote_code, cfg.backend,
                             resume=(output, cfg, overwrite))
    if teacher_logprobs:
        thinking = samples_meta.get("config", {}).get("generation", {}).get("enable_thinking")
        scores = add_teacher_logprobs(scores, samples, by_id, cfg, teacher_model, trust_remote_code, thinking)
    write_artifact(output, "scores", scores, stage="score", config=cfg, model_id=judge_model,
                   inputs=[samples_path, rubrics_path], overwrite=overwrite)
    vals = [s.score for s in scores if s.score is not None]
    mean, lo, hi = mean_interval(vals)
    unjudged = sum(s.n_unjudged for s in scores)
    info(f"wrote {len(scores)} scores to {output}: mean rubric score {mean:.3f} [{lo:.3f}, {hi:.3f}]"
         + (f", {unjudged} criteria unjudged" if unjudged else ""))
    return scores


@c.with_backend_options
def command(
    samples: Annotated[Path, typer.Argument(help="samples.parquet from rcsd sample.")],
    rubrics: Annotated[Path, typer.Option("--rubrics", help="rubrics.parquet the samples were drawn from.")],
    output: c.Output = Path("scores.parquet"),
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="LLM judge for criteria "
                                                       "without a machine check (unset: they stay unjudged).")] = None,
    judge_retries: Annotated[int, typer.Option("--judge-retries", min=0)] = 2,
    teacher_logprobs: Annotated[bool, typer.Option("--teacher-logprobs", help="Store the teacher's top-k "
                                                   "log-probs per completion token (for train --samples).")] = False,
    teacher_model: Annotated[Optional[str], typer.Option("--teacher-model", help="Default: the samples' model.")]
    = None,
    teacher_top_k: Annotated[int, typer.Option("--teacher-top-k", min=1)] = 20,
    teacher_method: Annotated[str, typer.Option("--teacher-method", help="rcsd or opsd teacher context.")] = "rcsd",
    teacher_context: Annotated[str, typer.Option("--teacher-context", help="rubric or rubric+reference.")]
    = "rubric+reference",
    seed: c.Seed = 0,
    max_new_tokens: c.MaxNewTokens = 192,
    batch_size: c.BatchSize = 16,
    backend: BackendConfig | None = None,  # built from the Backend flags by with_backend_options
    overwrite: c.Overwrite = False,
    trust_remote_code: c.TrustRemoteCode = False,
):
    """Score samples against their rubrics: checks in code, other criteria by an LLM judge, never guessed."""
    c.check_choice("--teacher-method", teacher_method, ("rcsd", "opsd"))
    c.check_choice("--teacher-context", teacher_context, ("rubric", "rubric+reference"))
    run_score(samples, rubrics, output, judge_model=judge_model, judge_retries=judge_retries, seed=seed,
              generation=c.gen_config(max_new_tokens, 0.0, 1.0, 0, batch_size), teacher_logprobs=teacher_logprobs,
              teacher_model=teacher_model, teacher_top_k=teacher_top_k, teacher_method=teacher_method,
              teacher_context=teacher_context, overwrite=overwrite, trust_remote_code=trust_remote_code,
              backend=backend)
