"""The embedded default data set: scikit-learn's handwritten digits, upsampled.

`load_digits()` ships inside scikit-learn (1,797 grayscale 8x8 images, values 0..16, classes
0-9), so the whole pipeline runs anywhere in minutes without a download. The train/test split
is a fixed stratified 80/20 split (360 test images) drawn with `split_seed`, deliberately not
the run's seed: every run, whatever its seed, must train and certify on the same images.

Images are upsampled once at construction to `image_size` (bicubic, clamped to [0, 1]) and kept
as one tensor, so an item costs a tensor index plus, when augmenting, one random translation.
"""

from __future__ import annotations

import warnings
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch

from dmae_cli.api import DatasetInfo
from dmae_plugins.datasets._common import (
    InMemoryImages,
    check_image_size,
    check_options,
    fingerprint,
    normalize_split,
    random_translate,
    resize,
)

NAME = "digits"
NATIVE_SIZE = 8
MAX_VALUE = 16.0  # load_digits pixels are integers 0..16
TEST_FRACTION = 0.2
CLASS_NAMES = tuple(str(d) for d in range(10))
OPTIONS: dict[str, type] = {"split_seed": int, "max_shift": int}


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as float32 (N, 8, 8) in [0, 1] and their int64 labels; read once."""
    from sklearn.datasets import load_digits  # imported here: sklearn takes a second to import

    bunch = load_digits()
    images = (bunch.images / MAX_VALUE).astype(np.float32)
    return images, bunch.target.astype(np.int64)


@lru_cache(maxsize=8)
def split_indices(split_seed: int = 0) -> dict[str, np.ndarray]:
    """The sorted indices of the stratified train and test splits for `split_seed`."""
    from sklearn.model_selection import train_test_split

    _, labels = _raw()
    train, test = train_test_split(
        np.arange(labels.shape[0]),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=split_seed,
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def train_statistics(split_seed: int = 0) -> tuple[float, float]:
    """Pixel mean and std of the train split's 8x8 originals, rounded to 4 decimals.

    Computed (not hard-coded) from the native pixels, so it does not depend on `image_size`;
    bicubic upsampling barely moves either number. Rounded so that checkpoints record tidy
    values. For split_seed 0 they are 0.3054 and 0.3761.
    """
    images, _ = _raw()
    train = images[split_indices(split_seed)["train"]].astype(np.float64)
    return round(float(train.mean()), 4), round(float(train.std()), 4)


def _translate_transform(max_shift: int) -> Any:
    """The training augmentation: a random shift of up to `max_shift` pixels, never a flip.

    Digits are not mirror-symmetric (a flipped 2 or 7 is no digit), so the only augmentation is
    a small translation with black fill, which is also what digits' background is.
    """
    return partial(random_translate, max_shift=max_shift)


def digits(
    split: str,
    *,
    root: str | None = None,
    image_size: int = 16,
    augment: bool = False,
    **options: Any,
) -> InMemoryImages:
    """The digits `split` ("train", "test" or "val") delivered at `image_size` x `image_size`.

    `root` is ignored, with a warning: the data is embedded. Options: `split_seed` (int,
    default 0) chooses the train/test split; `max_shift` (int, default image_size // 8, at
    least 1) bounds the random translation used when `augment` is true (0 turns it off).
    """
    if root is not None:  # embedded data set: nothing to read from disk, but say so
        warnings.warn(f"dataset '{NAME}' is embedded; data.root={root!r} is ignored", stacklevel=2)
    split = normalize_split(NAME, split)
    image_size = check_image_size(NAME, image_size)
    opts = check_options(NAME, options, OPTIONS)
    split_seed = opts.get("split_seed", 0)
    max_shift = opts.get("max_shift", max(1, image_size // 8))

    images, labels = _raw()
    indices = split_indices(split_seed)[split]
    pixels = resize(torch.from_numpy(images[indices]).unsqueeze(1), image_size).contiguous()
    split_labels = torch.from_numpy(labels[indices])
    mean, std = train_statistics(split_seed)
    info = DatasetInfo(
        num_classes=len(CLASS_NAMES),
        image_size=image_size,
        channels=1,
        mean=(mean,),
        std=(std,),
        class_names=CLASS_NAMES,
        fingerprint=fingerprint(NAME, split, split_seed, image_size, indices, labels[indices]),
    )
    transform = _translate_transform(max_shift) if augment and max_shift > 0 else None
    return InMemoryImages(pixels, split_labels, info, transform)
