"""README and docs/ agree with the commands: the options page is current, examples use real flags, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_options() -> dict[str, set[str]]:
    from typer.main import get_command

    from rcsd_cli.cli import app

    return {name: {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))
                   if o.startswith("-")} | {"--help"} for name, cmd in get_command(app).commands.items()}


def test_options_page_is_generated_from_the_commands():
    from rcsd_cli.reference import options_reference

    page = (ROOT / "docs" / "options.md").read_text()
    assert page == options_reference(), "stale: python -m rcsd_cli.reference docs/options.md"
    for name, flags in command_options().items():  # every option of every command is in the reference
        section = page.split(f"## `rcsd {name}`")[1].split("\n## ")[0]
        assert all(f"`{flag}`" in section for flag in flags - {"--help"}), name


def rcsd_invocations(text: str):
    """(command, flags) of every ``rcsd COMMAND ...`` line in the page's code blocks."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for segment in re.split(r"&&|\||;", line.split(" #")[0]):
                tokens = segment.split()
                if "rcsd" not in tokens:
                    continue
                before = tokens[:tokens.index("rcsd")]  # only in command position: after env vars or a wrapper
                if not all(re.match(r"^\w+=", t) or t in ("nohup", "time", "srun", "exec") for t in before):
                    continue
                rest = [t for t in tokens[tokens.index("rcsd") + 1:] if t not in ("-q", "-v")]
                if rest and not rest[0].startswith("-"):
                    yield rest[0], [t.split("=")[0] for t in rest[1:] if t.startswith("--")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_use_real_commands_and_flags(page):
    options = command_options()
    for command, flags in rcsd_invocations(page.read_text()):
        assert command in options, f"{page.name}: no command rcsd {command}"
        unknown = [f for f in flags if f not in options[command]]
        assert not unknown, f"{page.name}: rcsd {command} has no {unknown}"


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_between_pages_resolve(page):
    for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]+))?\)", page.read_text()):
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: no heading #{anchor} in {path.name}"
