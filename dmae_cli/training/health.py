"""Numerical health of a training run: non-finite values stop it, gradient spikes are reported.

At each log point `HealthCheck.review` reads what the `EpochLog` recorded since the previous
one (one host sync). A non-finite loss or gradient norm stops training with the exact update,
before the epoch's checkpoint is written, so `last.pth` stays the last good state. A gradient
norm over `spike_factor` times its running average (`SpikeDetector`) is a spike: a warning
line, and the epoch's metrics count and list it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from rich.markup import escape

from dmae_cli.config.recipe import OptimConfig
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.metrics import EpochLog

SPIKE_FACTOR = 5.0  # a gradient norm this many times the running average is a spike
SPIKE_WARMUP = 20  # updates averaged before spikes are judged: early norms say little
SPIKE_DECAY = 0.98  # memory of the running average: about 50 updates

Spike = tuple[int, float, float]  # (update, 0-based over the run; norm; ratio to the average)


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class SpikeDetector:
    """Spots gradient-norm spikes: a norm above `factor` x the running average of earlier ones.

    The first `warmup` norms only build the average (their plain mean); after that it is an
    exponential moving average into which each norm enters capped at `factor` x the average,
    so one spike barely moves it while a lasting change of scale is followed within tens of
    updates. It lives as long as the trainer: a resumed run starts a fresh average.
    """

    factor: float = SPIKE_FACTOR
    warmup: int = SPIKE_WARMUP
    decay: float = SPIKE_DECAY
    average: float = 0.0
    seen: int = 0

    def observe(self, norm: float) -> float | None:
        """Take one finite gradient norm; its ratio to the running average if it is a spike."""
        self.seen += 1
        if self.seen <= self.warmup:
            self.average += (norm - self.average) / self.seen
            return None
        ratio = norm / max(self.average, 1e-12)  # an all-zero history: any norm is a spike
        capped = min(norm, self.factor * self.average)
        self.average = self.decay * self.average + (1 - self.decay) * capped
        return ratio if ratio > self.factor else None


@dataclass
class HealthCheck:
    """Reviews an epoch's log at the log points; its messages name the recipe keys to change."""

    cfg: OptimConfig
    peak_lr: float
    updates_per_epoch: int
    last: Path  # the checkpoint a divergence leaves in place
    section: str = ""  # the recipe section of `cfg` (e.g. "pretrain")
    spikes: SpikeDetector = field(default_factory=SpikeDetector)

    def review(self, log: EpochLog, epoch: int) -> float:
        """Read the losses and gradient norms recorded since the last log point (one host
        sync): stop at the first non-finite one, warn about spikes. Returns the loss sum."""
        base = epoch * self.updates_per_epoch + log.read_to  # the update the new values start at
        total, losses, norms = log.read()
        bad = _first_non_finite(losses)
        if bad is not None:
            self._diverged(f"loss became {losses[bad]}", base + bad // self.cfg.accum_iter, epoch)
        bad = _first_non_finite(norms)
        if bad is not None:
            self._diverged(f"the gradient norm became {norms[bad]}", base + bad, epoch)
        spikes = []
        for j, norm in enumerate(norms):
            ratio = self.spikes.observe(norm)
            if ratio is not None:
                spikes.append((base + j, norm, ratio))
        log.norm_values += norms
        log.spike_updates += [update + 1 for update, _, _ in spikes]
        if spikes:
            ui.info(f"[yellow]warning:[/] {escape(self._spike_message(spikes, epoch))}")
        return total

    def _spike_message(self, spikes: list[Spike], epoch: int) -> str:
        update, norm, ratio = max(spikes, key=lambda s: s[2])
        several = f"{len(spikes)} gradient-norm spikes, the largest" if len(spikes) > 1 else ""
        clip = self.cfg.clip_grad
        clipped = (
            f"clipped to {clip:g}"
            if clip is not None
            else f"not clipped ({self._key('clip_grad')} is unset)"
        )
        return (
            f"{several or 'gradient-norm spike'} at update {update + 1} (epoch {epoch}): norm "
            f"{norm:.3g}, {ratio:.1f}x the running average; {clipped}"
        )

    def _diverged(self, what: str, update: int, epoch: int) -> NoReturn:
        """Stop: `what` happened at `update` (0-based, over the run). Nothing of this epoch
        has been written, so the checkpoint on disk is the last good state."""
        if self.last.is_file():
            kept = f"the last good checkpoint {self.last} is kept"
            again = "and run the same command again to resume from it"
        else:
            kept, again = "no checkpoint was written yet", "and run again"
        raise TrainingDiverged(
            f"{what} at update {update + 1} (epoch {epoch}); {kept}; {self._lower_lr()} {again}"
        )

    def _lower_lr(self) -> str:
        """The advice after a divergence, naming the recipe keys to change."""
        if self.cfg.lr is not None:
            lr = f"lower {self._key('lr')} (now {self.cfg.lr:g})"
        else:
            lr = f"lower {self._key('blr')} (now {self.cfg.blr:g}, peak lr {self.peak_lr:.3g})"
        clip = self.cfg.clip_grad
        if clip is None:
            return f"{lr} or set {self._key('clip_grad')} (e.g. 1.0)"
        return f"{lr} or {self._key('clip_grad')} (now {clip:g})"

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name


def _first_non_finite(values: list[float]) -> int | None:
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
