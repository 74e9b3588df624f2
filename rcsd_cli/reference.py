"""``docs/options.md``: every option of every command, read from the commands themselves.

The page is generated from the commands Typer builds (the very objects ``--help`` prints),
so it cannot disagree with ``--help``; a test fails when the committed page is stale.
Regenerate with ``python -m rcsd_cli.reference docs/options.md``.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path


def _kind(param) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    annotation = param.type_descriptor.annotation
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{c}`" for c in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _default(param) -> str:
    if param.param_type_name == "argument":
        return "required" if param.required else ""
    value = param.default
    if callable(value) or value is None or (getattr(param, "is_flag", False) and not value):
        return ""
    return f"`{value}`"


def _names(param) -> str:
    if param.param_type_name == "argument":
        return f"`{param.name.upper()}`"
    return ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])


def _cell(text: str) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def options_reference() -> str:
    from typer.core import TyperGroup
    from typer.main import get_command

    # the CLI app is built only when the reference is written
    from rcsd_cli.cli import app

    group = get_command(app)
    assert isinstance(group, TyperGroup)  # the rcsd app has subcommands
    out = ["# Every option of every command", "",
           "[← README](../README.md). Generated from the commands themselves (`python -m "
           "rcsd_cli.reference docs/options.md`); `rcsd COMMAND --help` shows the same, grouped in "
           "panels. Options of a stage's config can also come from `--config FILE.yaml` (see "
           "[paper.md](paper.md#config-files-and-recipes)).", ""]
    for name, cmd in group.commands.items():
        out += [f"## `rcsd {name}`", "", _cell(cmd.help or ""), "", "| option | type | default | meaning |",
                "| --- | --- | --- | --- |"]
        for param in cmd.params:
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            out.append(f"| {_names(param)} | {_kind(param)} | {_default(param)} | "
                       f"{_cell(getattr(param, 'help', '') or '')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/options.md")
    target.write_text(options_reference())
    print(target)
