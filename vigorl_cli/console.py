"""Rich output for humans, plain JSON for scripts: one place.

``console`` prints results to stdout, ``err_console`` prints diagnostics to stderr (Typer's convention).
Long loops use :func:`progress` so every stage shows the same kind of bar.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def quiet() -> bool:
    return os.environ.get("VIGORL_QUIET") == "1"


def progress(transient: bool = False) -> Progress:
    """The progress bar every long loop uses: description, bar, done/total, elapsed, ETA, and free-form stats."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                    console=err_console, transient=transient, disable=quiet())


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj, default=str))
