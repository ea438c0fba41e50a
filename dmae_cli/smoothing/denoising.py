"""A DMAE denoiser in front of the classifier a certification runs on (`certify.denoiser`).

`LoadedDenoiser` is the denoiser loaded once for every sigma and checked against the data and
each classifier, what the run file's header records about it, and the composed base classifier
f∘D (`models.denoiser.Denoised`) that the sampler adds noise in front of. `sigma_notes` says
when a sigma is not the one the classifier or the denoiser was trained for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.api import DatasetInfo
from dmae_cli.models.denoiser import Denoised, Denoiser, load_denoiser
from dmae_cli.models.spec import ModelSpec
from dmae_cli.runtime import checkpoint, ui
from dmae_cli.runtime.errors import UserError


@dataclass(frozen=True)
class LoadedDenoiser:
    """`certify.denoiser`, loaded once for every sigma: the model, its spec and its file."""

    model: Denoiser
    spec: ModelSpec
    path: Path

    @classmethod
    def load(
        cls,
        path: Path,
        device: torch.device,
        info: DatasetInfo | None = None,
        dataset: str = "",
    ) -> LoadedDenoiser:
        """The denoiser at `path`, checked against the data set `dataset` described by `info`
        when there is one (the Python API certifies images of no data set)."""
        model, spec = load_denoiser(path, device)
        if info is None:
            return cls(model, spec, path)
        if (spec.channels, spec.input_size) != (info.channels, info.image_size):
            raise UserError(
                f"{path}: the denoiser takes {_images(spec.channels, spec.input_size)}, but "
                f"dataset '{dataset}' has {_images(info.channels, info.image_size)}"
            )
        if spec.dataset not in (None, dataset):
            ui.info(
                f"note: the denoiser {path} was trained on '{spec.dataset}', denoising '{dataset}'"
            )
        return cls(model, spec, path)

    @functools.cached_property
    def sha256(self) -> str:
        """The file's sha256, read when a header first asks (a ViT-L DMAE is over a GB)."""
        return checkpoint.file_sha256(self.path)

    def before(self, classifier: nn.Module, spec: ModelSpec, path: Path) -> Denoised:
        """The classifier at `path` behind this denoiser: noise, then D, then f."""
        own = (self.spec.channels, self.spec.input_size)
        if (spec.channels, spec.input_size) != own:  # also checked against the data
            raise UserError(
                f"{path}: the classifier takes {_images(spec.channels, spec.input_size)}, but "
                f"the denoiser {self.path} returns {_images(*own)}"
            )
        tuned_for = self.spec.tuned_for
        if tuned_for is not None and tuned_for != checkpoint.file_sha256(path):
            ui.info(
                f"note: the denoiser {self.path} was tuned for another classifier (sha256 "
                f"{tuned_for[:12]}...), not {path}"
            )
        return Denoised(self.model, classifier)

    def header(self) -> dict[str, Any]:
        """What a run file's header records about the denoiser (`dmae report` labels runs by
        these keys: keep their names)."""
        return {
            "denoiser": str(self.path),
            "denoiser_sha256": self.sha256,
            "denoiser_tuned_for": self.spec.tuned_for,
        }


NO_DENOISER = {"denoiser": None, "denoiser_sha256": None, "denoiser_tuned_for": None}


def _images(channels: int, side: int) -> str:
    return f"{channels}x{side}x{side} images"


def sigma_notes(path: Path, spec: ModelSpec, sigma: float, denoiser: LoadedDenoiser | None) -> None:
    """One line for each way this sigma is not what the models were trained for."""
    if spec.sigma == 0 and denoiser is None:
        ui.info(
            f"note: {path} is a clean classifier (trained without noise), certifying at sigma "
            f"{sigma:g}: alone it is no smoothing model (--denoiser puts a DMAE in front)"
        )
    elif spec.sigma not in (None, 0, sigma):
        ui.info(f"note: {path} was fine-tuned at sigma {spec.sigma}, certifying at {sigma}")
    levels = denoiser.spec.noise_levels if denoiser is not None else None
    if denoiser is not None and levels is not None and sigma not in levels:
        shown = ", ".join(f"{s:g}" for s in levels)
        ui.info(
            f"note: the denoiser {denoiser.path} was trained to remove noise of sigma {shown}, "
            f"certifying at {sigma:g}"
        )
