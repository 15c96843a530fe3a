"""The one table class of every command's output: rich's Table, with cells that fold.

rich shrinks a table to the console's width (80 columns when output is not a terminal) and by
default cuts what no longer fits to `…`: a path became `gguf:/tmp/pr/long_direc…` and a figure
`0.…`. Folding breaks such a cell over lines instead, so nothing printed is lost at any width.
"""

from __future__ import annotations

from rich.table import Table as _RichTable


class Table(_RichTable):
    def __rich_console__(self, console, options):
        # also the columns rich adds by itself when a row has more cells than columns were declared
        for column in self.columns:
            if column.overflow == "ellipsis":
                column.overflow = "fold"
        yield from super().__rich_console__(console, options)
