"""`dmae pretrain`: DMAE pre-training of the recipe's encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmae_cli.cli.base import OutOpt, RecipeArg, SetOpt, app, user_errors
from dmae_cli.config.recipe import load_recipe
from dmae_cli.runtime import ui


@app.command()
@user_errors
def pretrain(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Resume from this checkpoint (default: the run's last.pth, if any)."),
    ] = None,
    pictures_only: Annotated[
        bool,
        typer.Option(
            "--pictures-only",
            help="Only redraw reconstructions.png from the run's last checkpoint.",
        ),
    ] = False,
) -> None:
    """DMAE pre-training: reconstruct clean images from noisy, masked ones.

    Gaussian noise is added to each image (pretrain.sigma) and most of its
    patches are masked (pretrain.mask_ratio); the ViT encoder sees the rest, and
    a light decoder reconstructs the clean image from its output. pretrain.sigma
    may be a list: each image then draws one of its levels, so one model
    denoises for several certification sigmas (dmae certify --denoiser). Resumes
    automatically when the run directory holds a checkpoint. Writes config.yaml,
    metrics.jsonl, last.pth, checkpoint-NNNN.pth and reconstructions.png.

    Examples:

      dmae pretrain recipes/digits.yaml

      dmae pretrain recipes/digits.yaml --set "pretrain.sigma=[0.25, 0.5, 1.0]"

      dmae pretrain recipes/vitl.yaml --set data.root=/data/imagenet
    """
    from dmae_cli.training.pretrain import redraw_reconstructions, run_pretrain

    cfg = load_recipe(recipe, overrides or [])
    if pictures_only:
        path = redraw_reconstructions(cfg, out, resume)
        ui.info(f"reconstructions: {path}")
        return
    result = run_pretrain(cfg, out=out, resume=resume)
    if result.history:
        last = result.history[-1]
        ui.info(f"epoch {last['epoch']}: loss {last['loss']:.4f}")
    ui.info(
        f"outputs in {result.run_dir}/ (last.pth, metrics.jsonl, config.yaml"
        + (f", {result.picture.name})" if result.picture else ")")
    )
