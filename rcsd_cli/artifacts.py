"""The one Parquet module every stage uses.

Rows are validated against their Pydantic model on write and on read. Each file carries
key-value metadata under the key ``rcsd``: tool version, kind of rows, stage, full config,
model id, SHA-256 of every input file and the time, so a file explains where it came from.
Writes are atomic (temporary file, then rename) and never replace an existing output unless
asked to. Long stages append finished rows to ``OUTPUT.partial.jsonl`` so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from rcsd_cli import __version__
from rcsd_cli.errors import RcsdError, describe_validation_error, where
from rcsd_cli.schemas import ROW_MODELS

META_KEY = b"rcsd"
M = TypeVar("M", bound=BaseModel)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_writable(path: str | Path, overwrite: bool) -> Path:
    """Fail early, before any expensive work, if ``path`` exists and may not be replaced."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RcsdError(f"{path}: output already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise RcsdError(f"{path}: output folder {path.parent} does not exist")
    return path


def _dict_fields(model: type[BaseModel]) -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if ann is dict or typing.get_origin(ann) is dict:
            out.add(name)
    return out


def _to_record(row: BaseModel, dict_fields: set[str]) -> dict[str, Any]:
    rec = row.model_dump(mode="json")
    for name in dict_fields:
        rec[name] = json.dumps(rec[name], sort_keys=True)
    return rec


def build_metadata(kind: str, stage: str, config: BaseModel | dict | None, model_id: str | None,
                   inputs: Iterable[str | Path] = (), extra: dict | None = None) -> dict[str, Any]:
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else (config or {})
    hashes = {}
    for p in inputs:
        p = Path(p)
        hashes[str(p)] = sha256_file(p) if p.is_file() else None
    return {
        "rcsd_version": __version__,
        "kind": kind,
        "stage": stage,
        "config": cfg,
        "model": model_id,
        "inputs": hashes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_artifact(path: str | Path, kind: str, rows: list[BaseModel], *, stage: str,
                   config: BaseModel | dict | None = None, model_id: str | None = None,
                   inputs: Iterable[str | Path] = (), overwrite: bool = False, extra: dict | None = None) -> Path:
    """Validate ``rows`` as ``kind`` and write them atomically with provenance metadata."""
    model = ROW_MODELS[kind]
    path = ensure_writable(path, overwrite)
    dict_fields = _dict_fields(model)
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, model):
            try:
                row = model.model_validate(row)
            except ValidationError as err:
                raise RcsdError(f"{where(path, i)}: cannot write {kind} row: {describe_validation_error(err)}")
        records.append(_to_record(row, dict_fields))
    table = pa.Table.from_pylist(records) if records else pa.table({})
    meta = build_metadata(kind, stage, config, model_id, inputs, extra)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``rcsd`` provenance block of a Parquet file, or None for foreign Parquet files."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise RcsdError(f"{path}: file not found")
    except (pa.ArrowInvalid, OSError) as exc:
        raise RcsdError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:80]})")
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else None


def read_artifact(path: str | Path, kind: str, model: type[M] | None = None) -> tuple[list[M], dict]:
    """Read and validate an rcsd Parquet file that must hold ``kind`` rows."""
    path = Path(path)
    meta = read_metadata(path)
    if meta is None:
        raise RcsdError(f"{path}: not an rcsd artifact (no rcsd metadata); expected a {kind} file")
    if meta.get("kind") != kind:
        raise RcsdError(f"{path}: holds {meta.get('kind')} rows, expected a {kind} file")
    model = model or ROW_MODELS[kind]
    dict_fields = _dict_fields(model)
    rows = []
    for i, rec in enumerate(pq.read_table(path).to_pylist()):
        for name in dict_fields:
            if isinstance(rec.get(name), str):
                rec[name] = json.loads(rec[name])
        try:
            rows.append(model.model_validate(rec))
        except ValidationError as err:
            raise RcsdError(f"{where(path, i)}: {describe_validation_error(err)}")
    return rows, meta


class PartialLog:
    """Finished rows of an interrupted stage, kept beside the output as JSON lines.

    The first line records a fingerprint of the run's config; a rerun with a different
    config refuses to mix results instead of silently combining them.
    """

    def __init__(self, output: str | Path, model: type[M], fingerprint: dict, fresh: bool = False):
        self.path = Path(str(output) + ".partial.jsonl")
        self.model = model
        self.fingerprint = json.dumps(fingerprint, sort_keys=True, default=str)
        if fresh and self.path.exists():
            self.path.unlink()

    def load(self) -> list[M]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        if not lines:
            return []
        if lines[0] != self.fingerprint:
            raise RcsdError(f"{self.path}: partial results from a run with other settings; "
                            "rerun with the same settings or pass --overwrite to start afresh")
        rows = []
        for line in lines[1:]:
            try:
                rows.append(self.model.model_validate_json(line))
            except ValidationError:
                break  # a line cut short by the interruption; everything before it is intact
        return rows

    def append(self, rows: Iterable[BaseModel]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a") as f:
            if new:
                f.write(self.fingerprint + "\n")
            for row in rows:
                f.write(row.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        if self.path.exists():
            self.path.unlink()
