"""The smoothed classifier of the Python API: `Smoothed(load_classifier(path), sigma)`, or
behind a DMAE denoiser, `Smoothed(load_classifier(path, denoiser=dmae_path), sigma)`.

`dmae_cli` re-exports the names of this module (see `dmae_cli.__all__`); `dmae predict` calls
them too, and they certify through the driver `dmae certify` uses
(`dmae_cli.smoothing.drive`), with the sampler and certifier it builds
(`dmae_cli.smoothing.jobs`). Settings are checked as the recipe's `certify` section checks
them, so a bad `n` or an unknown certifier is the same one line as on the command line.

Noise: unless told otherwise (`noise=`), each image draws its noise from its own generator
seeded by a hash of its pixels (`content_generator`), so the same image gets the same answer
in every call, in any company and in any order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.api import ABSTAIN, Certificate, CertifyRequest, DatasetInfo
from dmae_cli.config.recipe import Recipe, apply_typed, load_recipe
from dmae_cli.data.images import from_picture, from_tensor
from dmae_cli.models import classifier as classifiers
from dmae_cli.models.spec import ModelSpec
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.denoising import LoadedDenoiser
from dmae_cli.smoothing.drive import certify_all, predict_all
from dmae_cli.smoothing.jobs import build_certifier, build_sampler
from dmae_cli.smoothing.sampler import Sampler

Images = Any  # a float tensor (C, H, W) or (N, C, H, W) in [0, 1], a PIL image, or a list of them


@dataclass(frozen=True)
class BaseClassifier:
    """The base classifier f of a checkpoint: the model in eval mode and its description."""

    model: nn.Module
    spec: ModelSpec  # the classifier's, also with a denoiser in front
    path: str
    denoiser: str | None = None  # the DMAE denoiser's checkpoint, when `model` is f∘D

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_name(self, label: int) -> str:
        """The class's name if the checkpoint has names, else its index; "abstain" for
        `ABSTAIN`."""
        if label == ABSTAIN:
            return "abstain"
        names = self.spec.class_names
        return names[label] if 0 <= label < len(names) else str(label)

    def prepare(self, image: Any, what: str = "image") -> torch.Tensor:
        """One image as the model takes it: float (channels, side, side) in [0, 1] at the data's
        native side (`dmae_cli.data.images` says how pictures are converted and cut)."""
        channels, side = self.spec.channels, self.spec.input_size
        if isinstance(image, torch.Tensor):
            return from_tensor(image.detach().cpu(), channels, side, what)
        if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
            return from_picture(image, channels, side)
        raise UserError(f"{what}: a {type(image).__name__}; give a tensor or a PIL image")


def load_classifier(
    path: str | Path, device: str | torch.device = "auto", *, denoiser: str | Path | None = None
) -> BaseClassifier:
    """The classifier `dmae finetune` wrote at `path` (or `dmae import` made), on `device`
    ("auto": CUDA when present, else the CPU). A file that is not one is one `UserError`.

    `denoiser`: a DMAE checkpoint (from `dmae pretrain`, or a tuned denoiser) put in front of
    the classifier: the base classifier is then f(D(x)), and noise lands before D (denoised
    smoothing, as `dmae certify --denoiser`)."""
    where = resolve_device(str(device))
    model, spec = classifiers.load_classifier(path, where)
    if denoiser is None:
        return BaseClassifier(model, spec, str(path))
    front = LoadedDenoiser.load(Path(denoiser).expanduser(), where)
    return BaseClassifier(front.before(model, spec, Path(path)), spec, str(path), str(denoiser))


def content_generator(image: torch.Tensor, device: torch.device) -> torch.Generator:
    """The noise generator of an image: seeded by a hash of its shape and float32 pixels."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"dmae-predict/{tuple(pixels.shape)}/".encode())
    digest.update(pixels.numpy().tobytes())
    seed = int.from_bytes(digest.digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


class Smoothed:
    """g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I) in [0, 1] pixel space.

    `predict` is Cohen et al.'s PREDICT (a class, or `ABSTAIN`; wrong with probability at most
    alpha) and `certify` their CERTIFY (`Certificate`: a class and an L2 radius within which g
    is constant, with probability at least 1 - alpha), by the named certifier plugin.
    `batch_size`: noisy copies per forward pass, or "auto"; `together`: images whose draws
    share forward passes, as `certify.together`; `precision`: "auto", "bf16" or "fp32".
    """

    def __init__(
        self,
        classifier: BaseClassifier,
        sigma: float | None = None,
        *,
        batch_size: int | str = "auto",
        together: int = 8,
        precision: str = "auto",
    ) -> None:
        sigma = classifier.spec.sigma if sigma is None else sigma
        if sigma is None:
            raise UserError(f"{classifier.path}: the checkpoint records no sigma; pass sigma=")
        if sigma == 0 and classifier.spec.sigma == 0:
            raise UserError(
                f"{classifier.path}: a clean classifier (trained without noise) has no sigma of "
                f"its own; pass the noise level to smooth at, sigma="
            )
        self.classifier = classifier
        self.sigma = float(sigma)
        self._base = settings(
            {
                "certify.sigma": [self.sigma],
                "certify.batch_size": batch_size,
                "certify.together": together,
                "precision": precision,
            }
        )
        self._samplers: dict[int, Sampler] = {}

    def predict(
        self,
        images: Images,
        n: int = 1000,
        alpha: float = 0.001,
        *,
        certifier: str = "cohen",
        noise: Sequence[torch.Generator] | None = None,
    ) -> list[int]:
        """g's prediction for each image, or `ABSTAIN`, from `n` noisy copies each."""
        recipe = self._settings(n=n, n0=1, alpha=alpha, certifier=certifier)
        return self._drive(predict_all, recipe, images, noise)

    def certify(
        self,
        images: Images,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        certifier: str = "cohen",
        *,
        noise: Sequence[torch.Generator] | None = None,
    ) -> list[Certificate]:
        """A certificate per image: `n0` copies select a class, up to `n` bound it."""
        recipe = self._settings(n=n, n0=n0, alpha=alpha, certifier=certifier)
        return self._drive(certify_all, recipe, images, noise)

    def _drive(
        self,
        each_group: Callable[..., list[Any]],
        recipe: Recipe,
        images: Images,
        noise: Sequence[torch.Generator] | None,
    ) -> list[Any]:
        """`certify_all` or `predict_all` over the images, `certify.together` at a time, as
        `dmae certify` groups them (so the two agree row for row given the same noise)."""
        requests, examples = self._work(recipe, images, noise)
        run = build_certifier(recipe.certify)
        sampler = self.sampler(recipe)
        return [
            result
            for group in groups(len(examples), recipe.certify.together)
            for result in each_group(sampler, examples[group], run, requests[group])
        ]

    def sampler(self, recipe: Recipe) -> Sampler:
        """The sampler `dmae certify` would build for these settings (kept per batch size)."""
        cfg = recipe.certify
        key = max(cfg.n0, cfg.n)  # "auto" sizes a GPU batch up to the largest request
        if key not in self._samplers:
            spec = self.classifier.spec
            info = DatasetInfo(
                spec.num_classes, spec.input_size, spec.channels, spec.mean, spec.std
            )
            model, device = self.classifier.model, self.classifier.device
            self._samplers[key] = build_sampler(recipe, model, self.sigma, info, device)
        return self._samplers[key]

    def _settings(self, **certify: Any) -> Recipe:
        return settings({f"certify.{k}": v for k, v in certify.items()}, self._base)

    def _work(
        self, recipe: Recipe, images: Images, noise: Sequence[torch.Generator] | None
    ) -> tuple[list[CertifyRequest], list[tuple[torch.Tensor, torch.Generator]]]:
        cfg = recipe.certify
        batch = [self.classifier.prepare(x, f"image {i}") for i, x in enumerate(as_list(images))]
        device = self.classifier.device
        if noise is None:
            noise = [content_generator(x, device) for x in batch]
        elif len(noise) != len(batch):
            raise UserError(f"noise: {len(noise)} generators for {len(batch)} images")
        request = CertifyRequest(self.sigma, cfg.alpha, cfg.n0, cfg.n, cfg.radii)
        return [request] * len(batch), list(zip(batch, noise, strict=True))


def settings(values: dict[str, Any], base: Recipe | None = None) -> Recipe:
    """Smoothing settings checked as a recipe's (`certify.n` must be positive, ...); a bad one
    is a `UserError` starting "arguments: " and naming the recipe key."""
    return apply_typed(load_recipe(None) if base is None else base, values, "arguments")


def as_list(images: Images) -> list[Any]:
    """The images of a batch tensor, a single image or a list, as a list."""
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, list | tuple):
        return list(images)
    return [images]


def groups(size: int, together: int) -> list[slice]:
    """Consecutive groups of `together` items: certified side by side, as `dmae certify`."""
    return [slice(i, min(i + together, size)) for i in range(0, size, together)]
