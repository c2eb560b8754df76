"""Console output: rich progress bars and tables, on stderr so stdout stays machine-readable."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Under torchrun only rank 0 speaks: the other ranks wait for its model (converter/distributed.py).
# Written to a file or a pipe (a log, CI), rich would cut tables to 80 columns; a terminal's own
# width and COLUMNS still rule. No emoji: ":factory" in a model name is not ":factory:".
console = Console(
    stderr=True,
    quiet=int(os.environ.get("RANK", "0")) != 0,
    width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 200,
    emoji=False,
)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield `advance(label="")`, which moves the bar one step and shows the label."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, label="")

        def advance(label: object = "") -> None:
            progress.update(task, advance=1, label=str(label))

        yield advance
