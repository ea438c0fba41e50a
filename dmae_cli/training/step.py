"""One optimizer update: the forward and backward passes of its micro-batches, then the step.

`train_step` is a plain function of the model, the loss, the micro-batches and the optimizer; it
knows nothing of epochs, logging or checkpoints. It returns the losses and the gradient norm as
device tensors: reading them would stall the device until the update is done, so the caller
reads them in batches, every few updates (see `metrics.EpochLog`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.runtime.precision import autocast

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class StepResult:
    """What one update leaves for the log, all without a host sync."""

    losses: torch.Tensor  # (micro-batches,) float32 on the device: each micro-batch's loss
    grad_norm: torch.Tensor | None  # before clipping; None: too few micro-batches, no update
    examples: int  # examples seen on this process (shapes are host-side: no sync)


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    accum: int,
    clip_grad: float | None,
    amp_dtype: torch.dtype | None,
    device: torch.device,
) -> StepResult | None:
    """Accumulate the gradients of `accum` micro-batches, clip them and step the optimizer.

    `micro_batches` is consumed lazily, one batch per forward pass, so loading interleaves with
    compute (and any randomness in loading is drawn in the same order as the loss's own). Each
    micro-batch's loss is divided by `accum`, so the update is that of one batch `accum` times
    as large. Fewer than `accum` micro-batches (a data set that ran out early) are run forward
    and backward but not stepped: their gradients are dropped when the next epoch starts.
    None when there was no micro-batch at all.
    """
    losses: list[torch.Tensor] = []
    examples = 0
    for k, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        # DDP all-reduces gradients only on the micro-batch that completes an update.
        sync = k == accum - 1 or not hasattr(model, "no_sync")
        with autocast(amp_dtype, device), nullcontext() if sync else model.no_sync():
            loss = loss_fn(model, batch)
            (loss / accum).backward()
        losses.append(loss.detach().float())
        examples += batch_len(batch)
    if not losses:
        return None
    norm = optimizer_step(model, optimizer, clip_grad) if len(losses) == accum else None
    return StepResult(torch.stack(losses), norm, examples)


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None
) -> torch.Tensor:
    """Clip (when configured), step and zero the gradients; returns the gradient norm before
    clipping, as a device tensor (reading it would cost a host sync)."""
    if clip_grad is not None:
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm(grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch onto `device`; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def batch_len(batch: Any) -> int:
    """Examples in a batch: the leading dimension of its first tensor."""
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, "module") else model
