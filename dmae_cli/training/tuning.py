"""What the two tuning stages share: fine-tuning a classifier (`training.finetune`) and tuning
a denoiser for a frozen classifier (`training.denoiser`).

Where the weights start (`finetune.init`), accuracy on the test split under pixel noise, and
best.pth, the checkpoint of the epoch with the best noisy accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from dmae_cli.config.recipe import Recipe
from dmae_cli.models.spec import ModelSpec
from dmae_cli.runtime import checkpoint, distributed, ui
from dmae_cli.runtime.errors import UserError

if TYPE_CHECKING:
    from dmae_cli.training.trainer import Trainer

BEST = "best.pth"


# -- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    sigma: float,
    *,
    seed: int,
    copies: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Clean accuracy and accuracy under N(0, sigma^2) pixel noise (`copies` draws per image).

    The noise comes from a generator seeded with `seed` at every call, so every evaluation of
    a run sees the same noise and the numbers are comparable across epochs. At sigma 0 the
    noisy accuracy is the clean one, and no copy is drawn.
    """
    device = next(model.parameters()).device
    copies = copies if sigma > 0 else 0
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros(2, dtype=torch.float64, device=device)  # clean, noisy
    total = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        noise = torch.randn((copies, *images.shape), generator=generator, device=device)
        batch = torch.cat([images, (images + sigma * noise).flatten(0, 1)])
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            hits = model(batch).argmax(-1) == labels.repeat(copies + 1)
        correct[0] += hits[: len(labels)].sum()
        correct[1] += hits[len(labels) :].sum() / copies if copies else hits.sum()
        total += len(labels)
    if distributed.is_distributed():
        stats = torch.cat([correct, total.view(1)])
        torch.distributed.all_reduce(stats)
        correct, total = stats[:2], stats[2]
    clean, noisy = (correct / total.clamp_min(1)).tolist()
    return {"acc_clean": clean, "acc_noisy": noisy}


# -- where the weights start -------------------------------------------------------------------
def init_label(recipe: Recipe) -> str:
    """Where the weights come from, for the checkpoint's meta (no file check)."""
    init = recipe.finetune.init
    if init is None:
        return str(recipe.stage_dir("pretrain") / "last.pth")
    return "random" if init.strip().lower() == "none" else init


def resolve_init(recipe: Recipe) -> Path | None:
    """The checkpoint to start from, or None for random initialisation."""
    init = recipe.finetune.init
    if init is not None and init.strip().lower() == "none":
        return None
    if init is None:
        path = recipe.stage_dir("pretrain") / "last.pth"
        if not path.is_file():
            raise UserError(
                f"no pretraining run at {path}: run 'dmae pretrain' with this recipe first, or "
                f"pass --init PATH (a DMAE/MAE/timm checkpoint) or --init none (random init)"
            )
        return path
    path = Path(init).expanduser()
    if path.is_dir():  # a pretraining run directory: its latest checkpoint
        if not (path / "last.pth").is_file():
            raise UserError(
                f"finetune.init: {path} is a directory without last.pth (no finished "
                f"pretraining epoch there); run 'dmae pretrain' into it first, or pass a "
                f"checkpoint file or --init none"
            )
        return path / "last.pth"
    if not path.is_file():
        raise UserError(f"finetune.init: {path}: checkpoint not found")
    return path


# -- the outputs ----------------------------------------------------------------------------
@dataclass
class SigmaRun:
    sigma: float
    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]  # epoch and accuracies of best.pth


def train_sigma(
    sigma: float,
    run_dir: Path,
    prepare: Callable[[], tuple[Trainer, BestKeeper]],
    stop_after: int | None = None,
) -> SigmaRun:
    """Train (or resume) one sigma's model into `run_dir`: `prepare` builds its trainer and
    best.pth keeper, on every rank, before the first step (a problem on any rank stops all)."""
    with distributed.agreed():
        trainer, keeper = prepare()
    trainer.distribute()
    try:
        history = trainer.fit(stop_after=stop_after)
    finally:
        trainer.close()
    return SigmaRun(sigma, run_dir, history, keeper.best or {})


@dataclass
class BestKeeper:
    """Writes best.pth (weights + meta, no optimizer) whenever noisy accuracy does not drop."""

    model: nn.Module  # the weights best.pth holds
    run_dir: Path
    spec: ModelSpec
    epochs: int
    label: str  # names the model in the epoch's line, e.g. sigma-0.25
    best: dict[str, Any] | None = None

    def restore(self) -> None:
        path = self.run_dir / BEST
        if path.is_file():
            self.best = checkpoint.load_checkpoint(path).get("metrics")

    def __call__(self, epoch: int, stats: dict[str, float]) -> None:
        if "acc_noisy" not in stats:
            return
        record = {"epoch": epoch, "acc_clean": stats["acc_clean"], "acc_noisy": stats["acc_noisy"]}
        if self.best is None or record["acc_noisy"] >= self.best["acc_noisy"]:
            self.best = record
            state = {"model": self.model.state_dict(), "meta": self.spec.to_dict(), "epoch": epoch}
            checkpoint.save_checkpoint(self.run_dir / BEST, {**state, "metrics": record})
        ui.info(
            f"{self.label} epoch {epoch + 1}/{self.epochs}: "
            f"clean {record['acc_clean']:.1%}, noisy {record['acc_noisy']:.1%} "
            f"(best {self.best['acc_noisy']:.1%} at epoch {self.best['epoch'] + 1})"
        )
