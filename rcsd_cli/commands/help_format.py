"""``--help`` that reads at 80 columns (a pipe, CI, most terminals): option names are never cut and
boolean flags show as flags.

Typer's rich help lays options out in a table that, when narrow, ellipsises the option names
(``--teacher-contra…``) before it wraps the help text, and its type column labels a flag ``<bool>``,
which reads as if it took a value. Typer exposes neither choice, so ``install`` adjusts both where
typer builds them: the option-name columns do not wrap or shrink (a flag's ``--no-`` form goes under
it; the type and help columns fold instead), and flags have no type label.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

TYPE_WIDTH = 16  # columns of the type label (``<int>``, ``<topk_kl|jsd|sampled_rkl>`` folded)


class _OptionsTable(Table):
    """The option-name columns keep their full width; the type and help columns wrap into what remains
    (a long choice list or word folds instead of being ellipsised)."""

    def add_row(self, *cells, **kwargs):
        """A flag's negative form (``--no-x``) goes under its positive one, not in a column of its own."""
        cells = list(cells)
        first = 1 if len(cells) == 7 else 0  # typer adds a leading "required" column to some panels
        if len(cells) >= 6 and isinstance(cells[first], Text) and isinstance(cells[first + 2], Text) \
                and cells[first + 2].plain:
            cells[first] = Text.assemble(cells[first], "\n", cells[first + 2])
            cells[first + 2] = Text("")
        return super().add_row(*cells, **kwargs)

    def __rich_console__(self, console, options):
        if len(self.columns) > 2:
            for column in self.columns[:-2]:
                column.no_wrap = True
            for column in self.columns[-2:]:
                column.overflow = "fold"
            self.columns[-2].max_width = TYPE_WIDTH  # a long choice list folds; the help column gets the room
            self.columns[-1].ratio = 1
        return super().__rich_console__(console, options)


def _flag_type(display_type_rich):
    def display(self, ctx):
        return None if getattr(self, "is_flag", False) and not getattr(self, "count", False) else \
            display_type_rich(self, ctx)

    return display


def _lines(items, **_):
    """An option's help, default and env var one under the other (rich's ``Columns`` ellipsises long words)."""
    return Group(*items)


def install() -> None:
    from typer import core, rich_utils

    if rich_utils.Table is not _OptionsTable:
        # typer reads these names at render time: replacing them is the one adjustment point
        setattr(rich_utils, "Table", _OptionsTable)
        setattr(rich_utils, "Columns", _lines)
        setattr(core.TyperOption, "display_type_rich", _flag_type(core.TyperOption.display_type_rich))
