"""The folders are the architecture: a module imports only from its own layer or the layers below it."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

# Lowest first; docs/development.md lists the same order.
LAYERS = ["errors", "ui", "models", "data", "configs", "modeling", "rubrics", "backends", "evaluation", "train",
          "stages", "verl_reward", "commands", "cli", "__main__", "reference"]
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK.update({"errors": 0, "ui": 0, "models": 0, "stages": RANK["stages"], "verl_reward": RANK["stages"]})


def imported_rooms(path) -> set[str]:
    """The top-level rooms of ``rcsd_cli`` a module imports, at module level or inside functions."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rcsd_cli"):
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("rcsd_cli.")]
        rooms.update(n for n in names if n in RANK)
    return rooms


def test_no_import_runs_up_a_layer():
    package = ROOT / "rcsd_cli"
    upward = []
    for path in package.rglob("*.py"):
        room = path.relative_to(package).parts[0].removesuffix(".py")
        if room == "__init__":
            continue
        for target in imported_rooms(path):
            if RANK[target] > RANK[room]:
                upward.append(f"{path.relative_to(ROOT)} ({room}) imports {target}")
    assert not upward, upward


def test_every_room_is_a_known_layer():
    rooms = {p.name.removesuffix(".py") for p in (ROOT / "rcsd_cli").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert rooms <= set(RANK), rooms - set(RANK)


def test_tests_are_laid_out_like_the_package():
    """tests/<room>/ holds the tests of rcsd_cli/<room>/; what spans rooms (docs, layout, the real model) sits at
    the top of tests/."""
    data = {"fixtures", "golden", "__pycache__"}
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name not in data}
    rooms = {p.name for p in (ROOT / "rcsd_cli").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= rooms, folders - rooms
    assert all((ROOT / "tests" / f / "__init__.py").exists() for f in folders)
