"""Terminal output shared by every stage: one console, one progress-bar layout."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dmae_cli.runtime import distributed

# Progress and messages go to stderr so that stdout carries only results a script may parse.
console = Console(stderr=True)


def progress(*extra_columns: TextColumn) -> Progress:
    """A progress bar with count, elapsed and remaining time; silent on non-main ranks."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not distributed.is_main(),
    )


def info(message: str) -> None:
    if distributed.is_main():
        console.print(message, highlight=False)
