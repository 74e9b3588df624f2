"""``rcsd inspect``: schema, provenance metadata and the first rows of any Parquet file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq
import typer
from rich.table import Table

from rcsd_cli.data.artifacts import read_metadata
from rcsd_cli.ui import results as console


def _short(value, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def command(
    path: Annotated[Path, typer.Argument(help="A Parquet file written by rcsd (or any Parquet file).")],
    rows: Annotated[int, typer.Option("--rows", min=0, help="How many rows to show.")] = 5,
):
    """Print a Parquet file's schema, its rcsd provenance and its first rows."""
    meta = read_metadata(path)
    pf = pq.ParquetFile(path)
    console.print(f"[bold]{path}[/bold]: {pf.metadata.num_rows} rows, {pf.metadata.num_columns} columns")
    if meta:
        console.print_json(json.dumps({k: v for k, v in meta.items()}, default=str))
    else:
        console.print("[yellow]no rcsd metadata: not written by rcsd[/yellow]")
    schema = Table(title="schema")
    schema.add_column("column")
    schema.add_column("type")
    for field in pf.schema_arrow:
        schema.add_row(field.name, _short(str(field.type), 90))
    console.print(schema)
    if rows:
        table = pf.read_row_group(0).slice(0, rows).to_pylist() if pf.num_row_groups else []
        view = Table(title=f"first {len(table)} rows")
        cols = [f.name for f in pf.schema_arrow][:8]
        for col in cols:
            view.add_column(col, overflow="fold")
        for rec in table:
            view.add_row(*[_short(rec.get(col), 40) for col in cols])
        console.print(view)
