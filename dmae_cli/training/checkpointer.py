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

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.models.weights import unusable_tensor
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

    @staticmethod
    def problem(d: object, epoch: int) -> str | None:
        """Why `d` is not the position inside `epoch` that `as_dict` wrote, or None."""
        expected = (
            f"expected a mapping of epoch ({epoch}), updates_done and seen (integers >= 0) and "
            f"loss_sum (a finite number)"
        )
        if not isinstance(d, dict) or d.get("epoch") != epoch or not _is_int(d["epoch"]):
            return expected
        counts = [d.get("updates_done"), d.get("seen")]
        loss = d.get("loss_sum")
        if not all(_is_int(c) and c >= 0 for c in counts):
            return expected
        if not isinstance(loss, int | float) or isinstance(loss, bool) or not math.isfinite(loss):
            return expected
        return None


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
    # The submodule whose weights a checkpoint holds as its "model"; "" the whole model. A
    # tuned denoiser trains as `Denoiser` but is kept as its DMAE, a pretraining checkpoint's
    # layout, so that every reader of DMAE checkpoints reads it.
    weights_of: str = ""

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    def held(self) -> nn.Module:
        """The module whose weights checkpoints hold (outside any DDP wrapper)."""
        return unwrap(self.model).get_submodule(self.weights_of)

    def state(self, epoch: int, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint after `epoch` (the official MAE layout plus `rng` and `meta`)."""
        return {
            "model": self.held().state_dict(),
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
        changed = self._trained_otherwise(state.get("meta"))
        if changed is not None:
            raise UserError(f"{path}: {changed}")
        _check(path, _state_dict_problem(state, "model"))
        checkpoint.load_exact(
            self.held(), state["model"], str(path), "does not match this recipe's model"
        )
        _check(path, _state_dict_problem(state, "optimizer"))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:  # torch words a mismatch as ValueError
            raise UserError(
                f"{path}: its optimizer state does not fit this run's parameter groups "
                f"({_first_line(exc)}); were the optimisation settings changed? Start a new run "
                f"directory (--out) to train with them"
            ) from exc
        _check(path, resume_problem(state))
        start_epoch = state["epoch"] + 1
        position = state.get("position")
        _restore_rng(state["rng"], start_epoch)
        return Resumed(path, start_epoch, Position.from_dict(position) if position else None)

    def _trained_otherwise(self, saved: Any) -> str | None:
        """A setting the checkpoint's meta records that this run would change part-way (the
        weights still fit, so nothing else would notice), e.g. a DMAE resumed with another
        `norm_pix_loss`, which decides whether it can ever denoise."""
        if not isinstance(saved, dict):
            return None
        for key in FIXED_WHILE_TRAINING:
            old, new = saved.get(key), self.meta.get(key)
            if old is not None and new is not None and old != new:
                return (
                    f"{key}: trained with {old!r}, this run asks for {new!r}; resume with the "
                    f"same setting, or start a new run directory (--out) to train with it"
                )
        return None

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


# What a run's meta records about its objective: a resume must not change it.
FIXED_WHILE_TRAINING = ("norm_pix_loss", "noise_levels", "sigma", "tuned_for")


def _check(path: Path, problem: str | None) -> None:
    if problem is not None:
        raise UserError(
            f"{path}: checkpoint field {problem}; the file is damaged or not dmae's: remove it "
            f"to start the run afresh, or copy an earlier checkpoint-NNNN.pth over it to resume "
            f"from there"
        )


def _state_dict_problem(state: dict[str, Any], name: str) -> str | None:
    if not isinstance(state[name], dict):
        return f"{name}: expected a state dict, got {_kind(state[name])}"
    problem = unusable_tensor(state[name]) if name == "model" else None
    return f"{name}: {problem}" if problem is not None else None


def resume_problem(state: dict[str, Any]) -> str | None:
    """What keeps a checkpoint's epoch, RNG states and position from being resumed ("rng:
    expected ..."), checked before any generator is touched; None when each is of its kind."""
    epoch = state["epoch"]
    if not _is_int(epoch) or epoch < -1:  # -1: interrupted inside the first epoch
        return f"epoch: expected an integer >= -1, got {_kind(epoch)}"
    rngs = state["rng"]
    if not isinstance(rngs, list) or not rngs:
        got = "an empty list" if isinstance(rngs, list) else _kind(rngs)
        return f"rng: expected a list of random generator states (one per rank), got {got}"
    for rank, rng in enumerate(rngs):
        problem = checkpoint.rng_problem(rng, f"rng[{rank}]")
        if problem is not None:
            return problem
    position = state.get("position")
    if position is not None:
        problem = Position.problem(position, epoch + 1)
        if problem is not None:
            return f"position: {problem}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    shown = (
        repr(value) if isinstance(value, int | float | str | type(None)) else type(value).__name__
    )
    return shown if len(shown) <= 40 else shown[:37] + "..."


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
