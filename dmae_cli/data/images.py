"""Images from files or from memory, made into what a classifier was trained on.

A classifier adds noise at its data's native resolution (`ModelSpec.input_size`, the side of
the images its data set delivered) and with the data's channels, so an image to classify is
first brought there, as the data sets bring their own test images:

- channels: a picture is converted to grayscale (1 channel) or RGB (3 channels); an array or
  a tensor must have the model's channels already (a (H, W) array is one channel);
- size: an image of the model's side is used as it is. Otherwise its shorter side is resized
  (bicubic, antialiased when shrinking) and the centre cut out: to the side itself for small
  models (digits, CIFAR-10), to side * 256 / 224 first for models of `IMAGENET_FROM` pixels and
  more, whose data sets evaluate on that resize + centre crop (as MAE and DMAE do);
- values: floats in [0, 1]; 8-bit pictures are divided by 255, 16-bit ones by 65535.

Files are PNG or JPEG pictures (anything Pillow reads, EXIF rotation applied) or `.npy` arrays
of floats in [0, 1] (read without pickle), which keep exact pixels where a picture would round
them to 8 bits. Every problem with one file is a `UserError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dmae_cli.runtime.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")  # what a directory is searched for
IMAGENET_FROM = 96  # sides from here up are evaluated as ImageNet: resize to 256/224, crop
MAX_PIXELS = 1 << 28  # a picture larger than this is refused before it is decoded
MAX_NPY_BYTES = 1 << 30


def image_files(paths: Iterable[Path]) -> list[Path]:
    """`paths` in order, each directory replaced by its image files (sorted by name, not
    recursive). A path that does not exist is kept: reading it reports the problem."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            found.extend(sorted(p for p in inside if p.is_file()))
        else:
            found.append(path)
    return found


def fit(image: torch.Tensor, side: int) -> torch.Tensor:
    """A float (C, H, W) image at `side` x `side`: as it is, or resized and centre-cropped as
    the module docstring says. Values stay in [0, 1] (bicubic overshoots, hence the clamp)."""
    height, width = image.shape[-2:]
    if (height, width) == (side, side):
        return image
    target = round(side * 256 / 224) if side >= IMAGENET_FROM else side
    scale = target / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    shrinking = size[0] < height or size[1] < width
    resized = F.interpolate(
        image.unsqueeze(0).float(), size=size, mode="bicubic", antialias=shrinking
    ).clamp_(0.0, 1.0)[0]
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return resized[:, top : top + side, left : left + side].contiguous()


def from_picture(picture: Any, channels: int, side: int) -> torch.Tensor:
    """A Pillow image as the model's float (channels, side, side) tensor in [0, 1]."""
    from PIL import ImageOps

    if channels not in (1, 3):
        raise UserError(f"a picture has 1 or 3 channels; this model takes {channels}")
    picture = ImageOps.exif_transpose(picture)
    if picture.mode.startswith("I;16") or picture.mode == "I":  # 16-bit grayscale
        gray = np.asarray(picture, dtype=np.float32) / 65535.0
        pixels = np.repeat(gray[None], channels, axis=0)
    else:
        converted = np.asarray(picture.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        pixels = converted[None] if channels == 1 else converted.transpose(2, 0, 1)
        pixels = pixels.astype(np.float32) / 255.0
    return fit(torch.from_numpy(np.ascontiguousarray(pixels)).clamp_(0.0, 1.0), side)


def from_tensor(image: torch.Tensor, channels: int, side: int, what: str) -> torch.Tensor:
    """A float (C, H, W) image in [0, 1] with the model's channels, at `side` x `side`."""
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] != channels:
        raise UserError(
            f"{what}: shape {tuple(image.shape)}; this model takes ({channels}, H, W) images"
        )
    if not image.is_floating_point():
        raise UserError(f"{what}: {image.dtype} values; give floats in [0, 1]")
    image = image.float()
    if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
        raise UserError(f"{what}: values outside [0, 1] (or not finite); pixels are in [0, 1]")
    if min(image.shape[-2:]) < 1:
        raise UserError(f"{what}: an empty image, shape {tuple(image.shape)}")
    return fit(image, side)


def read_image(path: Path, channels: int, side: int) -> torch.Tensor:
    """The image in the file `path` as the model takes it (see the module docstring)."""
    if not path.is_file():
        raise UserError(f"{path}: {'a directory' if path.is_dir() else 'no such file'}")
    if path.suffix.lower() == ".npy":
        return from_tensor(torch.from_numpy(_read_npy(path)), channels, side, str(path))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if math.prod(picture.size) > MAX_PIXELS:
                raise UserError(f"{path}: {picture.size[0]}x{picture.size[1]} pixels, too large")
            picture.load()
            return from_picture(picture, channels, side)
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot decode the image ({exc})") from None


def _read_npy(path: Path) -> np.ndarray:
    if path.stat().st_size > MAX_NPY_BYTES:
        raise UserError(f"{path}: larger than {MAX_NPY_BYTES >> 20} MiB")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a NumPy array file without pickled objects ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise UserError(f"{path}: expected an array of floats in [0, 1], got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)
