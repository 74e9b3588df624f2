"""``rcsd plot``: training curves from one or more metrics.parquet files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcsd_cli.data.artifacts import ensure_writable, read_artifact
from rcsd_cli.ui import info

PANELS = (("loss", "loss"), ("kl", "KL(teacher || student), top-k"), ("top1_agreement", "top-1 agreement"),
          ("reward", "rollout rubric score / reward"), ("grad_norm", "gradient norm"),
          ("tokens_per_second", "tokens / second"))


def run_plot(paths: list[Path], output: Path, overwrite: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ensure_writable(output, overwrite)
    runs = [(p.parent.name if p.name == "metrics.parquet" else p.stem, read_artifact(p, "metrics")[0]) for p in paths]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (field, title) in zip(axes.flat, PANELS, strict=True):
        for name, rows in runs:
            pts = [(r.step, getattr(r, field)) for r in rows if getattr(r, field) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = output.with_name(f".{output.name}.tmp{output.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(output)
    info(f"wrote {output}")
    return output


def command(
    metrics: Annotated[list[Path], typer.Argument(help="One or more metrics.parquet files (one curve each).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write.")] = Path("curves.png"),
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
):
    """Draw loss, KL, agreement, reward, gradient norm and throughput per step."""
    run_plot(metrics, output, overwrite)
