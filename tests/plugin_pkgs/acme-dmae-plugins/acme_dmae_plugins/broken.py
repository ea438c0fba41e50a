"""Plugins that break their contracts, one way each: dmae must contain every one of them."""

from __future__ import annotations

from typing import Any

import torch

from acme_dmae_plugins.datasets import Blobs


class HWCBlobs(Blobs):
    """Blobs whose images come channels-last, (H, W, C): a contract violation."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].permute(1, 2, 0), int(self.labels[index])


def blobs_hwc(split: str, *, root: str | None, image_size: int = 8, augment: bool) -> HWCBlobs:
    """Blobs in the wrong layout (H, W, C)."""
    return HWCBlobs(split, image_size, 16)


def blobs_buggy(split: str, *, root: str | None, image_size: int = 8, augment: bool) -> Blobs:
    """Blobs with a bug: the factory looks up a key that is not there."""
    return {"test": Blobs, "val": Blobs}[split](split, image_size, 16)


def vit_raising(*, img_size: int, patch_size: int, in_chans: int, **overrides: Any) -> Any:
    """A backbone whose factory fails with a bug of its own."""
    raise RuntimeError("CUDA kernels for vit_raising are not compiled")


class RaisingCertifier:
    """A certifier factory that fails with a bug of its own."""

    def __init__(self) -> None:
        raise RuntimeError("licence file not found")


class BuggyCertifier:
    """A certifier whose sampling code fails after its first draw."""

    name = "buggy"

    def certify(self, request: Any) -> Any:
        yield request.n0
        raise ZeroDivisionError("division by zero")

    def predict(self, request: Any) -> Any:
        return (yield request.n0).argmax().item()
