"""What a training run records and shows: the epoch's device-side log, metrics.jsonl and the bar.

Every batch's loss and every update's gradient norm stay on the device (`EpochLog`) and are read
back once per `log_every` updates, so an update costs no host sync. At the end of each epoch one
line goes to `metrics.jsonl`; its keys are read by `dmae report` and by people, so they are
stable: epoch, update, loss, lr, images_per_s, epoch_time_s, grad_norm, grad_norm_max,
grad_spikes, grad_spike_updates, then skipped (data sets that count skipped samples) and what
the stage's evaluation adds.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from rich.progress import Progress, TaskID, TextColumn

from dmae_cli.runtime import checkpoint, distributed, ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.step import StepResult

SPIKES_LISTED = 100  # spike updates listed per epoch in metrics.jsonl (all are counted)


class EpochLog:
    """One epoch's batch losses, update gradient norms and throughput, kept on the device.

    Recording a step is a device-side copy, never a host sync; `read` fetches everything
    recorded since the previous read in one transfer, at the trainer's log points. A resumed
    epoch starts after `done` updates, with `loss_before` the loss sum and `seen` the examples
    of those.
    """

    def __init__(
        self,
        updates: int,
        accum: int,
        device: torch.device,
        loss_before: float = 0.0,
        done: int = 0,
        seen: int = 0,
    ) -> None:
        self.accum = accum
        self.losses = torch.zeros(updates * accum, device=device)
        self.norms = torch.zeros(updates, device=device)
        self.loss_before = loss_before
        self.done = done  # updates of this epoch completed
        self.read_to = done  # updates of this epoch already read (or done before a resume)
        self.seen = self.seen_before = seen  # examples on this process, and those before resume
        self.started = time.perf_counter()
        self.norm_values: list[float] = []  # every norm read so far, for the epoch's stats
        self.spike_updates: list[int] = []  # 1-based over the run

    def record(self, step: StepResult) -> None:
        """Keep a step's losses (and its gradient norm, when it updated) on the device."""
        first = self.done * self.accum
        self.losses[first : first + len(step.losses)] = step.losses
        self.seen += step.examples
        if step.grad_norm is not None:
            self.norms[self.done] = step.grad_norm.detach().float()
            self.done += 1

    def loss_sum(self) -> torch.Tensor:
        """The sum of the epoch's batch losses so far (a device tensor)."""
        return self.losses.sum() + self.loss_before

    def read(self) -> tuple[float, list[float], list[float]]:
        """(loss sum so far, batch losses, gradient norms) of updates [read_to, done): one sync."""
        first, done, k = self.read_to, self.done, self.accum
        losses = self.losses[first * k : done * k]
        packed = torch.cat([self.loss_sum().view(1), losses, self.norms[first:done]]).tolist()
        self.read_to = done
        return packed[0], packed[1 : 1 + len(losses)], packed[1 + len(losses) :]

    def images_per_s(self, elapsed: float | None = None) -> float:
        """Examples per second since the epoch (or its resumed part) started, over all ranks."""
        elapsed = time.perf_counter() - self.started if elapsed is None else elapsed
        return (self.seen - self.seen_before) * distributed.world_size() / elapsed

    def summary(self, lr: float) -> dict[str, Any]:
        """The epoch's metrics.jsonl fields; a collective under DDP (the loss is averaged)."""
        mean_loss = distributed.all_reduce_mean(self.loss_sum() / len(self.losses)).item()
        elapsed = time.perf_counter() - self.started
        return {
            "loss": mean_loss,
            "lr": lr,
            "images_per_s": self.images_per_s(elapsed),
            "epoch_time_s": elapsed,
            **self.grad_stats(),
        }

    def grad_stats(self) -> dict[str, Any]:
        """What metrics.jsonl records of the epoch's gradient norms."""
        norms = self.norm_values or [0.0]
        return {
            "grad_norm": sum(norms) / len(norms),
            "grad_norm_max": max(norms),
            "grad_spikes": len(self.spike_updates),
            "grad_spike_updates": self.spike_updates[:SPIKES_LISTED],
        }


