"""User-facing errors: one line, naming the file, row and field, exit code 2."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

EXIT_BAD_INPUT = 2


class RcsdError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


def where(path: str | Path | None, row: int | None = None) -> str:
    """Format a location prefix such as ``data.jsonl:row 3``."""
    parts = [str(path)] if path is not None else []
    if row is not None:
        parts.append(f"row {row}")
    return ":".join(parts)


def describe_validation_error(err: ValidationError) -> str:
    """Condense a pydantic error into ``field 'a.0.b': message`` for the first failure."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<row>"
    msg = first["msg"]
    if first["type"] == "missing":
        return f"field '{loc}' is missing"
    value = first.get("input")
    shown = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    extra = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"field '{loc}': {msg}, got {shown[:60]}{extra}"
