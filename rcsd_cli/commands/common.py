"""Command-line plumbing shared by the subcommands.

``stage_command`` turns a stage's Pydantic config into its Typer command (options, ``--config``,
precedence); the few ``Annotated`` options here are the invocation flags outside any config.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from rcsd_cli.models import DEFAULT_MODEL

Output = Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")]
Model = Annotated[str, typer.Option("--model", help="HF model id, local folder, or the embedded default.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (sampling, shuffles).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")]

DEFAULT = DEFAULT_MODEL
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML or JSON file of options (keys: option "
                                                    "names with underscores); flags given here win.",
                                                    rich_help_panel="Output")]


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


def stage_command(config_model, run, *, output: str | None, doc: str, extra: tuple[inspect.Parameter, ...] = ()):
    """A Typer command whose options are ``config_model``'s fields; calls ``run(config, output, **flags)``.

    Values come from the model's defaults, then ``--config FILE``, then flags typed on the
    command line. ``extra`` are invocation flags that are not part of the config (``--resume``).
    ``output=None``: a command that writes nothing (``serve``), called as ``run(config, **flags)``.
    """
    from rcsd_cli.options import build_config, given_on_command_line, read_config_file, typer_parameters

    options = typer_parameters(config_model)
    names = [p.name for p in options]
    writes = [_param("output", Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.",
                                                            rich_help_panel="Output")], Path(output)),
              _param("overwrite", Overwrite, False)] if output is not None else []
    invocation = [*writes[:1], _param("config", ConfigFile, None), *extra, *writes[1:],
                  _param("trust_remote_code", TrustRemoteCode, False)]

    def command(ctx: typer.Context, **kwargs):
        config_file = kwargs.pop("config")
        values = read_config_file(config_file, config_model) if config_file else {}
        values.update(given_on_command_line(ctx, names))
        source = f"{config_file}" if config_file else "options"
        cfg = build_config(config_model, values, source)
        run(cfg, **{k: v for k, v in kwargs.items() if k not in names})

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context] + options + invocation)
    command.__doc__ = doc
    command.__name__ = config_model.__name__
    return command


def example(text: str) -> str:
    """Help epilog with a usage example (rich markup keeps the line breaks)."""
    return f"[bold]Example[/bold]\n\n  {text}"
