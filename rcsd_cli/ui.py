"""Console output: results on stdout (``results``), logs and progress on stderr (``console``).

Without a terminal (nohup, SLURM, a pipe) progress bars would print nothing until the end, so
``progress`` writes a plain line every ``RCSD_PROGRESS_SECONDS`` (default 30) or every 10% of
the items instead. ``-q`` silences logs and progress; ``-v`` also shows the libraries' own logs.
"""

from __future__ import annotations

import os
import time
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
results = Console() if Console().is_terminal else Console(width=140)
VERBOSITY = {"level": 1}  # 0 quiet, 1 normal, 2 verbose


def set_verbosity(quiet: bool, verbose: bool) -> None:
    VERBOSITY["level"] = 0 if quiet else 2 if verbose else 1


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and info logs; rcsd shows its own."""
    import os

    if VERBOSITY["level"] >= 2:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # its retry warnings would break one-line errors
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """Yield ``advance(n)``: a bar on a terminal, else a log line every so often; nothing when disabled."""
    enabled = enabled and VERBOSITY["level"] > 0
    if enabled and not console.is_terminal:
        yield _log_lines(description, total)
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                   disable=not enabled)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _log_lines(description: str, total: int):
    every_s = float(os.environ.get("RCSD_PROGRESS_SECONDS", "30"))
    state = {"done": 0, "last": time.monotonic(), "start": time.monotonic(), "mark": 0}

    def advance(n=1):
        state["done"] += n
        now, tenth = time.monotonic(), max(1, total // 10)
        if state["done"] // tenth > state["mark"] or now - state["last"] >= every_s or state["done"] >= total:
            state["mark"], state["last"] = state["done"] // tenth, now
            console.print(f"{description}: {state['done']}/{total} ({now - state['start']:.0f} s)", highlight=False)

    return advance


def info(message: str) -> None:
    """One status line; never hard-wrapped, so a long path cannot split a message that logs are grepped for."""
    if VERBOSITY["level"] > 0:
        console.print(message, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One line that something is likely wrong with the run; shown even with ``-q``."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
