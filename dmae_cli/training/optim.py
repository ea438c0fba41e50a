"""The optimizer and learning-rate schedule every stage trains with.

AdamW with no weight decay on biases and norms (or a stage's own parameter groups, e.g. layer
decay, or its own optimizer, e.g. LARS for a linear probe); the peak learning rate follows the
linear scaling rule lr = blr * effective batch / 256; the schedule is a linear warm-up and then
a cosine decay, advanced per optimizer update rather than per epoch, so it is as smooth for a
run of 3 epochs as for one of 800.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from dmae_cli.config.recipe import OptimConfig
from dmae_cli.runtime import distributed

# (param groups, peak lr) -> optimizer: a stage's replacement for AdamW.
MakeOptimizer = Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]


def base_lr(cfg: OptimConfig) -> float:
    """The peak learning rate: `lr` if given, else the linear scaling rule blr * batch / 256."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.blr * effective_batch(cfg) / 256


def effective_batch(cfg: OptimConfig) -> int:
    """Examples per optimizer update, over accumulation and every process."""
    return cfg.batch_size * cfg.accum_iter * distributed.world_size()


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    param_groups: list[dict[str, Any]] | None = None,
    make_optimizer: MakeOptimizer | None = None,
) -> torch.optim.Optimizer:
    """The run's optimizer at the peak lr: `make_optimizer` or AdamW, over `param_groups` or
    weight decay on every parameter except 1-D ones (biases, norms)."""
    groups = param_groups or param_groups_weight_decay(model, cfg.weight_decay)
    if make_optimizer is not None:
        return make_optimizer(groups, base_lr(cfg))
    return fused_adamw(groups, base_lr(cfg), cfg.betas)


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, updates_per_epoch: int
) -> CosineLRScheduler:
    """Linear warm-up from 0 over `warmup_epochs`, then cosine down to `min_lr` at the last
    update. Call `step_update(update)` before each update (0-based over the run): the schedule
    is a function of that number alone, which is what makes a resumed run's lr exact."""
    warmup = round(cfg.warmup_epochs * updates_per_epoch)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(cfg.epochs * updates_per_epoch - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def fused_adamw(groups: list[dict[str, Any]], lr: float, betas: Any) -> torch.optim.AdamW:
    """AdamW with its fused kernel: one pass over all parameters instead of a loop per tensor.

    Fused AdamW exists for CUDA and, since torch 2.4, for CPU, where it is about 3x faster than
    the default per-tensor loop (and `foreach` is slower than that loop); an older torch or
    another device gets the default implementation.
    """
    try:  # copies: a failed constructor leaves its defaults (fused=True) in the groups
        return torch.optim.AdamW([dict(g) for g in groups], lr=lr, betas=betas, fused=True)
    except RuntimeError:  # "fused=True requires all the params to be ... CUDA/CPU tensors"
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
