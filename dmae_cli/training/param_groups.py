"""Parameter groups and optimizers of fine-tuning: layer-wise lr decay, and the linear probe.

Full fine-tuning uses AdamW (the trainer's default) over timm's layer-decay groups: each block's
lr is `layer_decay` times the next one's, so the pre-trained stem moves least and the new head
most. A linear probe trains only a BatchNorm + linear head on the frozen encoder, with LARS,
as MAE's probe does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.optim import Lars, param_groups_layer_decay

from dmae_cli.config.recipe import FinetuneConfig
from dmae_cli.models.classifier import Classifier
from dmae_cli.training.optim import MakeOptimizer


def optimisation(
    model: Classifier, cfg: FinetuneConfig
) -> tuple[list[dict[str, Any]], MakeOptimizer | None]:
    """(parameter groups, optimizer factory) for the trainer: None means its AdamW."""
    if cfg.linear_probe:
        return probe_groups(model, cfg.probe.weight_decay), lars(cfg.probe.momentum)
    return layer_decay_groups(model, cfg), None


def layer_decay_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """timm's layer-wise lr decay groups for the ViT (stem, blocks, head), as MAE/BEiT."""
    vit = model.vit
    groups = param_groups_layer_decay(
        vit,
        weight_decay=cfg.weight_decay,
        no_weight_decay_list=tuple(vit.no_weight_decay()),
        layer_decay=cfg.layer_decay,
    )
    # Head first: the trainer logs the lr of the first group, which should be the peak lr.
    return sorted(groups, key=lambda g: -g["lr_scale"])


def prepare_probe(model: Classifier) -> None:
    """Freeze everything but the (BatchNorm +) linear head; initialise it as MAE's probe."""
    model.requires_grad_(False)
    linear = model.vit.head[-1]
    linear.requires_grad_(True)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)


def probe_groups(model: Classifier, weight_decay: float) -> list[dict[str, Any]]:
    """LARS groups as MAE's: matrices trust-ratio adapted, biases not, no decay on biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]


def lars(momentum: float) -> MakeOptimizer:
    """LARS at the peak lr; matrices trust-ratio adapted, as `probe_groups` says."""

    def make(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        for group in groups:
            group["always_adapt"] = any(p.ndim > 1 for p in group["params"])
        return Lars(groups, lr=lr, momentum=momentum)

    return make
