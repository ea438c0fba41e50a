"""The DMAE pre-training stage: noisy, masked images in; clean images reconstructed.

`pretrain.sigma` is one noise level or a list of them; with a list each image draws one of the
levels uniformly at random, so the DMAE learns to remove every one of them and can serve as
the denoiser of several certification sigmas (`dmae certify --denoiser`).

`run_pretrain(recipe)` is what `dmae pretrain` calls: it builds the data set and the model from
the registries, trains with the shared `Trainer`, and writes into the run directory the resolved
`config.yaml`, `metrics.jsonl`, `last.pth` + `checkpoint-NNNN.pth` and `reconstructions.png`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.api import DatasetInfo
from dmae_cli.config.recipe import Recipe, recipe_to_yaml
from dmae_cli.data.loading import build_loader, load_dataset
from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.dmae import DMAE
from dmae_cli.models.spec import ModelSpec
from dmae_cli.models.weights import load_pretrained_into
from dmae_cli.runtime import checkpoint, distributed
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.lock import run_lock
from dmae_cli.training.pictures import Pictures, write_reconstructions
from dmae_cli.training.trainer import Trainer


def add_noise(images: torch.Tensor, sigma: float | tuple[float, ...]) -> torch.Tensor:
    """Gaussian noise in [0, 1] pixel space at the images' own resolution (no clamping, as the
    paper: the smoothing distribution is exactly N(x, sigma^2 I)).

    `sigma` is one level or several (`pretrain.sigma: [0.25, 0.5, 1.0]`): with several, each
    image draws its level uniformly at random, before its noise. One level draws the noise
    alone, as a single sigma always has.
    """
    levels = sigma if isinstance(sigma, tuple) else (sigma,)
    if len(levels) == 1:
        return images + levels[0] * torch.randn_like(images)
    table = torch.tensor(levels, dtype=images.dtype, device=images.device)
    picked = table[torch.randint(len(levels), images.shape[:1], device=images.device)]
    return images + picked.view(-1, *[1] * (images.dim() - 1)) * torch.randn_like(images)


def dmae_loss(
    model: nn.Module, batch: Any, *, sigma: float | tuple[float, ...], mask_ratio: float
) -> torch.Tensor:
    """One DMAE objective evaluation: noise before the model's resize/normalise, clean target."""
    images = batch[0]
    loss, _, _ = model(add_noise(images, sigma), images, mask_ratio)
    return loss


def build_dmae(recipe: Recipe, info: DatasetInfo) -> DMAE:
    m, p = recipe.model, recipe.pretrain
    encoder = build_backbone(
        m.backbone,
        img_size=m.image_size,
        patch_size=m.patch_size,
        in_chans=info.channels,
        **m.options,
    )
    spec = ModelSpec.for_pretrain(recipe, info)  # its statistics follow model.normalize
    adapter = InputAdapter(info.image_size, m.image_size, spec.mean, spec.std)
    return DMAE(
        encoder,
        adapter,
        decoder_embed_dim=p.decoder_embed_dim,
        decoder_depth=p.decoder_depth,
        decoder_num_heads=p.decoder_num_heads,
        norm_pix_loss=p.norm_pix_loss,
    )


@dataclass
class PretrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    picture: Path | None
    model: DMAE


def run_pretrain(
    recipe: Recipe,
    out: Path | None = None,
    resume: Path | None = None,
    stop_after: int | None = None,
) -> PretrainResult:
    """Pre-train DMAE as the recipe says; resumes automatically from the run's `last.pth`.

    Everything the run needs (data, run directory, the checkpoint to resume) is checked on
    every rank before the first step (`distributed.agreed`: a problem on one rank stops all).
    """
    run_dir = Path(out) if out is not None else recipe.stage_dir("pretrain")
    device = resolve_device(recipe.device)
    with distributed.process_group(device), ExitStack() as held:
        with distributed.agreed():  # a problem on any rank stops every rank, before training
            held.enter_context(run_lock(run_dir))
            trainer, model, pictures = _prepare(recipe, run_dir, resume, device)
        trainer.distribute()
        try:
            history = trainer.fit(stop_after=stop_after)
        finally:
            trainer.close()
        del trainer  # and its loader's workers, now rather than with the model kept below
        picture = pictures.draw(model, device) if pictures is not None else None
    return PretrainResult(run_dir, history, picture, model)


def _prepare(
    recipe: Recipe, run_dir: Path, resume: Path | None, device: torch.device
) -> tuple[Trainer, DMAE, Pictures | None]:
    """The trainer, resumed where the run stopped, its model and the optional picture."""
    torch.manual_seed(recipe.seed + distributed.rank())  # distinct noise and masks per rank
    train_set = load_dataset(recipe, "train", augment=True)
    info: DatasetInfo = train_set.info
    model = build_dmae(recipe, info).to(device)
    p = recipe.pretrain
    if resume is None and not (run_dir / "last.pth").is_file() and p.init:
        load_pretrained_into(model, p.init)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "config.yaml", recipe_to_yaml(recipe))
    trainer = Trainer(
        model=model,
        loss_fn=lambda m, b: dmae_loss(m, b, sigma=p.sigma, mask_ratio=p.mask_ratio),
        loader=build_loader(train_set, recipe.data, p.batch_size, recipe.seed),
        cfg=p,
        run_dir=run_dir,
        device=device,
        precision=recipe.precision,
        checkpoint_meta=ModelSpec.for_pretrain(recipe, info).to_dict(),
        description="pretrain",
        section="pretrain",
        tensorboard=recipe.logging.tensorboard,
    )
    if resume is not None and not trainer.resume(Path(resume)):
        raise UserError(
            f"{resume}: nothing to resume (checkpoint not found); --resume takes a last.pth or "
            f"checkpoint-NNNN.pth of dmae pretrain"
        )
    if resume is None:
        trainer.resume()
    return trainer, model, Pictures.prepare(recipe, run_dir / "reconstructions.png")


def redraw_reconstructions(
    recipe: Recipe, out: Path | None = None, weights: Path | None = None
) -> Path:
    """Draw `reconstructions.png` from a run's checkpoint without training."""
    run_dir = Path(out) if out is not None else recipe.stage_dir("pretrain")
    path = Path(weights) if weights is not None else run_dir / "last.pth"
    if not path.is_file():
        raise UserError(
            f"{path}: no checkpoint to draw reconstructions from; run 'dmae pretrain' first"
        )
    device = resolve_device(recipe.device)
    test_set = load_dataset(recipe, "test", augment=False)
    model = build_dmae(recipe, test_set.info).to(device)
    state = checkpoint.load_checkpoint(path, map_location=device)
    if not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: not a dmae pretraining checkpoint (no 'model' weights)")
    checkpoint.load_exact(model, state["model"], str(path), "does not match this recipe's model")
    return write_reconstructions(recipe, test_set, model, run_dir / "reconstructions.png", device)
