"""The ViT backbone of every model, built by name from the backbone registry."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from dmae_cli.plugins import boundary


def build_backbone(
    name: str, *, img_size: int, patch_size: int, in_chans: int, **overrides: Any
) -> nn.Module:
    """A backbone from the registry. What its factory raises, options it cannot take and an
    object that is no ViT end in one line naming the plugin (plugins/boundary.py)."""
    return boundary.build_backbone(
        name, img_size=img_size, patch_size=patch_size, in_chans=in_chans, **overrides
    )
