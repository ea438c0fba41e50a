"""The `webdataset` plugin's augmentation: stored images to float (C, H, W) in [0, 1] at the
delivered size, in the style of imagefolder (ImageNet-size) or of digits and CIFAR-10 (small).
The module docstring of `webdataset.py` describes the options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dmae_cli.api import PluginError
from dmae_plugins.datasets._common import random_hflip, random_translate, resize
from dmae_plugins.datasets._shard_stream import NAME
from dmae_plugins.datasets.imagefolder import build_transform

IMAGENET_STYLE_FROM = 96  # delivered sides from here up get RandomResizedCrop augmentation


AUGMENTATIONS = ("auto", "imagenet", "light", "none")


# -- augmentation ------------------------------------------------------------------------------
def to_float(image: Image.Image) -> torch.Tensor:
    """A PIL image as float (C, H, W) in [0, 1], converted as imagefolder converts its files."""
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)


def image_side(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return image.height, image.width


class ImagenetTransform:
    """imagefolder's transforms; evaluation leaves an image of the delivered size as it is
    (`dmae shard` stored imagefolder's centre crop already: cropping it again would zoom)."""

    def __init__(self, image_size: int, augment: bool) -> None:
        self.image_size = image_size
        self.augment = augment
        self.pipeline = build_transform(image_size, augment)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if not self.augment and image_side(image) == (size, size):
            out = image if isinstance(image, torch.Tensor) else to_float(image)
        else:
            out = self.pipeline(image).as_subclass(torch.Tensor)
        return out.clamp_(0.0, 1.0)  # bicubic on float (npy) input overshoots


@dataclass(frozen=True)
class LightTransform:
    """digits / CIFAR-10 style: translate (+ flip) at the stored size, then resize if needed."""

    image_size: int
    augment: bool
    max_shift: int | None  # None: an eighth of the stored side, at least 1
    hflip: bool

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        out = image if isinstance(image, torch.Tensor) else to_float(image)
        if self.augment:
            shift = max(1, out.shape[-1] // 8) if self.max_shift is None else self.max_shift
            out = random_translate(out, shift)
            if self.hflip:
                out = random_hflip(out)
        return resize(out, self.image_size)


def make_transform(opts: dict[str, Any], image_size: int, augment: bool, channels: int) -> Any:
    style = opts.get("augmentation", "auto")
    if style not in AUGMENTATIONS:
        raise PluginError(
            f"dataset '{NAME}': option augmentation must be one of {', '.join(AUGMENTATIONS)}, "
            f"got {style!r}"
        )
    if style == "auto":
        style = "imagenet" if image_size >= IMAGENET_STYLE_FROM else "light"
    if style == "imagenet":
        return ImagenetTransform(image_size, augment)
    hflip = opts.get("hflip", channels == 3)  # glyphs (1 channel) are not mirror-symmetric
    return LightTransform(image_size, augment and style == "light", opts.get("max_shift"), hflip)
