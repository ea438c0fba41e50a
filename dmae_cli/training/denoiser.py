"""Tuning a DMAE denoiser for a frozen classifier: `dmae finetune --denoiser-for CLASSIFIER`.

Denoised smoothing certifies a classifier f trained on clean images as f(D(x + noise)), D a
denoiser; a pre-trained DMAE is such a D as it is (`models.denoiser`). This stage tunes D for
one particular f with the stability objective of Salman et al. (NeurIPS 2020): for a clean
training image x and delta ~ N(0, sigma^2 I) in [0, 1] pixel space,

    loss = cross-entropy(f(D(x + delta)), argmax f(x)),

so D learns to return what f recognises as x, not merely an image close to x. The target is
f's own prediction on the clean image: the data set's labels are never used for training (only
to report test accuracy). f is frozen: eval mode, no gradients for its weights, no optimizer
state, never written; gradients only pass through it to D.

One denoiser per sigma of `finetune.sigma`, into `runs/<name>/denoiser/sigma-<s>/` (or
`--out DIR/sigma-<s>/`): config.yaml, metrics.jsonl, last.pth (+ checkpoint-NNNN.pth) and
best.pth by the noisy test accuracy of f∘D. Their "model" is the DMAE's state dict, the layout
of a pretraining checkpoint, and their meta a `ModelSpec` of stage "denoiser" with the sigma it
was tuned for (`noise_levels`) and the classifier file's sha256 (`tuned_for`). The optimisation
settings are the recipe's `denoiser:` section.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmae_cli import __version__
from dmae_cli.config.recipe import Recipe, recipe_to_yaml, sigma_name
from dmae_cli.data.loading import build_loader, load_dataset
from dmae_cli.models.classifier import load_classifier
from dmae_cli.models.denoiser import Denoised, Denoiser, load_denoiser
from dmae_cli.models.spec import ModelSpec
from dmae_cli.runtime import checkpoint, distributed
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.lock import run_lock
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.training.augment import warn_probe_ignores
from dmae_cli.training.trainer import EvalFn, Trainer
from dmae_cli.training.tuning import BestKeeper, SigmaRun, evaluate, resolve_init, train_sigma


@dataclass(frozen=True)
class Frozen:
    """The classifier a denoiser is tuned for: frozen, on the device, and its file's sha256."""

    model: nn.Module
    spec: ModelSpec
    path: Path
    sha256: str

    @classmethod
    def load(cls, path: Path, device: torch.device) -> Frozen:
        if not path.is_file():
            raise UserError(f"finetune.denoiser_for: {path}: classifier checkpoint not found")
        model, spec = load_classifier(path, device)
        model.requires_grad_(False)  # gradients pass through f to D; f itself never moves
        return cls(model.eval(), spec, path, checkpoint.file_sha256(path))


@dataclass
class Stability:
    """Salman et al.'s stability loss: f on the denoised noisy image should predict what f
    predicts on the clean one. The batch's labels are not read."""

    classifier: nn.Module  # frozen, in eval mode
    sigma: float

    def __call__(self, denoiser: nn.Module, batch: Any) -> torch.Tensor:
        images = batch[0]
        with torch.no_grad():
            target = self.classifier(images).argmax(-1)
        noisy = images + self.sigma * torch.randn_like(images)
        return F.cross_entropy(self.classifier(denoiser(noisy)).float(), target)


def tuned_spec(
    start: ModelSpec, sigma: float, classifier_sha256: str, init: Path, recipe: Recipe, info: Any
) -> ModelSpec:
    """The description of a denoiser tuned at `sigma` on the recipe's data set (`info`), from
    that of the DMAE it started as."""
    return dataclasses.replace(
        start,
        stage="denoiser",
        dmae_version=__version__,
        dataset=recipe.data.dataset,
        data_fingerprint=info.fingerprint,
        norm_pix_loss=False,
        noise_levels=(float(sigma),),
        tuned_for=classifier_sha256,
        init=str(init),
    )


def _images(spec: ModelSpec) -> str:
    return f"{spec.channels}-channel {spec.input_size}x{spec.input_size} images"


def check_fits(denoiser: ModelSpec, source: Path, frozen: Frozen, info: Any) -> None:
    """The denoiser, the classifier and the data agree on channels, native side and classes."""
    if (frozen.spec.channels, frozen.spec.input_size) != (info.channels, info.image_size):
        raise UserError(
            f"{frozen.path}: the classifier takes {_images(frozen.spec)}, but the recipe's data "
            f"set has {info.channels}-channel {info.image_size}x{info.image_size} images"
        )
    if frozen.spec.num_classes != info.num_classes:  # its accuracy would be scored wrongly
        raise UserError(
            f"{frozen.path}: the classifier has {frozen.spec.num_classes} classes, but the "
            f"recipe's data set has {info.num_classes}"
        )
    if (denoiser.channels, denoiser.input_size) != (info.channels, info.image_size):
        raise UserError(
            f"{source}: the denoiser returns {_images(denoiser)}, but the classifier "
            f"{frozen.path} takes {_images(frozen.spec)}"
        )


