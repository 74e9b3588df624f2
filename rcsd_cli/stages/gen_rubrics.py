"""``rcsd gen-rubrics``: import, build or generate one rubric per problem."""

from __future__ import annotations

from pathlib import Path

from rcsd_cli.backends import open_backend
from rcsd_cli.backends.resume import ResumableGenerator
from rcsd_cli.configs.gen_rubrics import GenRubricsConfig
from rcsd_cli.data.artifacts import ensure_writable, write_artifact
from rcsd_cli.data.inputs import InputRow, load_problems
from rcsd_cli.data.rows import RejectedRubric, Rubric
from rcsd_cli.errors import RcsdError
from rcsd_cli.evaluation.benchmarks import BENCHMARKS, select
from rcsd_cli.models import load_tokenizer
from rcsd_cli.rubrics.prompts import chat_prompt_ids, rubric_designer_message
from rcsd_cli.rubrics.rubric_gen import RCSD_SCHEMA_REFUSED, InvalidRubric, parse_rubric_output, reference_rubric
from rcsd_cli.ui import info, progress


def load_sources(cfg: GenRubricsConfig) -> list[InputRow]:
    """A problems file or folder, a bundled benchmark by name (seeded shuffle, then offset/limit), or a hub id."""
    data, limit, offset = cfg.data, cfg.limit, cfg.offset
    if not Path(data).exists() and data in BENCHMARKS and BENCHMARKS[data].bundled:
        problems = select(BENCHMARKS[data].load(None, cfg.seed), cfg.seed, offset, limit)
        return [InputRow(p, None) for p in problems]
    sources = {s.strip() for s in cfg.source_filter.split(",") if s.strip()} if cfg.source_filter else None
    rows = load_problems(data, split=cfg.split, subset=cfg.subset, sources=sources, sample_size=cfg.sample_size,
                         sample_seed=cfg.seed)
    return rows[offset:][:limit] if limit else rows[offset:]


def designer_prompt(tok, problem, cfg: GenRubricsConfig) -> list[int]:
    """The token ids the rubric designer model is given for ``problem``."""
    return chat_prompt_ids(tok, rubric_designer_message(problem, cfg.prompt_style), cfg.generation.enable_thinking)


def dry_run(cfg: GenRubricsConfig, trust_remote_code: bool = False) -> dict:
    """The resolved config and the first problem's designer prompt, decoded from the ids the model would get;
    nothing is loaded but the tokenizer, nothing is written."""
    rows = load_sources(cfg)
    shown: dict = {"config": cfg.model_dump(mode="json")}
    todo = [r for r in rows if cfg.regenerate or not r.rubric]
    if not todo or cfg.generator == "reference":
        shown["note"] = (f"no designer prompt: {len(rows) - len(todo)} of {len(rows)} rows carry a rubric"
                         if cfg.generator != "reference" else "--generator reference asks no model")
        return shown
    tok = load_tokenizer(cfg.backend.tokenizer or cfg.model, trust_remote_code)
    shown["item"] = todo[0].problem.id
    shown["designer_prompt"] = tok.decode(designer_prompt(tok, todo[0].problem, cfg))
    return shown


def _llm_rubrics(todo: list[InputRow], cfg: GenRubricsConfig, trust_remote_code: bool, runner_args: tuple):
    engine = open_backend(cfg.backend, cfg.model, trust_remote_code)
    runner = ResumableGenerator(engine, *runner_args)
    accepted: dict[str, Rubric] = {}
    rejected: list[RejectedRubric] = []
    pending = todo
    with progress("gen-rubrics (llm)", len(todo)) as advance:
        for attempt in range(cfg.retries + 1):
            if not pending:
                break
            prompts = [designer_prompt(engine.tokenizer, r.problem, cfg) for r in pending]
            keys = [f"{r.problem.id}:{attempt}" for r in pending]
            outs = runner.generate(keys, prompts, cfg.generation, cfg.seed + 104_729 * attempt)
            retry = []
            for row, out in zip(pending, outs, strict=True):
                if out.error:  # the client already retried it: recorded, not asked again
                    rejected.append(RejectedRubric(problem_id=row.problem.id, attempt=attempt, raw_output="",
                                                   reason=f"request failed: {out.error}"))
                    advance(1)
                    continue
                try:
                    crit = parse_rubric_output(out.text, cfg.prompt_style)
                    accepted[row.problem.id] = Rubric(**row.problem.model_dump(), rubric=crit, rubric_origin="llm")
                    advance(1)
                except InvalidRubric as exc:
                    rejected.append(RejectedRubric(problem_id=row.problem.id, attempt=attempt, reason=str(exc),
                                                   raw_output=out.text))
                    retry.append(row)
            pending = retry
        advance(len(pending))
    return accepted, rejected, runner


