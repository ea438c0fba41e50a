"""The ViT backbone of every model, built by name from the backbone registry."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from dmae_cli.plugins import registry
from dmae_cli.runtime.errors import UserError


def build_backbone(
    name: str, *, img_size: int, patch_size: int, in_chans: int, **overrides: Any
) -> nn.Module:
    """A backbone from the registry; wrong overrides for the factory become one clear line."""
    factory = registry.backbones.get(name)
    try:
        return factory(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **overrides)
    except (TypeError, ValueError, AssertionError) as exc:  # timm asserts its shapes
        raise UserError(f"backbone '{name}' rejected its options {overrides}: {exc}") from exc
