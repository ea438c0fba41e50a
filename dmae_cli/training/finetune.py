"""The fine-tuning stage: the noise-robust base classifier of the smoothed model.

`run_finetune(recipe)` is what `dmae finetune` calls. For every sigma of `finetune.sigma` it
builds a `Classifier` (InputAdapter + ViT with global average pooling and `fc_norm`), starts it
from the recipe's pretraining run or another checkpoint (`weights.load_encoder`), trains it with
Gaussian noise added in [0, 1] pixel space and consistency regularisation, and evaluates clean
and noisy accuracy on the test split. Each sigma writes `runs/<name>/finetune/sigma-<s>/`:
config.yaml, metrics.jsonl, last.pth (+ checkpoint-NNNN.pth) and best.pth (by noisy accuracy);
a rerun resumes. A sigma of 0 trains a clean classifier (one noise-free copy per image, clean
accuracy), for a denoiser to stand in front of. `--linear-probe` trains a BatchNorm + linear
head on the frozen encoder's cls token with LARS, as MAE does, into
`runs/<name>/linprobe/sigma-<s>/`. The method, with its published settings: docs/method.md,
"Fine-tuning: the base classifier".

The objective is in `training.objective`, the parameter groups (layer decay, the probe) in
`training.param_groups`, timm's augmentation in `training.augment`, the evaluation, the init
checkpoint and best.pth (shared with tuning a denoiser) in `training.tuning`; this module
builds the model and trains it.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from dmae_cli.api import DatasetInfo
from dmae_cli.config.recipe import OptimConfig, Recipe, recipe_to_yaml, sigma_name
from dmae_cli.data.loading import build_loader, load_dataset
from dmae_cli.models.classifier import build_classifier
from dmae_cli.models.spec import ModelSpec
from dmae_cli.models.weights import load_encoder
from dmae_cli.runtime import checkpoint, distributed, ui
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.lock import run_lock
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.training.augment import apply_timm_augmentation, warn_probe_ignores
from dmae_cli.training.objective import build_objective, warn_clean_ignores
from dmae_cli.training.param_groups import optimisation, prepare_probe
from dmae_cli.training.trainer import EvalFn, Trainer
from dmae_cli.training.tuning import (
    BestKeeper,
    SigmaRun,
    evaluate,
    init_label,
    resolve_init,
    train_sigma,
)

__all__ = ["BestKeeper", "SigmaRun", "evaluate", "init_label", "resolve_init", "run_finetune"]


# -- evaluation ------------------------------------------------------------------------------
def evaluator(recipe: Recipe, test_set: Any, sigma: float, device: torch.device) -> EvalFn:
    """`evaluate` on the test split at `sigma`, as the trainer calls it after an epoch."""
    cfg = recipe.finetune
    batch_size = (cfg.probe if cfg.linear_probe else cfg).batch_size
    loader = build_loader(test_set, recipe.data, batch_size, recipe.seed, train=False)
    amp = autocast_dtype(recipe.precision, device, training=True)
    return lambda model: evaluate(
        model, loader, sigma, seed=recipe.seed, copies=cfg.eval_noise_copies, amp_dtype=amp
    )


# -- one model per sigma ---------------------------------------------------------------------
def classifier_spec(
    recipe: Recipe, info: DatasetInfo, test_info: DatasetInfo, sigma: float
) -> ModelSpec:
    """The self-description `load_classifier` / `dmae certify --checkpoint` need."""
    return ModelSpec.for_finetune(recipe, info, test_info, sigma, init=init_label(recipe))


def finetune_sigma(
    recipe: Recipe,
    sigma: float,
    run_dir: Path,
    init: Path | None,
    data: tuple[Any, Any],
    device: torch.device,
    stop_after: int | None = None,
) -> SigmaRun:
    """Train (or resume) the classifier for one sigma into `run_dir`."""

    def prepare() -> tuple[Trainer, BestKeeper]:
        return sigma_trainer(recipe, sigma, run_dir, init, data, device)

    return train_sigma(sigma, run_dir, prepare, stop_after)


def sigma_trainer(
    recipe: Recipe,
    sigma: float,
    run_dir: Path,
    init: Path | None,
    data: tuple[Any, Any],
    device: torch.device,
) -> tuple[Trainer, BestKeeper]:
    """The trainer of one sigma's classifier, resumed where it stopped, and its best.pth."""
    cfg = recipe.finetune
    probe = cfg.linear_probe
    optim: OptimConfig = cfg.probe if probe else cfg
    train_set, test_set = data
    info: DatasetInfo = train_set.info
    torch.manual_seed(recipe.seed + distributed.rank())  # same init whatever the sigma order
    spec = classifier_spec(recipe, info, test_set.info, sigma)
    model = build_classifier(spec, drop_path=0.0 if probe else cfg.drop_path)
    resuming = (run_dir / "last.pth").is_file()
    if not resuming:
        if init is None:
            ui.info(f"{sigma_name(sigma)}: random initialisation")
        else:
            load_encoder(model.vit, init)
    if probe:
        prepare_probe(model)
    model.to(device)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "config.yaml", recipe_to_yaml(recipe))
    keeper = BestKeeper(model, run_dir, spec, optim.epochs, sigma_name(sigma))
    groups, make_optimizer = optimisation(model, cfg)
    trainer = Trainer(
        model=model,
        loss_fn=build_objective(cfg, sigma, info.num_classes),
        loader=build_loader(train_set, recipe.data, optim.batch_size, recipe.seed),
        cfg=optim,
        run_dir=run_dir,
        device=device,
        precision=recipe.precision,
        param_groups=groups,
        make_optimizer=make_optimizer,
        eval_fn=evaluator(recipe, test_set, sigma, device),
        eval_every=cfg.eval_every,
        checkpoint_meta=spec.to_dict(),
        on_checkpoint=keeper,
        description=f"{'linprobe' if probe else 'finetune'} {sigma_name(sigma)}",
        section="finetune.probe" if probe else "finetune",
        tensorboard=recipe.logging.tensorboard,
    )
    if trainer.resume():
        keeper.restore()
    return trainer, keeper


