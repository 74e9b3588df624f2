"""Reading ``rcsd sample``'s artifact for the stages that work on samples (score, explain, an offline round)."""

from __future__ import annotations

from pathlib import Path

from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.rows import Sample
from rcsd_cli.ui import warn


def read_samples(path: str | Path) -> tuple[list[Sample], dict]:
    """Samples to work on: rows whose request failed for good (error column) are skipped, with a line saying so."""
    samples, meta = read_artifact(path, "samples")
    failed = [s for s in samples if s.error is not None]
    if failed:
        warn(f"{path}: skipping {len(failed)} failed sample(s) (first {failed[0].id!r}: {failed[0].error})")
    return [s for s in samples if s.error is None], meta