class MetricsFile:
    """`metrics.jsonl`: one JSON line per finished epoch, written by the main process only.

    With `tensorboard` each line is also written to `<run dir>/tensorboard/`; a missing
    package stops the stage here, before its first update.
    """

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.board = TensorBoardLog(path.parent / "tensorboard") if tensorboard else None

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.write(record)

    def truncate(self, start_epoch: int) -> None:
        """Drop the lines of epochs that will run again (written before a crash or a kill)."""
        if not self.path.is_file() or not distributed.is_main():
            return
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if _line_epoch(line) < start_epoch
        ]
        checkpoint.atomic_write_text(self.path, "".join(line + "\n" for line in keep))


class TensorBoardLog:
    """An epoch's metrics.jsonl record as TensorBoard scalars, at the run's update count.

    Training values go under `train/`, what the stage's evaluation adds under `eval/`. The event
    file is flushed after every epoch, so a run watched live is never an epoch behind. A
    resumed run purges the events of the epochs it trains again, as `truncate` drops their lines.
    """

    TRAIN_KEYS = frozenset(
        {"loss", "lr", "images_per_s", "epoch_time_s", "grad_norm", "grad_norm_max"}
        | {"grad_spikes", "skipped"}
    )

    def __init__(self, log_dir: Path) -> None:
        try:  # the package itself: torch.utils.tensorboard may already be imported without it
            importlib.import_module("tensorboard")
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(
                "logging.tensorboard: the tensorboard package is not installed; "
                "pip install 'dmae[tensorboard]' or set logging.tensorboard: false"
            ) from exc
        self.log_dir = log_dir
        self.writer_class = SummaryWriter
        self.writer: Any = None  # opened at the first record, knowing where a resumed run is

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["update"])
        if self.writer is None:
            self.writer = self.writer_class(str(self.log_dir), purge_step=step)
        self.writer.add_scalar("train/epoch", record["epoch"], step)
        for key, value in record.items():
            if key in ("epoch", "update") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                group = "train" if key in self.TRAIN_KEYS else "eval"
                self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()


def _line_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a torn or foreign one (dropped)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) else math.inf


class ProgressBar:
    """The run's bar: updates done of all, with the epoch, the running loss, the lr and the speed.

    In a log (stderr not a terminal) it is a plain line at each epoch's end (when `per_epoch`,
    the updates of an epoch, is given) and at most every half minute in between.
    On a `UserError` the bar disappears, so that the error stays one line (also in a log file,
    where rich would otherwise print the bar's last state when it stops).
    """

    COLUMNS = (
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[ips]:.0f} img/s"),
    )

    def __init__(
        self, description: str, total: int, completed: int, per_epoch: int | None = None
    ) -> None:
        self.description, self.total, self.completed = description, total, completed
        self.per_epoch = per_epoch
        self.progress: Progress | ui.LineProgress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        self.progress = ui.progress(*self.COLUMNS).__enter__()
        self.task = self.progress.add_task(
            self.description,
            total=self.total,
            loss=math.nan,
            lr=0.0,
            ips=0.0,
            epoch=self._epoch(self.completed),
            completed=self.completed,
        )
        return self

    def show(self, completed: int, loss: float, lr: float, ips: float) -> None:
        assert self.progress is not None and self.task is not None, "use the bar as a context"
        epoch = self._epoch(completed)
        self.progress.update(self.task, completed=completed, loss=loss, lr=lr, ips=ips, epoch=epoch)
        ends_epoch = self.per_epoch and completed % self.per_epoch == 0
        if ends_epoch and isinstance(self.progress, ui.LineProgress):
            self.progress.flush(self.task)

    def _epoch(self, completed: int) -> str:
        """'3/80' for an update inside the third of 80 epochs (its last update included)."""
        if not self.per_epoch:
            return "-"
        return f"{max(1, math.ceil(completed / self.per_epoch))}/{self.total // self.per_epoch}"

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.progress is not None
        if isinstance(exc, UserError):
            self.progress.live.transient = True
        self.progress.__exit__(kind, exc, tb)
