"""A model's self-description, stored in every checkpoint so that a model can be rebuilt
without the recipe that trained it."""

from __future__ import annotations

from typing import Any

from dmae_cli import __version__
from dmae_cli.api import DatasetInfo
from dmae_cli.config.recipe import Recipe


def model_meta(recipe: Recipe, info: DatasetInfo) -> dict[str, Any]:
    """What a checkpoint needs to describe its model without the recipe."""
    m = recipe.model
    return {
        "dmae_version": __version__,
        "backbone": m.backbone,
        "backbone_options": dict(m.options),
        "image_size": m.image_size,
        "patch_size": m.patch_size,
        "input_size": info.image_size,
        "channels": info.channels,
        "mean": list(info.mean),
        "std": list(info.std),
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "dataset": recipe.data.dataset,
        "data_fingerprint": info.fingerprint,
    }