def denoiser_trainer(
    recipe: Recipe,
    sigma: float,
    run_dir: Path,
    start: Path | None,
    frozen: Frozen,
    data: tuple[Any, Any],
    device: torch.device,
) -> tuple[Trainer, BestKeeper]:
    """The trainer of one sigma's denoiser, resumed where it stopped, and its best.pth."""
    cfg = recipe.denoiser
    train_set, test_set = data
    last = run_dir / "last.pth"
    resuming = last.is_file()
    source = last if resuming else start
    assert source is not None  # `run_denoiser` resolves the start of every fresh run
    denoiser, spec = load_denoiser(source, device)
    check_fits(spec, source, frozen, train_set.info)
    if resuming and spec.tuned_for != frozen.sha256:
        raise UserError(
            f"{last}: tuned for another classifier than {frozen.path} (sha256 "
            f"{str(spec.tuned_for)[:12]}..., not {frozen.sha256[:12]}...); pass that one to "
            f"--denoiser-for, or --out a new directory"
        )
    if not resuming:
        spec = tuned_spec(spec, sigma, frozen.sha256, source, recipe, train_set.info)
    # Without a mask the mask token is never used: its gradient is zero, and weight decay
    # alone would move it; it stays as pre-trained.
    denoiser.dmae.mask_token.requires_grad_(False)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "config.yaml", recipe_to_yaml(recipe))
    torch.manual_seed(recipe.seed + distributed.rank())  # distinct noise per rank
    keeper = BestKeeper(denoiser.dmae, run_dir, spec, cfg.epochs, f"denoiser {sigma_name(sigma)}")
    trainer = Trainer(
        model=denoiser,
        loss_fn=Stability(frozen.model, sigma),
        loader=build_loader(train_set, recipe.data, cfg.batch_size, recipe.seed),
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        precision=recipe.precision,
        eval_fn=_evaluator(recipe, test_set, sigma, frozen, device),
        eval_every=cfg.eval_every,
        checkpoint_meta=spec.to_dict(),
        on_checkpoint=keeper,
        description=f"denoiser {sigma_name(sigma)}",
        section="denoiser",
        tensorboard=recipe.logging.tensorboard,
        weights_of="dmae",  # checkpoints hold the DMAE, as pre-training's do
    )
    if trainer.resume():
        keeper.restore()
    return trainer, keeper


def _evaluator(
    recipe: Recipe, test_set: Any, sigma: float, frozen: Frozen, device: torch.device
) -> EvalFn:
    """`evaluate` of f∘D on the test split at `sigma`, as the trainer calls it after an epoch."""
    cfg = recipe.denoiser
    loader = build_loader(test_set, recipe.data, cfg.batch_size, recipe.seed, train=False)
    amp = autocast_dtype(recipe.precision, device, training=True)

    def run(denoiser: nn.Module) -> dict[str, float]:
        assert isinstance(denoiser, Denoiser)
        composed = Denoised(denoiser, frozen.model)
        copies = cfg.eval_noise_copies
        return evaluate(composed, loader, sigma, seed=recipe.seed, copies=copies, amp_dtype=amp)

    return run


def tune_sigma(
    recipe: Recipe,
    sigma: float,
    run_dir: Path,
    start: Path | None,
    frozen: Frozen,
    data: tuple[Any, Any],
    device: torch.device,
    stop_after: int | None = None,
) -> SigmaRun:
    """Tune (or resume) the denoiser for one sigma into `run_dir`. Under DDP only the
    denoiser is wrapped: the frozen classifier has nothing to synchronise."""

    def prepare() -> tuple[Trainer, BestKeeper]:
        return denoiser_trainer(recipe, sigma, run_dir, start, frozen, data, device)

    return train_sigma(sigma, run_dir, prepare, stop_after)


def run_denoiser(
    recipe: Recipe, out: Path | None = None, stop_after: int | None = None
) -> list[SigmaRun]:
    """Tune one denoiser per sigma of the recipe for `finetune.denoiser_for`; each resumes
    from its own last.pth."""
    cfg = recipe.finetune
    _check_request(recipe)
    warn_probe_ignores(cfg)
    base = Path(out) if out is not None else recipe.stage_dir("denoiser")
    run_dirs = {s: base / sigma_name(s) for s in dict.fromkeys(cfg.sigma)}
    device = resolve_device(recipe.device)
    with distributed.process_group(device), ExitStack() as locks:
        with distributed.agreed():  # every sigma's directory, the models and the data first
            for run_dir in run_dirs.values():
                locks.enter_context(run_lock(run_dir))
            fresh = any(not (d / "last.pth").is_file() for d in run_dirs.values())
            start = resolve_init(recipe) if fresh else None
            frozen = Frozen.load(Path(str(cfg.denoiser_for)).expanduser(), device)
            data = (
                load_dataset(recipe, "train", augment=True),
                load_dataset(recipe, "test", augment=False),
            )
        return [
            tune_sigma(recipe, s, d, start, frozen, data, device, stop_after)
            for s, d in run_dirs.items()
        ]


def _check_request(recipe: Recipe) -> None:
    """What `--denoiser-for` cannot be combined with, one line each."""
    cfg = recipe.finetune
    if 0 in cfg.sigma:
        raise UserError(
            "finetune.sigma: 0 has no noise to remove; a denoiser is tuned for a sigma > 0 "
            "(e.g. --sigma 0.25) with --denoiser-for"
        )
    if cfg.linear_probe:
        raise UserError("--denoiser-for and --linear-probe exclude each other: pick one")
    if cfg.init is not None and cfg.init.strip().lower() == "none":
        raise UserError(
            "finetune.init: none (random weights) cannot denoise; a denoiser starts from a DMAE "
            "pretraining checkpoint (--init PATH, default the recipe's pretrain run)"
        )
