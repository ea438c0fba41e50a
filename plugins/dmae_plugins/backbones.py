"""ViT backbones with the DMAE paper's shapes, built on timm's `VisionTransformer`.

Each factory returns a headless encoder (`num_classes=0`) that DMAE wraps for pre-training and
the classifier reuses for fine-tuning. `img_size`, `patch_size` and `in_chans` follow the data;
any other timm `VisionTransformer` argument (`embed_dim`, `depth`, `drop_path_rate`, ...) may be
overridden, which is how recipes shrink a model for tests and the embedded data set.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


def _vit(
    *,
    img_size: int,
    in_chans: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    **overrides: Any,
) -> VisionTransformer:
    kwargs: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="token",
    )
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def vit_tiny(
    *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, **kw: Any
) -> VisionTransformer:
    """ViT-Ti (Touvron et al. 2021): width 192, depth 12, 3 heads. For tests and the demo."""
    base = dict(embed_dim=192, depth=12, num_heads=3) | kw
    return _vit(img_size=img_size, in_chans=in_chans, patch_size=patch_size, **base)


def vit_small(
    *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, **kw: Any
) -> VisionTransformer:
    """ViT-S (Touvron et al. 2021): width 384, depth 12, 6 heads."""
    base = dict(embed_dim=384, depth=12, num_heads=6) | kw
    return _vit(img_size=img_size, in_chans=in_chans, patch_size=patch_size, **base)


def vit_base_patch16(
    *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, **kw: Any
) -> VisionTransformer:
    """ViT-B/16 (Dosovitskiy et al. 2021): width 768, depth 12, 12 heads; DMAE-Base."""
    base = dict(embed_dim=768, depth=12, num_heads=12) | kw
    return _vit(img_size=img_size, in_chans=in_chans, patch_size=patch_size, **base)


def vit_large_patch16(
    *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, **kw: Any
) -> VisionTransformer:
    """ViT-L/16 (Dosovitskiy et al. 2021): width 1024, depth 24, 16 heads; DMAE-Large."""
    base = dict(embed_dim=1024, depth=24, num_heads=16) | kw
    return _vit(img_size=img_size, in_chans=in_chans, patch_size=patch_size, **base)


def vit_huge_patch14(
    *, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, **kw: Any
) -> VisionTransformer:
    """ViT-H/14 (Dosovitskiy et al. 2021): width 1280, depth 32, 16 heads."""
    base = dict(embed_dim=1280, depth=32, num_heads=16) | kw
    return _vit(img_size=img_size, in_chans=in_chans, patch_size=patch_size, **base)
