"""The ``rcsd`` command: a Typer app whose subcommands live in ``rcsd_cli/commands``."""

from __future__ import annotations

import os
import sys

import typer

from rcsd_cli import __version__
from rcsd_cli.commands import demo, export, inspect, plot, serve, stages
from rcsd_cli.commands.common import example
from rcsd_cli.commands.help_format import install as readable_help
from rcsd_cli.errors import EXIT_BAD_INPUT, RcsdError
from rcsd_cli.ui import quiet_libraries, set_verbosity

readable_help()

app = typer.Typer(name="rcsd", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  add_completion=False,
                  help="Rubric-Conditioned Self-Distillation: every stage reads and writes Parquet.")

PIPELINE, TOOLS = "Pipeline stages", "Tools"
app.command("gen-rubrics", rich_help_panel=PIPELINE,
            epilog=example("rcsd gen-rubrics examples/data.jsonl -o rubrics.parquet --generator reference"))(
    stages.gen_rubrics)
app.command("sample", rich_help_panel=PIPELINE,
            epilog=example("rcsd sample rubrics.parquet -o samples.parquet --n 4 --max-new-tokens 128"))(stages.sample)
app.command("score", rich_help_panel=PIPELINE,
            epilog=example("rcsd score samples.parquet --rubrics rubrics.parquet -o scores.parquet"))(stages.score)
app.command("train", rich_help_panel=PIPELINE,
            epilog=example("rcsd train --rubrics rubrics.parquet -o model --steps 20 --batch-size 8"))(stages.train)
app.command("eval", rich_help_panel=PIPELINE,
            epilog=example("rcsd eval --bench arc-easy --limit 100 -o eval.parquet --model model"))(stages.eval_)
app.command("eval-rubrics", rich_help_panel=PIPELINE,
            epilog=example("rcsd eval-rubrics generated.parquet --reference reference.parquet --judge-model M "
                           "-o rubric-quality.parquet"))(stages.eval_rubrics)
app.command("diagnose", rich_help_panel=PIPELINE,
            epilog=example("rcsd diagnose rubrics.parquet --limit 64 -o diagnose.parquet"))(stages.diagnose)
app.command("explain", rich_help_panel=TOOLS,
            epilog=example("rcsd explain samples.parquet --rubrics rubrics.parquet -o credit.html --show"))(
    stages.explain)
app.command("demo", rich_help_panel=TOOLS, epilog=example("rcsd demo -o rcsd-demo"))(demo.command)
app.command("serve", rich_help_panel=TOOLS,
            epilog=example("rcsd serve --model Qwen/Qwen3-8B --port 8000   # then: --backend openai "
                           "--base-url http://127.0.0.1:8000/v1"))(serve.command)
app.command("export", rich_help_panel=TOOLS,
            epilog=example("rcsd export --format verl rubrics.parquet -o verl_train.parquet"))(export.command)
app.command("plot", rich_help_panel=TOOLS,
            epilog=example("rcsd plot rcsd-model/metrics.parquet grpo-model/metrics.parquet -o curves.png"))(
    plot.command)
app.command("inspect", rich_help_panel=TOOLS, epilog=example("rcsd inspect scores.parquet --rows 3"))(inspect.command)


def _version(value: bool):
    if value:
        print(f"rcsd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show version."),
          quiet: bool = typer.Option(False, "-q", "--quiet", help="Only errors and results."),
          verbose: bool = typer.Option(False, "-v", "--verbose", help="Also the libraries' own logs.")):
    """Rubric-Conditioned Self-Distillation: every stage reads and writes Parquet."""
    set_verbosity(quiet, verbose)
    quiet_libraries()


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA and CPU allocator failures (torch.OutOfMemoryError subclasses RuntimeError)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower() \
        or "DefaultCPUAllocator: can't allocate memory" in str(exc)


def main() -> None:
    try:
        app()
    except RcsdError as exc:
        if os.environ.get("RCSD_DEBUG"):
            raise
        print(f"rcsd: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except RuntimeError as exc:
        if os.environ.get("RCSD_DEBUG") or not _out_of_memory(exc):
            raise
        print(f"rcsd: error: out of memory ({str(exc).splitlines()[0][:100]}); lower --micro-batch-size, "
              "--gen-batch-size or --chunk-size (RCSD_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # disk full, permissions, a file vanishing mid-run: say which and where
        if os.environ.get("RCSD_DEBUG"):
            raise
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"rcsd: error: {exc.strerror or type(exc).__name__}{where} (RCSD_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("rcsd: interrupted; finished work is kept and a rerun resumes it", file=sys.stderr)
        sys.exit(130)
