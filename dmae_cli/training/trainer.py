"""The training loop shared by pre-training and fine-tuning.

A stage hands `Trainer` a model, a loss function, a data set and its `OptimConfig`; the loop is
for each epoch, for each update: set the lr, `train_step`, record, review at log points, stop
if asked; then evaluate and checkpoint. Each of those is a component of its own:

- `optim`: AdamW (or the stage's optimizer) and the per-update warm-up + cosine schedule;
- `step`: one update's forward, backward, clipping and optimizer step (bf16 autocast on CUDA);
- `metrics`: the epoch's device-side log, metrics.jsonl and the progress bar;
- `health`: non-finite losses stop the run, gradient-norm spikes are reported;
- `checkpointer`: atomic checkpoints and exact resume (model, optimizer, schedule position,
  epoch and every RNG), also from the middle of an epoch after SIGINT/SIGTERM.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dmae_cli.config.recipe import OptimConfig
from dmae_cli.data.loading import set_epoch
from dmae_cli.runtime import distributed, ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import GracefulStop, Interrupted
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.training.checkpointer import Checkpointer, Position
from dmae_cli.training.health import SPIKE_FACTOR, HealthCheck, SpikeDetector
from dmae_cli.training.metrics import EpochLog, MetricsFile, ProgressBar
from dmae_cli.training.optim import MakeOptimizer, base_lr, build_optimizer, build_schedule
from dmae_cli.training.step import LossFn, train_step, unwrap

EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class Trainer:
    """Trains `model` on `loader` by `loss_fn` as `cfg` says, into `run_dir`.

    `resume()` picks up a run from its `last.pth`; `fit()` trains the remaining epochs and
    returns one record per epoch trained (what metrics.jsonl gets).
    """

    model: nn.Module  # possibly DDP-wrapped
    loss_fn: LossFn
    loader: DataLoader
    cfg: OptimConfig
    run_dir: Path
    device: torch.device
    precision: str = "auto"
    param_groups: list[dict[str, Any]] | None = None  # default: weight decay except 1-D params
    eval_fn: EvalFn | None = None
    eval_every: int = 1
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint
    on_checkpoint: Callable[[int, dict[str, float]], None] | None = None  # e.g. keep `best`
    make_optimizer: MakeOptimizer | None = None  # default AdamW (e.g. LARS for linear probing)
    log_every: int = 10  # optimizer updates between host syncs (loss check, display)
    description: str = "train"
    section: str = ""  # the recipe section of `cfg` (e.g. "pretrain"), for hints in messages
    spike_factor: float = SPIKE_FACTOR  # gradient norm / running average that counts as a spike
    tensorboard: bool = False  # metrics also in run_dir/tensorboard/ (recipe logging.tensorboard)
    weights_of: str = ""  # the submodule checkpoints hold ("": the model; see Checkpointer)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.updates_per_epoch = len(self.loader) // self.cfg.accum_iter
        if self.updates_per_epoch == 0:
            raise UserError(
                f"the training split has too few examples for batch {self.cfg.batch_size} x "
                f"accumulation {self.cfg.accum_iter} x {distributed.world_size()} process(es)"
            )
        self.total_updates = self.cfg.epochs * self.updates_per_epoch
        self.lr = base_lr(self.cfg)
        self.optimizer = build_optimizer(
            self.model, self.cfg, self.param_groups, self.make_optimizer
        )
        self.scheduler = build_schedule(self.optimizer, self.cfg, self.updates_per_epoch)
        self.amp_dtype = autocast_dtype(self.precision, self.device, training=True)
        self.start_epoch = 0
        self.partial: Position | None = None  # where an interrupted epoch stopped
        self.history: list[dict[str, Any]] = []
        self.checkpointer = Checkpointer(
            run_dir=self.run_dir,
            model=self.model,
            optimizer=self.optimizer,
            meta=self.checkpoint_meta,
            epochs=self.cfg.epochs,
            save_every=self.cfg.save_every,
            device=self.device,
            weights_of=self.weights_of,
        )
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", self.tensorboard)
        self.health = HealthCheck(
            cfg=self.cfg,
            peak_lr=self.lr,
            updates_per_epoch=self.updates_per_epoch,
            last=self.checkpointer.last,
            section=self.section,
            spikes=SpikeDetector(factor=self.spike_factor),
        )

    def distribute(self) -> None:
        """Wrap the model in DistributedDataParallel under torchrun (rank 0's weights go to
        every rank: a collective, so outside `distributed.agreed`); after `resume`."""
        self.model = distributed.wrap_ddp(self.model, self.device)

    def close(self) -> None:
        """Drop the DDP wrapper (its reducer uses the process group, which is left at exit and
        must outlive it), also when a traceback keeps this trainer alive."""
        self.model = unwrap(self.model)

    def resume(self, path: Path | None = None) -> bool:
        """Restore from `path` or this run's `last.pth`; False when there is nothing to resume."""
        resumed = self.checkpointer.resume(path)
        if resumed is None:
            self.metrics.truncate(0)  # lines of epochs killed before their first checkpoint
            return False
        self.start_epoch, self.partial = resumed.start_epoch, resumed.position
        self.metrics.truncate(self.start_epoch)
        at = f"epoch {self.start_epoch}/{self.cfg.epochs}"
        where = f", update {self.partial.updates_done}" if self.partial else ""
        ui.info(f"resuming from {resumed.path} at {at}{where}")
        return True

    def fit(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train from `start_epoch` to the last epoch (or `stop_after` epochs in total).

        SIGINT/SIGTERM finish the current update, save `last.pth` with the position inside the
        epoch and raise `Interrupted`; the next run resumes at that very update.
        """
        end = self.cfg.epochs if stop_after is None else min(stop_after, self.cfg.epochs)
        done = self.partial.updates_done if self.partial else 0
        bar = ProgressBar(
            self.description,
            self.total_updates,
            completed=self.start_epoch * self.updates_per_epoch + done,
            per_epoch=self.updates_per_epoch,
        )
        with bar, GracefulStop() as stop:
            for epoch in range(self.start_epoch, end):
                stats = self._train_epoch(epoch, bar, stop)
                stats |= self._evaluate(epoch, end)
                self._finish_epoch(epoch, stats)
        return self.history

    def _train_epoch(self, epoch: int, bar: ProgressBar, stop: GracefulStop) -> dict[str, Any]:
        """One epoch, or its rest after an interruption: for each update, step, log, maybe
        stop. Returns the epoch's statistics."""
        log = self._start_epoch(epoch)
        skipped_before = getattr(self.loader.dataset, "skipped", None)  # corrupt images/shards
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.cfg.accum_iter
        for micro_batches in _updates(self.loader, self.updates_per_epoch - log.done, accum):
            update = epoch * self.updates_per_epoch + log.done  # 0-based over the run
            self.scheduler.step_update(update)
            step = train_step(
                self.model,
                self.loss_fn,
                micro_batches,
                self.optimizer,
                accum=accum,
                clip_grad=self.cfg.clip_grad,
                amp_dtype=self.amp_dtype,
                device=self.device,
            )
            if step is not None:
                log.record(step)
            if step is None or step.grad_norm is None:  # the data ran out early: no update
                break
            if log.done % self.log_every == 0 or log.done == self.updates_per_epoch:
                self._show(log, epoch, bar)  # the one host sync per `log_every` updates
            self._maybe_stop(log, epoch, stop)
        stats = log.summary(lr=self.optimizer.param_groups[0]["lr"])
        if skipped_before is not None:  # reported, never silent: a shrinking data set is news
            stats["skipped"] = self._skipped_since(skipped_before)
        return stats

    def _start_epoch(self, epoch: int) -> EpochLog:
        """The epoch's log, and the loader set to the epoch's order (after any resumed part)."""
        partial, self.partial = self.partial, None
        done = partial.updates_done if partial else 0
        skip = done * self.cfg.accum_iter * (self.loader.batch_size or 1)
        set_epoch(self.loader, epoch, skip=skip)
        return EpochLog(
            self.updates_per_epoch,
            self.cfg.accum_iter,
            self.device,
            loss_before=partial.loss_sum if partial else 0.0,
            done=done,
            seen=partial.seen if partial else 0,
        )

    def _show(self, log: EpochLog, epoch: int, bar: ProgressBar) -> None:
        """Review the values recorded since the last log point and update the bar."""
        total = self.health.review(log, epoch)
        bar.show(
            completed=epoch * self.updates_per_epoch + log.done,
            loss=total / (log.done * self.cfg.accum_iter),
            lr=self.optimizer.param_groups[0]["lr"],
            ips=log.images_per_s(),
        )

    def _maybe_stop(self, log: EpochLog, epoch: int, stop: GracefulStop) -> None:
        """After SIGINT/SIGTERM: save the position inside the epoch and raise `Interrupted`."""
        # Under DDP the ranks agree on stopping at log points only (a collective costs a sync).
        if log.done % self.log_every and distributed.is_distributed():
            return
        signum = stop.requested()
        if not signum or log.done == self.updates_per_epoch:  # an epoch's end finishes normally
            return
        total = self.health.review(log, epoch)
        last = self.checkpointer.save_interrupted(Position(epoch, log.done, total, log.seen))
        raise Interrupted(
            f"interrupted at epoch {epoch}, update {log.done}/{self.updates_per_epoch}; progress "
            f"saved in {last}; run the same command again to resume",
            signum,
        )

    def _evaluate(self, epoch: int, end: int) -> dict[str, float]:
        """The stage's evaluation every `eval_every` epochs and after this run's last one."""
        if self.eval_fn is None or ((epoch + 1) % self.eval_every and epoch + 1 != end):
            return {}
        self.model.eval()
        return self.eval_fn(unwrap(self.model))

    def _skipped_since(self, before: int) -> int:
        """Samples the data set skipped this epoch, over all ranks."""
        skipped = torch.tensor(float(self.loader.dataset.skipped - before), device=self.device)
        return int(distributed.all_reduce_mean(skipped) * distributed.world_size())

    def _finish_epoch(self, epoch: int, stats: dict[str, Any]) -> None:
        """Record the epoch and write its files: checkpoints, best.pth (the stage's
        `on_checkpoint`) and its metrics line; `last.pth`, which marks it done, last."""
        record = {"epoch": epoch, "update": (epoch + 1) * self.updates_per_epoch, **stats}
        self.history.append(record)

        def before_last() -> None:
            if self.on_checkpoint is not None:
                self.on_checkpoint(epoch, stats)
            self.metrics.append(record)

        self.checkpointer.save_epoch(epoch, before_last)


def _updates(loader: DataLoader, updates: int, accum: int) -> Iterator[Iterator[Any]]:
    """The epoch's next `updates` updates, each as an iterator over its micro-batches.

    Lazy on both levels, so batches are loaded as the step consumes them, exactly when a flat
    loop over the loader would load them; an update is only started when its first batch came.
    """
    batches = _take(loader, updates * accum)
    for first in batches:
        yield itertools.chain([first], itertools.islice(batches, accum - 1))


def _take(loader: DataLoader, count: int) -> Iterator[Any]:
    """The loader's first `count` batches.

    When the loader holds more (a remainder of accumulation) this reads one batch past them
    before it stops. That read is kept on purpose: without loader workers the batch's
    augmentation draws from the global RNG that the next epoch continues from, so dropping it
    would change every later loss of such runs.
    """
    for i, batch in enumerate(loader):
        if i >= count:
            return
        yield batch
