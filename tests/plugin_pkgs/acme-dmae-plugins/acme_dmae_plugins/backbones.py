"""A backbone the size of a test: timm's VisionTransformer, 32 wide and 2 deep."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer


def vit_pico(
    *, img_size: int = 16, patch_size: int = 4, in_chans: int = 3, **overrides: Any
) -> VisionTransformer:
    """ViT-Pico: width 32, depth 2, 2 heads. For tests."""
    # dmae passes num_classes, global_pool and drop_path_rate when it builds a classifier:
    # they are defaults here, never fixed arguments, or the call would name them twice.
    kwargs: dict[str, Any] = dict(
        embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="token"
    )
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, **(kwargs | overrides)
    )
