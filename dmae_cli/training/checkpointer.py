"""A training run's checkpoints: what goes into one, when they are written, how a run resumes.

A checkpoint holds `model` (the state dict, outside any DDP wrapper), `optimizer`, `scaler`
(always None: bf16 autocast needs no loss scaling; kept because the official MAE layout has
it), `epoch` (the last finished one), `rng` (one RNG state per rank, so every rank resumes its
own noise stream), `meta` (the model description the stage passes in, which loading the weights
needs) and, after an interruption inside an epoch, `position` (where that epoch stopped). The
lr schedule is a function of the update number, so epoch and position are all of its state.
Other code and older checkpoints rely on these key names.

Every file is written atomically (`runtime.checkpoint`). `last.pth` is written at the end of
every epoch and `checkpoint-NNNN.pth` (NNNN: epochs done) every `save_every` epochs and after
the last one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.runtime import checkpoint, distributed
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.step import unwrap

LAST = "last.pth"
RESUMABLE = {"model", "optimizer", "epoch", "rng"}  # what a checkpoint needs to resume from


@dataclass
class Position:
    """Where an interrupted epoch stopped: the next run starts at update `updates_done`."""

    epoch: int
    updates_done: int
    loss_sum: float  # of the epoch's batch losses so far, for the epoch's mean loss
    seen: int  # examples this process trained on in the epoch so far

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "updates_done": self.updates_done,
            "loss_sum": self.loss_sum,
            "seen": self.seen,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(int(d["epoch"]), int(d["updates_done"]), float(d["loss_sum"]), int(d["seen"]))


@dataclass
class Resumed:
    path: Path
    start_epoch: int  # the first epoch still to train
    position: Position | None  # inside `start_epoch`, after an interruption


@dataclass
class Checkpointer:
    run_dir: Path
    model: nn.Module  # possibly DDP-wrapped: the checkpoint holds the model inside
    optimizer: torch.optim.Optimizer
    meta: dict[str, Any]  # the stage's model description, stored in every checkpoint
    epochs: int  # of the whole run: its last epoch always gets a checkpoint-NNNN.pth
    save_every: int
    device: torch.device  # where a resumed state is loaded to

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    def state(self, epoch: int, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint after `epoch` (the official MAE layout plus `rng` and `meta`)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None,
            "epoch": epoch,
            "rng": rngs,
            "meta": self.meta,
        }

    def save_epoch(self, epoch: int, before_last: Callable[[], None]) -> None:
        """Write the checkpoints of a finished epoch; every rank calls this (it gathers RNGs).

        `before_last` writes the epoch's other files (its metrics line, best.pth) on the main
        process. `last.pth` goes last: it marks the epoch done, so a kill before it reruns the
        epoch, which rewrites every other file of it (the metrics line is dropped on resume).
        """
        rngs = distributed.gather_objects(checkpoint.rng_state())  # every rank's own streams
        if not distributed.is_main():
            return
        state = self.state(epoch, rngs)
        if (epoch + 1) % self.save_every == 0 or epoch + 1 == self.epochs:
            checkpoint.save_checkpoint(self.run_dir / f"checkpoint-{epoch + 1:04d}.pth", state)
        before_last()
        checkpoint.save_checkpoint(self.last, state)

    def save_interrupted(self, position: Position) -> Path:
        """Save the position inside an epoch with the last complete epoch; every rank calls
        this. Returns the file written."""
        rngs = distributed.gather_objects(checkpoint.rng_state())
        if distributed.is_main():
            state = self.state(position.epoch - 1, rngs) | {"position": position.as_dict()}
            checkpoint.save_checkpoint(self.last, state)
        return self.last

    def resume(self, path: Path | None = None) -> Resumed | None:
        """Restore model, optimizer and RNGs from `path` or `last.pth`; None if there is none."""
        path = path or self.last
        if distributed.is_main() and self.run_dir.is_dir():
            checkpoint.remove_stale_temporaries(self.run_dir)
        if not path.is_file():
            return None
        state = self._load(path)
        checkpoint.load_exact(
            unwrap(self.model), state["model"], str(path), "does not match this recipe's model"
        )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:  # torch words a mismatch as ValueError
            raise UserError(
                f"{path}: its optimizer state does not fit this run's parameter groups "
                f"({_first_line(exc)}); were the optimisation settings changed? Start a new run "
                f"directory (--out) to train with them"
            ) from exc
        start_epoch = int(state["epoch"]) + 1
        position = state.get("position")
        _restore_rng(state["rng"], start_epoch)
        return Resumed(path, start_epoch, Position.from_dict(position) if position else None)

    def _load(self, path: Path) -> dict[str, Any]:
        try:
            state = checkpoint.load_checkpoint(path, map_location=self.device)
        except UserError as exc:  # e.g. a disk fault: atomic writes never leave half a file
            raise UserError(
                f"{exc}; remove it to start the run afresh, or copy an earlier "
                f"checkpoint-NNNN.pth over it to resume from there"
            ) from exc
        missing = RESUMABLE - state.keys()
        if missing:
            raise UserError(
                f"{path}: not a resumable dmae checkpoint (it lacks {', '.join(sorted(missing))}); "
                f"resuming takes a last.pth or checkpoint-NNNN.pth of the same stage"
            )
        return state


def _restore_rng(rngs: list[dict[str, Any]], start_epoch: int) -> None:
    """This rank's RNG streams as saved; on another number of processes, distinct new ones."""
    if len(rngs) == distributed.world_size():
        checkpoint.set_rng_state(rngs[distributed.rank()])
        return
    # Another number of processes: exact continuation is impossible; keep streams distinct.
    warnings.warn(
        f"resuming {len(rngs)}-process RNG state on {distributed.world_size()} processes; "
        "random streams are reseeded, so this run will not repeat an uninterrupted one",
        stacklevel=3,
    )
    checkpoint.set_rng_state(rngs[0])
    torch.manual_seed(torch.initial_seed() + 1_000_003 * distributed.rank() + start_epoch)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
