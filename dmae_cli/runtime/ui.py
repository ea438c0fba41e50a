"""Terminal output shared by every stage: one console, one progress layout.

On a terminal progress is a rich bar, redrawn in place. When stderr is a file or a pipe (a batch
job's log under SLURM or Kubernetes) a redrawn bar shows nothing until it stops, so `progress`
returns a `LineProgress` there instead: the same interface, plain lines without control
characters, at most one per `interval` seconds plus the lines a caller asks for (an epoch's end)
and the last one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dmae_cli.runtime import distributed

# Progress and messages go to stderr so that stdout carries only results a script may parse.
console = Console(stderr=True)

LINE_INTERVAL = 30.0  # seconds between two throttled progress lines in a log


def progress(*extra_columns: TextColumn) -> Progress | LineProgress:
    """Progress with count, elapsed and remaining time; silent on non-main ranks.

    A rich bar on a terminal (or in a notebook), plain throttled lines anywhere else.
    """
    if not console.is_terminal and not console.is_jupyter:
        return LineProgress(*extra_columns, disable=not distributed.is_main())
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


@dataclass
class _Task:
    """What a plain line shows of one task; `fields` are read by the columns' formats."""

    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    started_at: float  # `completed` when the task (or this run of a resumed one) began
    shown: float  # clock of the last line written
    dirty: bool = False  # changed since the last line
    finished: bool = field(default=False)


@dataclass
class _Live:
    """Stands in for rich's `Progress.live`: a transient reporter writes no last line."""

    transient: bool = False


class LineProgress:
    """`rich.progress.Progress`'s interface (context, `add_task`, `update`) as plain lines.

    A line is written when a task completes, on `flush` or `line`, and otherwise at most
    every `interval` seconds of `clock`; none on exit after an error or when `live.transient`.
    """

    def __init__(
        self,
        *columns: TextColumn,
        disable: bool = False,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.columns = columns
        self.disable = disable
        self.interval = LINE_INTERVAL if interval is None else interval
        self.clock = clock
        self.write = write or _print
        self.tasks: dict[TaskID, _Task] = {}
        self.live = _Live()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None or self.live.transient:
            return
        for task_id in self.tasks:  # where a stage stopped early (a shard run interrupted)
            self.flush(task_id)

    def add_task(
        self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any
    ) -> TaskID:
        now = self.clock()
        task_id = TaskID(len(self.tasks))
        self.tasks[task_id] = _Task(description, total, completed, fields, now, completed, now)
        return task_id

    def update(
        self,
        task_id: TaskID,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        task.total = task.total if total is None else total
        task.completed = task.completed if completed is None else completed
        task.completed += advance or 0
        task.description = task.description if description is None else description
        task.fields.update(fields)
        task.dirty = True
        done = task.total is not None and task.completed >= task.total
        if (done and not task.finished) or self.clock() - task.shown >= self.interval:
            self.line(task_id)
        task.finished = done

    def flush(self, task_id: TaskID) -> None:
        """Write the task's line now (the end of an epoch, say) unless it was just written."""
        if self.tasks[task_id].dirty:
            self.line(task_id)

    def line(self, task_id: TaskID) -> None:
        """Write the task's line now, whatever the throttle."""
        task = self.tasks[task_id]
        now = task.shown = self.clock()
        task.dirty = False
        if self.disable:
            return
        total = "?" if task.total is None else f"{task.total:g}"
        parts = [task.description, f"{task.completed:g}/{total}"]
        view = _View(task.description, task.fields)
        for column in self.columns:
            text = column.text_format.format(task=view)
            parts.append(Text.from_markup(text).plain if column.markup else text)
        elapsed = now - task.started
        left = self._left(task, elapsed)
        parts += [f"elapsed {_clock_time(elapsed)}", f"eta {_clock_time(left)}"]
        self.write(" ".join(part for part in parts if part.strip()))

    @staticmethod
    def _left(task: _Task, elapsed: float) -> float:
        """Seconds to the end at the task's mean rate so far; NaN while there is no rate."""
        done = task.completed - task.started_at
        if task.total is None or done <= 0 or elapsed <= 0:
            return math.nan
        return max(task.total - task.completed, 0) * elapsed / done


@dataclass
class _View:
    """The part of a rich `Task` that column formats read: `task.description`, `task.fields`."""

    description: str
    fields: dict[str, Any]


def _clock_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _print(line: str) -> None:
    console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


def info(message: str) -> None:
    if distributed.is_main():
        console.print(message, highlight=False)