def run_gen_rubrics(cfg: GenRubricsConfig, output: Path, *, overwrite: bool = False,
                    trust_remote_code: bool = False) -> tuple[int, int]:
    """Write ``output`` (rubrics) and, if any were dropped, ``<output stem>.rejected.parquet``."""
    ensure_writable(output, overwrite)
    data, generator, model, regenerate = cfg.data, cfg.generator, cfg.model, cfg.regenerate
    rows = load_sources(cfg)
    out: dict[str, Rubric] = {}
    rejected: list[RejectedRubric] = []
    todo = []
    for row in rows:
        if row.rubric and not regenerate:
            out[row.problem.id] = Rubric(**row.problem.model_dump(), rubric=row.rubric, rubric_origin="imported")
        else:
            todo.append(row)
    kind = "llm" if generator == "auto" else generator
    if todo and kind == "reference":
        for row in todo:
            crit = reference_rubric(row.problem)
            if crit is None:
                rejected.append(RejectedRubric(problem_id=row.problem.id, attempt=0, raw_output="",
                                               reason="no gold answer to build a reference rubric from"))
            else:
                out[row.problem.id] = Rubric(**row.problem.model_dump(), rubric=crit, rubric_origin="reference")
    runner = None
    fallen_back = 0
    if todo and kind == "llm":
        accepted, rejected, runner = _llm_rubrics(todo, cfg, trust_remote_code, (output, cfg, overwrite))
        out.update(accepted)
        if cfg.fallback == "reference":  # items no reply made valid: the check-based rubric from the gold answer
            for row in todo:
                if row.problem.id not in out and (crit := reference_rubric(row.problem)) is not None:
                    out[row.problem.id] = Rubric(**row.problem.model_dump(), rubric=crit, rubric_origin="reference")
                    fallen_back += 1
    ordered = [out[r.problem.id] for r in rows if r.problem.id in out]
    rejected_path = output.with_name(output.name.removesuffix(".parquet") + ".rejected.parquet")
    inputs = [data] if Path(data).exists() else []
    if rejected:
        write_artifact(rejected_path, "rejected-rubrics", rejected, stage="gen-rubrics", config=cfg,
                       model_id=model if kind == "llm" else None, inputs=inputs, overwrite=True)
    if not ordered:
        if runner is not None:
            runner.finish()  # every attempt is recorded in the rejected file
        way_out = ("; --generator reference builds check-only rubrics from gold answers, or use a model that "
                   "can write rubrics: a larger --model, or --backend openai with a served one" if kind == "llm"
                   else "")
        raise RcsdError(f"{data}: no valid rubric for any of {len(rows)} problems"
                        + (f" (reasons in {rejected_path})" if rejected else "") + way_out)
    write_artifact(output, "rubrics", ordered, stage="gen-rubrics", config=cfg,
                   model_id=model if todo and kind == "llm" else None, inputs=inputs, overwrite=overwrite)
    if runner is not None:
        runner.finish()
    if fallen_back:
        info(f"--fallback reference: {fallen_back} of {len(todo)} problems got the reference rubric "
             "(rubric_origin 'reference') after every LLM attempt failed")
    dropped = len({r.problem_id for r in rejected} - set(out))
    refused = sum(r.reason.startswith(RCSD_SCHEMA_REFUSED) for r in rejected)
    info(f"wrote {len(ordered)} rubrics to {output}" + (f"; {dropped} problems dropped, "
                                                       f"{len(rejected)} rejected outputs in {rejected_path}"
                                                       if rejected else "")
         + (f" ({refused} of them valid by the authors' rule but refused by rcsd's schema)" if refused else ""))
    return len(ordered), len(rejected)

