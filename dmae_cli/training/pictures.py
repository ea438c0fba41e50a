"""Pictures for people: the DMAE reconstruction grid.

The picture is an optional output of pre-training: its test images are looked for before the
first step, and when they cannot be found, or the picture cannot be drawn or written, one
warning line says so and the run, whose checkpoints are its real outputs, still succeeds.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from dmae_cli.config.recipe import Recipe
from dmae_cli.data.loading import load_dataset
from dmae_cli.models.dmae import DMAE, patchify, unpatchify
from dmae_cli.runtime import distributed, ui
from dmae_cli.runtime.checkpoint import atomic_write
from dmae_cli.runtime.errors import UserError


@dataclass
class Pictures:
    """`reconstructions.png` of a pre-training run, drawn by rank 0 once training is done."""

    recipe: Recipe
    path: Path
    test_set: Any

    @classmethod
    def prepare(cls, recipe: Recipe, path: Path) -> Pictures | None:
        """The picture's test images, found now; None (after a warning) when there are none
        or the recipe asks for no picture."""
        if not distributed.is_main() or recipe.pretrain.reconstructions <= 0:
            return None
        try:
            return cls(recipe, path, load_dataset(recipe, "test", augment=False))
        except UserError as exc:
            _skipped(path, exc)
            return None

    def draw(self, model: DMAE, device: torch.device) -> Path | None:
        """The picture, or None after a warning: a finished run never fails on it."""
        try:
            return write_reconstructions(self.recipe, self.test_set, model, self.path, device)
        except Exception as exc:  # any failure of an optional output, a bug's too, is a warning
            if os.environ.get("DMAE_DEBUG"):
                raise
            _skipped(self.path, exc)
            return None


def _skipped(path: Path, exc: Exception) -> None:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, UserError):
        reason = f"{type(exc).__name__}: {reason}"
    ui.console.print(
        f"[yellow]warning:[/] no {escape(path.name)}: {escape(reason)} (the picture is optional; "
        f"pretrain.reconstructions=0 turns it off)",
        highlight=False,
        soft_wrap=True,  # one line, as every message a log is searched for
    )


def write_reconstructions(
    recipe: Recipe, test_set: Any, model: DMAE, path: Path, device: torch.device
) -> Path:
    """clean / noisy + masked input / reconstruction for a few test images, as one PNG.

    With several noise levels (`pretrain.sigma` a list) the columns take them in turn, each
    titled with its sigma, so the picture shows the model removing every level.
    """
    count = recipe.pretrain.reconstructions
    # Iterate rather than index: a sharded (iterable) data set has no random access.
    images = torch.stack([image for image, _ in itertools.islice(iter(test_set), count)]).to(device)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    noise = torch.randn(images.shape, generator=generator, device=device)
    levels = recipe.pretrain.sigmas
    columns = [levels[i % len(levels)] for i in range(len(images))]
    scale = torch.tensor(columns, device=device).view(-1, 1, 1, 1)
    noisy = images + (levels[0] if len(levels) == 1 else scale) * noise
    model.eval()
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(
            model.adapter(noisy), recipe.pretrain.mask_ratio, generator
        )
        pred = model.forward_decoder(latent, ids_restore).float()
    titles = [f"σ={s:g}" for s in columns] if len(levels) > 1 else None
    return reconstruction_grid(model, images, noisy, mask, pred, path, titles)


def _to_display(model: DMAE, pixels_or_normalised: torch.Tensor, normalised: bool) -> torch.Tensor:
    x = model.adapter.denormalise(pixels_or_normalised) if normalised else pixels_or_normalised
    return x.clamp(0, 1).permute(0, 2, 3, 1).cpu()


def reconstruction_grid(
    model: DMAE,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    mask: torch.Tensor,
    pred: torch.Tensor,
    path: Path,
    titles: list[str] | None = None,
) -> Path:
    """Three rows: clean input, the noisy image with masked patches greyed out, reconstruction;
    `titles` above the columns (the noise level of each, when they differ).

    With `norm_pix_loss` the model predicts per-patch standardised pixels; they are shown with
    the clean patch's mean and variance put back, as MAE's visualisation does.
    """
    import matplotlib  # here: a run that draws no picture never pays for matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    p, c = model.patch_size, model.in_chans
    clean_n = model.adapter(clean)
    if model.norm_pix_loss:
        target = patchify(clean_n, p)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    recon = unpatchify(pred, p, c)
    keep = unpatchify(1 - mask.unsqueeze(-1).expand(-1, -1, p * p * c), p, c)
    noisy_n = model.adapter(noisy)
    grey = model.adapter(torch.full_like(clean, 0.5))
    masked_input = noisy_n * keep + grey * (1 - keep)
    rows = [
        ("clean", _to_display(model, clean_n, True)),
        ("noisy + masked", _to_display(model, masked_input, True)),
        ("reconstruction", _to_display(model, recon, True)),
    ]
    n = clean.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n + 1.2, 4.0), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            image = images[i].squeeze(-1) if c == 1 else images[i]
            ax.imshow(
                image.numpy(),
                cmap="gray" if c == 1 else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=9)
    for ax, title in zip(axes[0], titles or [], strict=False):
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
