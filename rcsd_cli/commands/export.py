"""``rcsd export --format verl``: rubrics as a verl RL dataset.

verl's layout: ``data_source`` (str), ``prompt`` (chat messages), ``ability`` (str),
``reward_model`` ({``style``, ``ground_truth``}) and ``extra_info`` (dict). ``ground_truth`` is a
JSON string holding the rubric, gold answer and choices, which ``rcsd_cli.verl_reward.compute_score``
grades against; ``extra_info`` also carries the rubric and the teacher context (the privileged
prompt RCSD's teacher sees) for users who distil inside verl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from rcsd_cli.data.artifacts import build_metadata, ensure_writable, read_artifact
from rcsd_cli.errors import RcsdError
from rcsd_cli.rubrics.prompts import student_message, teacher_message


def verl_rows(rubrics) -> list[dict]:
    rows = []
    for i, r in enumerate(rubrics):
        rubric = [c.model_dump(mode="json") for c in r.rubric]
        ground_truth = {"id": r.id, "question": r.question, "answer": r.answer, "choices": r.choices, "rubric": rubric}
        rows.append({
            "data_source": f"rcsd/{r.source or 'custom'}",
            "prompt": [{"role": "user", "content": student_message(r)}],
            "ability": "science",
            "reward_model": {"style": "rule", "ground_truth": json.dumps(ground_truth)},
            "extra_info": {"index": i, "id": r.id, "split": "train", "rubric": json.dumps(rubric),
                           "reference_answer": r.reference_answer or "",
                           "teacher_prompt": teacher_message(r, r.rubric, True)},
        })
    return rows


def run_export(rubrics: Path, output: Path, fmt: str = "verl", overwrite: bool = False) -> Path:
    if fmt != "verl":
        raise RcsdError(f"--format: {fmt!r} is not supported (supported: verl)")
    ensure_writable(output, overwrite)
    rows, _ = read_artifact(rubrics, "rubrics")
    table = pa.Table.from_pylist(verl_rows(rows))
    meta = build_metadata("verl", "export", {"format": fmt, "rubrics": str(rubrics)}, None, [rubrics])
    table = table.replace_schema_metadata({b"rcsd": json.dumps(meta).encode()})
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, output)
    return output


def command(
    rubrics: Annotated[Path, typer.Argument(help="rubrics.parquet to export.")],
    output: Annotated[Path, typer.Option("-o", "--output")] = Path("verl.parquet"),
    fmt: Annotated[str, typer.Option("--format", help="Target layout: verl.")] = "verl",
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
):
    """Write rubrics in verl's RL data layout; grade with rcsd_cli.verl_reward.compute_score."""
    run_export(rubrics, output, fmt, overwrite)
