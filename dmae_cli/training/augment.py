"""Training-set augmentation beyond the data set's own: timm's RandAugment and random erasing.

They are what MAE's fine-tuning uses on ImageNet; they do nothing useful on 8-32 px images,
so smaller data sets ignore them with a warning, as a linear probe ignores every augmentation
setting (MAE's probe uses none).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from dmae_cli.api import DatasetInfo
from dmae_cli.config.recipe import FinetuneConfig

AUGMENT_MIN_SIZE = 64  # RandAugment / random erasing are for ImageNet-size crops, not 8-32 px


class ConfigIgnoredWarning(UserWarning):
    """A recipe value that has no effect in this run."""


def _ignored(message: str) -> None:
    # stacklevel 3: the warning names the stage function that called the check.
    warnings.warn(message, ConfigIgnoredWarning, stacklevel=3)


def apply_timm_augmentation(dataset: Any, cfg: FinetuneConfig, info: DatasetInfo) -> None:
    """RandAugment and random erasing through timm's `create_transform`, as MAE fine-tuning.

    They replace the data set's own training transform, which needs an ImageNet-size data set
    that exposes one (`transform`); anywhere else the values are ignored with a warning.
    """
    if not cfg.auto_augment and cfg.reprob == 0:
        return
    if info.image_size < AUGMENT_MIN_SIZE or not hasattr(dataset, "transform"):
        _ignored(
            f"finetune.auto_augment / finetune.reprob are ignored: RandAugment and random "
            f"erasing apply to ImageNet-size data sets (>= {AUGMENT_MIN_SIZE} px with a "
            f"replaceable transform), this one delivers {info.image_size} px images"
        )
        return
    dataset.transform = TimmTrainTransform(cfg, info)


class TimmTrainTransform:
    """MAE's fine-tuning augmentation (timm `create_transform`), delivering [0, 1] pixels.

    timm normalises, and random erasing fills with N(0, 1) in that normalised space (as MAE);
    the output is mapped back to pixels because our models take [0, 1] images and normalise
    inside, so that noise is still added in pixel space. A class, not a closure, so that
    DataLoader workers started by `spawn` can pickle it.
    """

    def __init__(self, cfg: FinetuneConfig, info: DatasetInfo) -> None:
        from timm.data import create_transform

        self.transform = create_transform(
            input_size=info.image_size,
            is_training=True,
            color_jitter=None,
            auto_augment=cfg.auto_augment,
            interpolation="bicubic",
            re_prob=cfg.reprob,
            re_mode="pixel",
            re_count=1,
            mean=info.mean,
            std=info.std,
        )
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        if torch.is_tensor(image):  # an in-memory data set: timm's ops work on PIL images
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return self.transform(image) * self.std + self.mean


def warn_probe_ignores(cfg: FinetuneConfig) -> None:
    """Warn about the augmentation settings a linear probe, or the tuning of a denoiser
    (`--denoiser-for`, which trains on the data set's own crops and flips), does not use."""
    unused = {
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "label_smoothing": cfg.label_smoothing,
        "auto_augment": cfg.auto_augment,
        "reprob": cfg.reprob,
    }
    named = ", ".join(f"finetune.{k}" for k, v in unused.items() if v)
    if named and cfg.linear_probe:
        _ignored(f"{named} ignored in linear probing (MAE's probe uses none of them)")
    elif named and cfg.denoiser_for is not None:
        _ignored(f"{named} ignored in tuning a denoiser (--denoiser-for)")
