"""Live experiment tracking for ``rcsd train --report-to``: TensorBoard, Weights & Biases or Trackio.

Each backend is an optional extra imported only when asked for; a missing one fails at start in one
line. Every optimizer step's metrics row is logged under ``train/<column>``; the run's full config
goes along as hyperparameters. ``metrics.parquet`` is written regardless, so ``none`` loses nothing.
Secrets (``WANDB_API_KEY``) are read by the libraries from the environment and never logged here.
"""

from __future__ import annotations

import os
from pathlib import Path

from rcsd_cli.errors import RcsdError

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class Tracker:
    """No-op base: what ``--report-to none`` gives."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard(Tracker):
    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "runs"))
        self.writer.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in config.items()) + "\n```")

    def log(self, step, values):
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _Hosted(Tracker):
    """wandb and trackio share the init/log/finish API."""

    def __init__(self, module, out: Path, config: dict):
        self.module = module
        project = os.environ.get("WANDB_PROJECT") or os.environ.get("TRACKIO_PROJECT") or "rcsd"
        kwargs = {"dir": str(out)} if module.__name__ == "wandb" else {}
        self.run = module.init(project=project, name=out.name, config=config, **kwargs)

    def log(self, step, values):
        self.module.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self):
        self.module.finish()


def open_tracker(kind: str, out: Path, config: dict) -> Tracker:
    if kind == "none":
        return Tracker()
    try:
        if kind == "tensorboard":
            return _TensorBoard(out, config)
        import importlib

        return _Hosted(importlib.import_module(kind), out, config)
    except ImportError as exc:
        raise RcsdError(f"--report-to {kind}: the {kind} package is not installed "
                        f"(pip install {EXTRAS[kind]})") from exc


def numeric(row: dict) -> dict[str, float]:
    """The loggable columns of a metrics row (numbers; None and text left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "step"}
