"""Datasets that need no download: dark and bright blobs, and the same read from a folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from dmae_cli.api import DatasetInfo, PluginError

SPLITS = {"train": 0, "test": 1, "val": 1}


class Blobs(Dataset):
    """Two classes of random one-channel images, dark or bright."""

    def __init__(self, split: str, image_size: int, size: int) -> None:
        if split not in SPLITS:
            raise PluginError(f"blobs: unknown split {split!r}; use train, test or val")
        g = torch.Generator().manual_seed(SPLITS[split])
        self.labels = torch.randint(0, 2, (size,), generator=g)
        base = 0.25 + 0.5 * self.labels.float()
        noise = 0.05 * torch.randn(size, 1, image_size, image_size, generator=g)
        self.images = (base[:, None, None, None] + noise).clamp(0, 1)
        self.info = DatasetInfo(
            num_classes=2,
            image_size=image_size,
            channels=1,
            mean=(0.5,),
            std=(0.27,),
            class_names=("dark", "bright"),
            fingerprint=f"blobs-{split}-{size}-{image_size}",
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def blobs(
    split: str, *, root: str | None, image_size: int = 8, augment: bool, size: int = 64
) -> Blobs:
    """Dark and bright blobs: two classes, no files needed."""
    if size < 1:
        raise PluginError(f"blobs: size must be at least 1, not {size}")
    return Blobs(split, image_size, size)


def idx(split: str, *, root: str | None, image_size: int = 8, augment: bool) -> Blobs:
    """Blobs kept in a folder: data.root must name an existing directory."""
    if root is None or not Path(root).is_dir():
        raise PluginError(f"data.root {root} is not a directory")
    return Blobs(split, image_size, 32)
