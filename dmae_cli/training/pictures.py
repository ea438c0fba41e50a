"""Pictures for people: the DMAE reconstruction grid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import torch

from dmae_cli.models.dmae import DMAE, patchify, unpatchify
from dmae_cli.runtime.checkpoint import atomic_write


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
) -> Path:
    """Three rows: clean input, the noisy image with masked patches greyed out, reconstruction.

    With `norm_pix_loss` the model predicts per-patch standardised pixels; they are shown with
    the clean patch's mean and variance put back, as MAE's visualisation does.
    """
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
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