def run_finetune(
    recipe: Recipe, out: Path | None = None, stop_after: int | None = None
) -> list[SigmaRun]:
    """Fine-tune one classifier per sigma of the recipe; each resumes from its own last.pth."""
    cfg = recipe.finetune
    stage = "linprobe" if cfg.linear_probe else "finetune"
    base = Path(out) if out is not None else recipe.stage_dir(stage)
    run_dirs = {s: base / sigma_name(s) for s in dict.fromkeys(cfg.sigma)}
    device = resolve_device(recipe.device)
    with distributed.process_group(device), ExitStack() as locks:
        with distributed.agreed():  # every sigma's directory and the data, before training
            for run_dir in run_dirs.values():
                locks.enter_context(run_lock(run_dir))
            init, data = _prepare(recipe, run_dirs)
        return [
            finetune_sigma(recipe, s, d, init, data, device, stop_after)
            for s, d in run_dirs.items()
        ]


def _prepare(recipe: Recipe, run_dirs: dict[float, Path]) -> tuple[Path | None, tuple[Any, Any]]:
    """The checkpoint to start from and the (train, test) data sets."""
    cfg = recipe.finetune
    fresh = any(not (d / "last.pth").is_file() for d in run_dirs.values())
    init = resolve_init(recipe) if fresh else None
    warn_probe_ignores(cfg)
    warn_clean_ignores(cfg)
    train_set = load_dataset(recipe, "train", augment=True)
    if not cfg.linear_probe:
        apply_timm_augmentation(train_set, cfg, train_set.info)
    test_set = load_dataset(recipe, "test", augment=False)
    return init, (train_set, test_set)
