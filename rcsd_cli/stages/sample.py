"""``rcsd sample``: K completions per problem from the student prompt, kept as token ids."""

from __future__ import annotations

from pathlib import Path

from rcsd_cli.backends import open_backend
from rcsd_cli.backends.resume import fingerprint
from rcsd_cli.configs.sample import SampleConfig
from rcsd_cli.data.artifacts import PartialLog, ensure_writable, read_artifact, read_metadata, write_artifact
from rcsd_cli.data.inputs import load_problems
from rcsd_cli.data.rows import Problem, Sample
from rcsd_cli.modeling.generation import item_seed
from rcsd_cli.rubrics.prompts import student_prompt
from rcsd_cli.ui import info, progress


def load_rubric_or_problems(path: str | Path) -> list[Problem]:
    """Rubric rows from an rcsd rubrics file; plain problem files are accepted too."""
    if str(path).endswith(".parquet") and read_metadata(path) is not None:
        rows, _ = read_artifact(path, "rubrics")
        return rows
    return [r.problem for r in load_problems(path)]


def run_sample(cfg: SampleConfig, output: Path, *, overwrite: bool = False,
               trust_remote_code: bool = False) -> list[Sample]:
    """K completions per problem from the student prompt; finished batches survive interruption."""
    ensure_writable(output, overwrite)
    rubrics, model, n, limit, seed, generation = cfg.rubrics, cfg.model, cfg.n, cfg.limit, cfg.seed, cfg.generation
    problems = load_rubric_or_problems(rubrics)[:limit] if limit else load_rubric_or_problems(rubrics)
    # Where and how fast requests go does not change results: a rerun against another server resumes.
    partial = PartialLog(output, Sample, fingerprint(cfg), fresh=overwrite)
    done = {s.id: s for s in partial.load()}
    jobs = [(p, k) for p in problems for k in range(n) if f"{p.id}:{k}" not in done]
    if done:
        info(f"resuming: {len(done)} samples already in {partial.path}")
    if jobs:
        engine = open_backend(cfg.backend, model, trust_remote_code)
        tok = engine.tokenizer
        prompts = [student_prompt(tok, p, style=cfg.prompt_style, thinking=generation.enable_thinking) for p, _ in jobs]
        with progress("sample", len(jobs)) as advance:
            def keep(indices, gens):
                rows = [Sample(id=f"{jobs[i][0].id}:{jobs[i][1]}", problem_id=jobs[i][0].id, sample_index=jobs[i][1],
                               prompt_token_ids=prompts[i], completion_token_ids=g.token_ids, completion=g.text,
                               finish_reason=g.finish_reason, backend=engine.name)
                        for i, g in zip(indices, gens, strict=True)]
                partial.append(rows)
                done.update({r.id: r for r in rows})
                advance(len(rows))

            gens = engine.generate(prompts, generation, seed, on_done=keep,
                                   seeds=[item_seed(seed, p.id, k) for p, k in jobs])
        for (p, k), prompt, g in zip(jobs, prompts, gens, strict=True):
            if g.error:  # recorded in the artifact, never in the partial log: a rerun asks again
                done[f"{p.id}:{k}"] = Sample(id=f"{p.id}:{k}", problem_id=p.id, sample_index=k,
                                             prompt_token_ids=prompt, completion_token_ids=[], completion="",
                                             finish_reason="error", backend=engine.name, error=g.error)
    samples = [done[f"{p.id}:{k}"] for p in problems for k in range(n)]
    write_artifact(output, "samples", samples, stage="sample", config=cfg, model_id=model, inputs=[rubrics],
                   overwrite=overwrite)
    partial.finish()
    tokens = sum(len(s.completion_token_ids) for s in samples)
    failed = sum(s.error is not None for s in samples)
    info(f"wrote {len(samples)} samples ({tokens} completion tokens) to {output}"
         + (f"; {failed} failed (error column), later stages skip them" if failed else ""))
    return samples

