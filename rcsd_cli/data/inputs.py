"""Read problems from JSONL, Parquet or CSV and normalise the common rubric layouts.

Recognised row layouts (keys are matched case-insensitively where noted):

- plain: ``{question, answer}`` (aliases: problem/prompt for the question; reference_answer/solution)
- RaR: ``{question, reference_answer, rubric: [{title, description, weight}]}``
- HealthBench: ``{prompt: [{role, content}, ...], rubrics: [{criterion, points, tags}]}``
- RubricHub variants: criteria under rubric/rubrics/criteria, text under
  description/criterion/criteria, weight under weight/points/score
- GPQA CSV: ``Question, Correct Answer, Incorrect Answer 1..3, Explanation, Record ID``;
  choices are shuffled with a seed stored in the problem's metadata
- multiple choice: ``choices`` as a list, or as ``{text: [...], label: [...]}``, with
  ``answer``/``answerKey`` as a letter, an index or the correct choice's text
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rcsd_cli.data.rows import MAX_QUESTION_CHARS, Criterion, Problem
from rcsd_cli.errors import RcsdError, describe_validation_error, where

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


@dataclass
class InputRow:
    """A normalised problem and the rubric it came with, if any."""

    problem: Problem
    rubric: list[Criterion] | None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Raw rows of a JSONL, JSON, Parquet or CSV file, with clean errors for unreadable input."""
    path = Path(path)
    if not path.exists():
        raise RcsdError(f"{path}: file not found")
    if path.is_dir():
        raise RcsdError(f"{path}: is a folder, expected a JSONL, Parquet or CSV file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise RcsdError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:80]})") from exc
    else:
        raw = path.read_bytes()
        if b"\x00" in raw[:8192]:
            raise RcsdError(f"{path}: binary file, expected UTF-8 text (JSONL or CSV)")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RcsdError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        if suffix == ".csv":
            # a file object, not lines: quoted fields keep their own newlines (GPQA questions span lines)
            rows = [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RcsdError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from exc
            rows = data if isinstance(data, list) else [data]
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RcsdError(f"{path}:line {lineno}: malformed JSON ({exc.msg})") from exc
    if not rows:
        raise RcsdError(f"{path}: no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RcsdError(f"{where(path, i)}: expected an object, got {type(r).__name__}")
    return rows


def question_key(text: str) -> str:
    """A question as items are matched across files (whitespace collapsed, lower case), as the authors match."""
    return re.sub(r"\s+", " ", text or "").strip().lower()


def _first(rec: dict[str, Any], *keys: str) -> Any:
    lower = {k.lower(): k for k in rec}
    for k in keys:
        if k in rec and rec[k] not in (None, ""):
            return rec[k]
        real = lower.get(k.lower())
        if real is not None and rec[real] not in (None, ""):
            return rec[real]
    return None


def _question_from_messages(messages: list) -> str:
    """HealthBench keeps the conversation in ``prompt``; earlier turns become context."""
    turns = [m for m in messages if isinstance(m, dict) and m.get("content")]
    if not turns:
        raise ValueError("field 'prompt' has no message with content")
    if len(turns) == 1:
        return str(turns[-1]["content"])
    history = "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in turns[:-1])
    return f"Conversation so far:\n{history}\n\n{turns[-1]['content']}"


def _criteria_from(raw: Any) -> list[Criterion]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"field 'rubric' is not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, list):
        raise ValueError(f"field 'rubric' must be a list of criteria, got {type(raw).__name__}")
    if not raw:
        raise ValueError("rubric has no criteria")
    out = []
    for j, item in enumerate(raw):
        if isinstance(item, str):
            item = {"description": item, "weight": 1}
        if not isinstance(item, dict):
            raise ValueError(f"field 'rubric.{j}': expected an object, got {type(item).__name__}")
        text = _first(item, "description", "criterion", "criteria", "text")
        title = _first(item, "title", "name")
        weight = _first(item, "weight", "points", "score")
        if text is None and title is None:
            raise ValueError(f"field 'rubric.{j}.description' is missing")
        if weight is None:
            weight = 1  # the authors' default for RubricHub criteria
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            try:
                weight = float(str(weight).strip())
            except ValueError as exc:
                raise ValueError(f"field 'rubric.{j}.weight': {weight!r} is not a number") from exc
        tags = item.get("tags") or []
        if isinstance(tags, str):
            tags = [tags]
        title = str(title) if title else f"Criterion {j + 1}"  # as the authors title RubricHub criteria
        try:
            out.append(Criterion(id=f"c{j + 1}", title=title, description=str(text or title),
                                 weight=weight, tags=[str(t) for t in tags]))
        except ValidationError as err:
            raise ValueError(describe_validation_error(err).replace("field '", f"field 'rubric.{j}.", 1)) from err
    return out


def _choices_from(rec: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    raw = _first(rec, "choices", "options")
    if raw is None:
        return None, None
    if isinstance(raw, dict) and "text" in raw:
        return [str(t) for t in raw["text"]], [str(lab) for lab in raw.get("label") or []] or None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError("field 'choices' must be a list") from exc
    if isinstance(raw, dict):
        labels = sorted(raw)
        return [str(raw[k]) for k in labels], labels
    if not isinstance(raw, list) or not raw:
        raise ValueError("field 'choices' must be a non-empty list")
    return [str(c) for c in raw], None


def _gold_letter(answer: Any, choices: list[str], labels: list[str] | None) -> str:
    letters = LETTERS[: len(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return letters[answer]
    text = str(answer).strip()
    if labels and text in labels:
        return letters[labels.index(text)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if text.isdigit() and int(text) < len(choices):
        return letters[int(text)]
    for i, c in enumerate(choices):
        if c.strip().lower() == text.lower():
            return letters[i]
    raise ValueError(f"field 'answer': {text[:40]!r} is not one of the choices")


def gpqa_problem(rec: dict[str, Any], row: int, shuffle_seed: int = 0) -> Problem:
    """GPQA's CSV layout; the correct answer's position comes from a seeded shuffle."""
    missing = [c for c in GPQA_COLUMNS if not str(rec.get(c) or "").strip()]
    if missing:
        raise ValueError(f"field '{missing[0]}' is missing")
    rid = str(rec.get("Record ID") or f"gpqa-{row}")
    options = [str(rec[c]).strip() for c in GPQA_COLUMNS[1:]]
    order = list(range(4))
    random.Random(f"{shuffle_seed}:{rid}").shuffle(order)
    choices = [options[i] for i in order]
    gold = LETTERS[order.index(0)]
    explanation = str(rec.get("Explanation") or "").strip()
    reference = f"{explanation}\n\nThe correct answer is {gold}) {options[0]}".strip()
    meta: dict[str, Any] = {"shuffle_seed": shuffle_seed}
    for k in ("High-level domain", "Subdomain"):
        if rec.get(k):
            meta[k] = str(rec[k])
    return Problem(id=rid, question=str(rec["Question"]).strip(), reference_answer=reference,
                   choices=choices, answer=gold, source="gpqa", metadata=meta)


def normalise_record(rec: dict[str, Any], row: int, default_source: str, shuffle_seed: int = 0) -> InputRow:
    """Turn one raw row of any supported layout into a Problem (+ imported rubric)."""
    if all(c in rec for c in GPQA_COLUMNS[:2]):
        return InputRow(gpqa_problem(rec, row, shuffle_seed), None)
    question = _first(rec, "question", "problem", "question_stem", "query", "instruction", "input")
    prompt = _first(rec, "prompt")
    if question is None and isinstance(prompt, list):
        question = _question_from_messages(prompt)
    elif question is None and isinstance(prompt, str):
        question = prompt
    if question is None:
        raise ValueError("field 'question' is missing")
    if not isinstance(question, str):
        raise ValueError(f"field 'question' must be text, got {type(question).__name__}")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"field 'question' is {len(question)} characters, over the {MAX_QUESTION_CHARS} limit")
    choices, labels = _choices_from(rec)
    reward_model: dict[str, Any] = rec["reward_model"] if isinstance(rec.get("reward_model"), dict) else {}
    answer = _first(rec, "answer", "answerKey", "correct_answer", "gold", "label", "final_answer")
    if answer is None:
        answer = _first(reward_model, "ground_truth")  # verl's layout
    if choices is None and isinstance(rec.get("correct_answer"), str) and rec.get("distractor1"):
        # SciQ layout: a correct answer plus distractors, without a letter.
        choices = [rec["correct_answer"]] + [rec[f"distractor{i}"] for i in (1, 2, 3) if rec.get(f"distractor{i}")]
        order = list(range(len(choices)))
        random.Random(f"{shuffle_seed}:{question}").shuffle(order)
        choices = [choices[i] for i in order]
        answer = LETTERS[order.index(0)]
    if choices is not None and answer is not None:
        answer = _gold_letter(answer, choices, labels)
    elif answer is not None:
        answer = str(answer).strip()
    reference = _first(rec, "reference_answer", "reference", "solution", "explanation", "ideal_completion")
    if reference is None and answer is not None:
        reference = f"{answer}) {choices[LETTERS.index(answer)]}" if choices else str(answer)
    rid = _first(rec, "id", "prompt_id", "uid", "Record ID", "problem_id")
    metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    raw_rubric = _first(rec, "rubric", "rubric_list", "rubrics", "criteria", "Rubrics")
    if raw_rubric is None:
        raw_rubric = _first(reward_model, "rubrics", "rubric")
    rubric = _criteria_from(raw_rubric) if raw_rubric is not None else None
    try:
        problem = Problem(id=str(rid if rid is not None else f"{default_source}-{row}"), question=question,
                          reference_answer=None if reference is None else str(reference), choices=choices,
                          answer=answer, source=str(_first(rec, "source", "data_source") or default_source),
                          metadata=metadata)
    except ValidationError as err:
        raise ValueError(describe_validation_error(err)) from err
    return InputRow(problem, rubric)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_dataset_id(data: str) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face dataset id."""
    return bool(HUB_ID.fullmatch(data)) and not Path(data).exists()


def read_hub_records(dataset_id: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset through ``datasets``; one line when the hub is unreachable."""
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, subset, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated, missing split: one clean line
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise RcsdError(f"{dataset_id}: could not load split {split!r} from the Hugging Face hub "
                        f"({type(exc).__name__}: {first})") from exc
    return [dict(r) for r in ds]


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def data_files(path: Path) -> list[Path]:
    """A file, or every data file of a folder (sorted by name), e.g. a downloaded dataset's shards."""
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise RcsdError(f"{path}: folder holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def load_problems(path: str | Path, limit: int | None = None, shuffle_seed: int = 0, *, split: str = "train",
                  subset: str | None = None, sources: set[str] | None = None, sample_size: int | None = None,
                  sample_seed: int = 0) -> list[InputRow]:
    """All rows of a problems file, a folder of them or a hub dataset id, normalised, duplicate ids rejected.

    ``sources`` keeps rows whose ``source`` is listed. ``sample_size`` samples as the authors' RubricHub
    loader does: files in an order shuffled by ``random.Random(sample_seed)``, from each the first rows up to
    an equal share of what is still missing (at least one), until ``sample_size`` rows are taken.
    """
    if isinstance(path, str) and is_hub_dataset_id(path):
        parts: list[tuple[Path, list[dict[str, Any]] | None]] = [(Path(path), read_hub_records(path, subset, split))]
    else:
        parts = [(f, None) for f in data_files(Path(path))]
    if sample_size:
        random.Random(sample_seed).shuffle(parts)
    out: list[InputRow] = []
    seen: dict[str, tuple[Path, int]] = {}
    for n, (file, records) in enumerate(parts):
        quota = None
        if sample_size:
            missing = sample_size - len(out)
            if missing <= 0:
                break
            quota = max(1, -(-missing // (len(parts) - n)))
        taken = 0
        for i, rec in enumerate(read_records(file) if records is None else records):
            try:
                item = normalise_record(rec, i, file.stem, shuffle_seed)
            except ValueError as exc:
                raise RcsdError(f"{where(file, i)}: {exc}") from exc
            if sources is not None and item.problem.source not in sources:
                continue
            pid = item.problem.id
            if pid in seen:
                first_file, first_row = seen[pid]
                first = f"row {first_row}" if first_file == file else where(first_file, first_row)
                raise RcsdError(f"{where(file, i)}: duplicate id {pid!r} (first at {first})")
            seen[pid] = (file, i)
            out.append(item)
            taken += 1
            if quota is not None and (taken >= quota or len(out) >= (sample_size or 0)):
                break
    if sources is not None and not out:
        raise RcsdError(f"{path}: no row's source is one of {', '.join(sorted(sources))}")
    return out[:limit] if limit else out
