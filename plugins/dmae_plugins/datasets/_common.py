"""Helpers shared by the first-party dataset plugins.

Every plugin must answer the same user mistakes the same way (a bad split name, an unknown
option, a missing directory), count and report corrupt data the same way (`SkipCounter`,
`DataError`) and fingerprint its split the same way, so those rules live here once. The tensor
helpers are the cheap augmentations the in-memory data sets share: they work on one (C, H, W)
image and cost a few microseconds, which matters when a CPU run spends most of its
time in `__getitem__`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dmae_cli.api import DatasetInfo, PluginError

SPLITS = {"train": "train", "test": "test", "val": "test"}
FINGERPRINT_CHARS = 16
SKIP_SLOTS = 256  # one shared counter per DataLoader worker (mod SKIP_SLOTS): no lost updates


# -- corrupt data ----------------------------------------------------------------------------
class DataError(PluginError):
    """Corrupt data under `strict: true`: one line, even when raised in a DataLoader worker.

    torch re-raises a worker's exception in the main process as `type(exc)(message)`, where the
    message is "Caught DataError in DataLoader worker process N.\\nOriginal Traceback ...";
    keeping only the original last line is what lets the CLI print one line.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_original_message(message, type(self).__name__))


def _original_message(message: str, name: str) -> str:
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]
    raised, sep, original = last.partition(": ")
    return original if sep and raised.endswith(name) else message


class SkipCounter:
    """How many corrupt items were skipped, in this process and in its DataLoader workers.

    The counts live in shared memory, one slot per worker (the main process has its own), so
    a worker's skips reach the trainer, which reports them in metrics.jsonl as `skipped`.
    """

    def __init__(self) -> None:
        self._slots = torch.zeros(SKIP_SLOTS, dtype=torch.int64).share_memory_()

    def add(self) -> None:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (SKIP_SLOTS - 1)
        self._slots[slot] += 1

    @property
    def total(self) -> int:
        return int(self._slots.sum())


# -- arguments -------------------------------------------------------------------------------
def normalize_split(dataset: str, split: str) -> str:
    """Map "train" / "test" / "val" to "train" or "test"; anything else is a user mistake."""
    if isinstance(split, str) and split in SPLITS:
        return SPLITS[split]
    raise PluginError(
        f"dataset '{dataset}': unknown split {split!r}; expected 'train', 'test' or 'val'"
    )


def check_image_size(dataset: str, image_size: Any) -> int:
    """The delivered side must be a positive int (a bool is not a size)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise PluginError(
            f"dataset '{dataset}': image_size must be a positive integer, got {image_size!r}"
        )
    return image_size


def check_options(
    dataset: str, options: Mapping[str, Any], allowed: Mapping[str, type]
) -> dict[str, Any]:
    """Refuse unknown options and wrongly typed values, naming the option.

    A misspelt option silently ignored would train on the wrong data without a word, so every
    key must be one the plugin knows. `allowed` maps each option to the type its value must have.
    """
    for key, value in options.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise PluginError(
                f"dataset '{dataset}': unknown option '{key}' (known options: {known})"
            )
        expected = allowed[key]
        wrong_bool = isinstance(value, bool) and expected is not bool
        if wrong_bool or not isinstance(value, expected):
            raise PluginError(
                f"dataset '{dataset}': option '{key}' must be of type {expected.__name__}, "
                f"got {value!r}"
            )
    return dict(options)


def require_root(dataset: str, root: str | Path | None, expected: str) -> Path:
    """The data's local directory; never downloaded, so a missing one is the user's to fix."""
    if root is None or str(root) == "":
        raise PluginError(f"dataset '{dataset}' needs data.root: a local directory with {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise PluginError(
            f"dataset '{dataset}': root {str(path)!r} is not a directory; expected {expected}"
        )
    return path


# -- fingerprints ----------------------------------------------------------------------------
def _part_bytes(part: object) -> bytes:
    """A canonical byte string for one fingerprint part (arrays by dtype, shape and content)."""
    if isinstance(part, torch.Tensor):
        part = part.detach().cpu().contiguous().numpy()
    if isinstance(part, np.ndarray):
        array = np.ascontiguousarray(part)
        header = f"{array.dtype.str}{array.shape}".encode()
        return header + memoryview(array).cast("B").tobytes()
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode("utf-8")
    if isinstance(part, (list, tuple)):
        return b"[" + b"".join(_framed(p) for p in part) + b"]"
    return repr(part).encode("utf-8")


def _framed(part: object) -> bytes:
    """Prefix a part with its length so that ("ab", "c") and ("a", "bc") hash differently."""
    data = _part_bytes(part)
    return len(data).to_bytes(8, "little") + data


def fingerprint(*parts: object) -> str:
    """A short sha256 hex naming the exact contents of a split, recorded in checkpoints.

    Callers pass what defines the split (data set name, split, sizes, indices or file list,
    labels, pixels where cheap). It is hashed from the source data rather than from resized
    pixels so that it does not change with the floating-point details of a torch version.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_framed(part))
    return digest.hexdigest()[:FINGERPRINT_CHARS]


# -- tensors ---------------------------------------------------------------------------------
def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of (C, H, W) or (N, C, H, W) float images to size x size, kept in [0, 1].

    Upsampling uses no antialiasing (the kernel alone is exact there); downsampling turns it on,
    since without it small images alias badly. Bicubic overshoots, hence the clamp.
    """
    batched = images.dim() == 4
    batch = images if batched else images.unsqueeze(0)
    if batch.shape[-2:] == (size, size):
        return images
    downsampling = size < max(batch.shape[-2:])
    out = F.interpolate(
        batch.float(),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
        antialias=downsampling,
    ).clamp_(0.0, 1.0)
    return out if batched else out.squeeze(0)


def random_translate(image: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift a (C, H, W) image by up to `max_shift` pixels each way, filling with zeros.

    The same as torchvision's RandomCrop(size, padding=max_shift) but about twice as fast on small
    tensors (one pad, one slice, no parameter plumbing). Draws from torch's global generator, so
    `torch.manual_seed` and DataLoader worker seeding make it reproducible.
    """
    if max_shift <= 0:
        return image
    height, width = image.shape[-2:]
    top, left = torch.randint(0, 2 * max_shift + 1, (2,)).tolist()
    padded = F.pad(image, (max_shift, max_shift, max_shift, max_shift))
    return padded[..., top : top + height, left : left + width].contiguous()


def random_hflip(image: torch.Tensor) -> torch.Tensor:
    """Mirror a (C, H, W) image left-right with probability 1/2 (global torch generator)."""
    if torch.randint(0, 2, ()).item():
        return image.flip(-1)
    return image


# -- the in-memory data set ------------------------------------------------------------------
class InMemoryImages(Dataset):
    """Images held as one (N, C, H, W) tensor with int labels, transformed per item.

    Shared by the small data sets (digits, CIFAR-10) that fit in memory: indexing a tensor is
    the cheapest way to serve an item. `images` are float32 in [0, 1] or uint8 in [0, 255];
    `transform` maps one float (C, H, W) image to the delivered one (augmentation, resize).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        transform: Any = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.info = info
        self.transform = transform
        self._labels = self.labels.tolist()  # a list indexes faster than a tensor per item

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        # Always a fresh tensor: callers may add noise in place, which must not reach the store.
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.clone()
        if self.transform is not None:
            image = self.transform(image)
        return image, self._labels[index]
