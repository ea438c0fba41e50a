"""CIFAR-10 read from the standard local `cifar-10-batches-py` directory; never downloaded.

The official "python version" is a set of pickles (`data_batch_1` .. `data_batch_5`,
`test_batch`, `batches.meta`). Unpickling runs code named by the file, so a plain `pickle.load`
on a user-supplied path is arbitrary code execution. The batches only need dicts, lists, bytes,
str, ints and numpy uint8 arrays, so they are read with an unpickler that resolves exactly the
three globals a numpy array needs and refuses every other one.

The whole split is kept as one uint8 (N, 3, 32, 32) tensor (150 MB for train); items are
converted to float in [0, 1] one at a time.
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmae_cli.api import DatasetInfo
from dmae_cli.runtime.errors import UserError
from dmae_plugins.datasets._common import (
    InMemoryImages,
    check_image_size,
    check_options,
    fingerprint,
    normalize_split,
    random_hflip,
    random_translate,
    require_root,
    resize,
)

try:  # numpy >= 2 moved the module; the old name still appears inside the files themselves
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

NAME = "cifar10"
DIRNAME = "cifar-10-batches-py"
NATIVE_SIZE = 32
CHANNELS = 3
PADDING = 4  # the standard CIFAR augmentation: random crop 32 with padding 4, plus a flip
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META_FILE = "batches.meta"
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean and std of the 50,000 training images' pixels in [0, 1] (the std over all
# pixels, not the often-quoted (0.2023, 0.1994, 0.2010), which averages per-image stds).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
OPTIONS: dict[str, type] = {}

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else that names a global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def safe_load(path: Path) -> Any:
    """Unpickle a CIFAR batch file (Python 2 format, hence `encoding="bytes"`) safely."""
    try:
        with path.open("rb") as f:
            return SafeUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise UserError(f"{str(path)!r} is not a readable CIFAR-10 python batch: {exc}") from exc


def _field(batch: Any, key: str, path: Path) -> Any:
    """`batch[key]`, whether the file was pickled by Python 2 (bytes keys) or 3 (str keys)."""
    if isinstance(batch, dict):
        for candidate in (key.encode(), key):
            if candidate in batch:
                return batch[candidate]
    raise UserError(f"{str(path)!r} is not a CIFAR-10 python batch: no '{key}' entry")


def batch_dir(root: str | Path | None) -> Path:
    """The `cifar-10-batches-py` directory: `root` itself or its child of that name."""
    base = require_root(NAME, root, f"a {DIRNAME} directory (or its parent)")
    child = base / DIRNAME
    return child if child.is_dir() else base


def read_batches(directory: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,) from the named batch files."""
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UserError(
            f"dataset '{NAME}': {str(directory)!r} lacks {', '.join(missing)}; expected the "
            f"extracted {DIRNAME} directory (data_batch_1..5, test_batch, batches.meta)"
        )
    images, labels = [], []
    for name in names:
        path = directory / name
        batch = safe_load(path)
        data = np.asarray(_field(batch, "data", path))
        batch_labels = np.asarray(_field(batch, "labels", path), dtype=np.int64)
        expected_shape = (batch_labels.shape[0], CHANNELS * NATIVE_SIZE * NATIVE_SIZE)
        if data.dtype != np.uint8 or data.shape != expected_shape:
            raise UserError(
                f"{str(path)!r}: expected uint8 data of shape {expected_shape}, "
                f"got {data.dtype} {data.shape}"
            )
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(CLASS_NAMES)):
            raise UserError(f"{str(path)!r}: labels outside 0..{len(CLASS_NAMES) - 1}")
        images.append(data.reshape(-1, CHANNELS, NATIVE_SIZE, NATIVE_SIZE))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def class_names(directory: Path) -> tuple[str, ...]:
    """The label names from `batches.meta` when present, else the standard ten."""
    path = directory / META_FILE
    if not path.is_file():
        return CLASS_NAMES
    names = _field(safe_load(path), "label_names", path)
    decoded = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(decoded) != len(CLASS_NAMES):
        raise UserError(
            f"{str(path)!r}: expected {len(CLASS_NAMES)} label names, got {len(decoded)}"
        )
    return decoded


def _transform(augment: bool, image_size: int) -> Any:
    """Per-item pipeline on a float (3, 32, 32) image: crop-with-padding + flip, then resize."""
    steps: list[Any] = []
    if augment:
        steps += [partial(random_translate, max_shift=PADDING), random_hflip]
    if image_size != NATIVE_SIZE:
        steps.append(partial(resize, size=image_size))
    if not steps:
        return None

    def apply(image: torch.Tensor) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return image

    return apply


def cifar10(
    split: str,
    *,
    root: str | None = None,
    image_size: int = NATIVE_SIZE,
    augment: bool = False,
    **options: Any,
) -> InMemoryImages:
    """CIFAR-10 `split` ("train", "test" or "val") from `root`, delivered at `image_size`.

    `root` is the extracted `cifar-10-batches-py` directory or its parent. With `augment`, each
    item is randomly cropped (padding 4, zero fill) and flipped; when `image_size` is not 32 the
    result is resized bicubically afterwards. No options are accepted.
    """
    split = normalize_split(NAME, split)
    image_size = check_image_size(NAME, image_size)
    check_options(NAME, options, OPTIONS)
    directory = batch_dir(root)
    images, labels = read_batches(directory, FILES[split])
    info = DatasetInfo(
        num_classes=len(CLASS_NAMES),
        image_size=image_size,
        channels=CHANNELS,
        mean=MEAN,
        std=STD,
        class_names=class_names(directory),
        fingerprint=fingerprint(NAME, split, image_size, images, labels),
    )
    return InMemoryImages(
        torch.from_numpy(images), torch.from_numpy(labels), info, _transform(augment, image_size)
    )
