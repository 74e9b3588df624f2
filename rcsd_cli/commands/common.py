"""Command-line plumbing shared by the subcommands: the only place Typer meets the configs.

``typer_parameters`` is a config model's Typer signature (choices for ``Literal`` fields, defaults
read from the model); ``stage_command`` turns a stage's config into its command (options,
``--config``, precedence); the few ``Annotated`` options here are the invocation flags outside any
config. Configs and row schemas (``rcsd_cli.data.options``, ``schemas``) never import Typer.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel

from rcsd_cli.data.options import OptionSpec, build_config, option_specs, read_config_file, unwrap_optional
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


def _optional_parser(inner: type):
    """Parse a number that may also be switched off with ``none``."""

    def parse(value):
        if value is None or isinstance(value, inner):
            return value
        if str(value).lower() in ("none", "off", "null"):
            return None
        try:
            return inner(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{value!r} is not a {inner.__name__} or 'none'") from exc

    return parse


def _typer_param(spec: OptionSpec) -> inspect.Parameter:
    inner, optional = unwrap_optional(spec.annotation)
    kwargs: dict[str, Any] = {"help": spec.help, "rich_help_panel": spec.panel}
    py_type: Any = inner  # Typer turns a Literal into a choice
    if optional and spec.default is not None and inner in (int, float):
        kwargs["parser"] = _optional_parser(inner)
    if inner is bool:
        py_type = bool
        decls = [f"{spec.flag}/--no-{spec.flag[2:]}"]
    else:
        decls = [spec.flag] + ([spec.short] if spec.short else [])
    if optional or spec.argument:
        py_type = Optional[py_type]
    if spec.argument:
        info = typer.Argument(show_default=False, help=spec.help, rich_help_panel=spec.panel,
                              metavar=spec.name.upper())
        default = None
    else:
        info = typer.Option(*decls, **kwargs)
        default = spec.default
    return inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                             annotation=Annotated[py_type, info])


def typer_parameters(model: type[BaseModel]) -> list[inspect.Parameter]:
    specs = [s for s in option_specs(model) if s.on_cli]
    return [_typer_param(s) for s in sorted(specs, key=lambda s: not s.argument)]


def given_on_command_line(ctx: typer.Context, names) -> dict[str, Any]:
    """The subset of the command's parameters the user actually typed (or set by environment)."""
    out = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            out[name] = ctx.params[name]
    return out


def stage_command(config_model, run, *, output: str | None, doc: str, extra: tuple[inspect.Parameter, ...] = ()):
    """A Typer command whose options are ``config_model``'s fields; calls ``run(config, output, **flags)``.

    Values come from the model's defaults, then ``--config FILE``, then flags typed on the
    command line. ``extra`` are invocation flags that are not part of the config (``--resume``).
    ``output=None``: a command that writes nothing (``serve``), called as ``run(config, **flags)``.
    """
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
    setattr(command, "__signature__", inspect.Signature([context] + options + invocation))  # what Typer reads
    command.__doc__ = doc
    command.__name__ = config_model.__name__
    return command


def example(text: str) -> str:
    """Help epilog with a usage example (rich markup keeps the line breaks)."""
    return f"[bold]Example[/bold]\n\n  {text}"
