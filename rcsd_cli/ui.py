"""Console output: rich progress bars and tables on stderr, so stdout stays pipeable."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
if not console.is_terminal:
    console = Console(stderr=True, width=140)


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and info logs; rcsd shows its own."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """Yield ``advance(n)``; no bar when output is not a terminal (logs stay clean) or when disabled."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                   disable=not (enabled and console.is_terminal))
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def info(message: str) -> None:
    console.print(message, highlight=False)
