"""What the `webdataset` plugin's stream reads: a shard opened as a plain file (or, only where
the user typed one, through webdataset's URL opener) and a sample's members decoded."""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "npy")


LABEL_KEY = "cls"


# -- decoding ------------------------------------------------------------------------------------
def decode_image(sample: dict[str, Any], channels: int) -> Image.Image | torch.Tensor:
    """The sample's image: a PIL image in the right mode, or a float tensor from npy."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise KeyError(f"no image member ({', '.join(IMAGE_KEYS)})")
    if key == "npy":
        array = np.load(io.BytesIO(sample[key]), allow_pickle=False)
        if array.ndim != 3 or array.shape[0] != channels or array.dtype.kind != "f":
            raise ValueError(f"npy image of shape {array.shape} {array.dtype}, not float (C,H,W)")
        return torch.from_numpy(array.astype(np.float32, copy=False)).clamp_(0.0, 1.0)
    with Image.open(io.BytesIO(sample[key])) as image:
        return image.convert("L" if channels == 1 else "RGB")  # convert() decodes fully here


def decode_label(sample: dict[str, Any], num_classes: int) -> int:
    label = int(sample[LABEL_KEY].decode("ascii").strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    return label


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def local_path(url: str) -> Path | None:
    """The file behind a local path or `file:` URL; None for anything streamed."""
    if url.startswith("file:"):
        return Path(url[len("file:") :].removeprefix("//"))
    return Path(url).expanduser() if is_local(url) else None


def open_shard(url: str) -> IO[bytes]:
    """A local shard (a path or `file:` URL, which is all a manifest can name) opened as a
    plain file; only a source the user typed (`pipe:`, `http://`...) goes through webdataset's
    URL opener."""
    from webdataset import gopen

    path = local_path(url)
    return path.open("rb") if path is not None else gopen(url, "rb")
