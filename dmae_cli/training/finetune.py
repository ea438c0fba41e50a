"""The fine-tuning stage: the noise-robust base classifier of the smoothed model (PAPER.md §2).

`run_finetune(recipe)` is what `dmae finetune` calls. For every sigma of `finetune.sigma` it
builds a `Classifier` (InputAdapter + ViT with global average pooling and `fc_norm`), starts it
from the recipe's pretraining run or another checkpoint (`weights.load_encoder`), trains it with
Gaussian noise added in [0, 1] pixel space and consistency regularisation, and evaluates clean
and noisy accuracy on the test split. Each sigma writes `runs/<name>/finetune/sigma-<s>/`:
config.yaml, metrics.jsonl, last.pth (+ checkpoint-NNNN.pth) and best.pth (by noisy accuracy);
a rerun resumes. `--linear-probe` trains a BatchNorm + linear head on the frozen encoder's cls
token with LARS, as MAE does, into `runs/<name>/linprobe/sigma-<s>/`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay

from dmae_cli.api import DatasetInfo
from dmae_cli.config.recipe import FinetuneConfig, OptimConfig, Recipe, recipe_to_yaml, sigma_name
from dmae_cli.data.loading import build_loader, load_dataset
from dmae_cli.models.classifier import Classifier, build_classifier
from dmae_cli.models.spec import ModelSpec
from dmae_cli.models.weights import load_encoder
from dmae_cli.runtime import checkpoint, distributed, ui
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.training.trainer import Trainer

BEST = "best.pth"
# (lbd, eta) of PAPER.md §2 for the paper's sigmas; other sigmas use the rule of the nearest one
# (below 0.75 the sigma <= 0.5 rule, from 0.75 up the sigma = 1.0 rule).
PAPER_CONSISTENCY = {0.25: (2.0, 0.5), 0.5: (2.0, 0.5), 1.0: (2.0, 0.1)}
AUGMENT_MIN_SIZE = 64  # RandAugment / random erasing are for ImageNet-size crops, not 8-32 px


class ConfigIgnoredWarning(UserWarning):
    """A recipe value that has no effect in this run."""


def _ignored(message: str) -> None:
    warnings.warn(message, ConfigIgnoredWarning, stacklevel=3)


# -- the objective ---------------------------------------------------------------------------
def consistency_defaults(sigma: float) -> tuple[float, float]:
    """(lbd, eta) for `sigma`: PAPER.md §2's values, or those of the nearest paper sigma."""
    nearest = min(PAPER_CONSISTENCY, key=lambda s: (abs(s - sigma), -s))
    return PAPER_CONSISTENCY[nearest]


def consistency_loss(logits: torch.Tensor, lbd: float, eta: float) -> torch.Tensor:
    """Jeong & Shin (2020): lbd * mean_i KL(avg || p_i) + eta * H(avg), averaged over the batch.

    logits: (m, B, C), the model's outputs on m independently noised copies of B images.
    `avg` is the mean of the m softmax outputs; gradients flow through it, as in the original.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (m, B, C)
    # log(avg) from log-probabilities: finite (and so are its gradients) even where a softmax
    # underflows to 0, which log(avg) of the averaged probabilities would not be.
    log_avg = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])  # (B, C)
    avg = log_avg.exp()
    kl = (avg * (log_avg - log_probs)).sum(-1)  # KL(avg || p_i), shape (m, B)
    entropy = -(avg * log_avg).sum(-1)
    return lbd * kl.mean() + eta * entropy.mean()


def noisy_copies(images: torch.Tensor, copies: int, sigma: float) -> torch.Tensor:
    """(B, C, H, W) pixels -> (copies * B, C, H, W), copy-major, each with fresh N(0, sigma^2)
    noise in [0, 1] pixel space at the images' own resolution (before the model's adapter)."""
    repeated = images.repeat(copies, 1, 1, 1)
    return repeated + sigma * torch.randn_like(repeated)


@dataclass
class Objective:
    """Gaussian noise augmentation with consistency regularisation (PAPER.md §2)."""

    sigma: float
    num_noise: int = 2
    consistency: bool = True
    lbd: float = 2.0
    eta: float = 0.5
    label_smoothing: float = 0.0
    mixup: Mixup | None = None  # mixup/cutmix (its label smoothing applies then)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)  # in place on the batch; soft targets
        logits = model(noisy_copies(images, self.num_noise, self.sigma)).float()
        targets = targets.repeat(self.num_noise, *([1] * (targets.dim() - 1)))
        if self.mixup is not None:
            loss = SoftTargetCrossEntropy()(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.consistency and self.num_noise > 1:
            per_copy = logits.view(self.num_noise, -1, logits.shape[-1])
            loss = loss + consistency_loss(per_copy, self.lbd, self.eta)
        return loss


def build_objective(cfg: FinetuneConfig, sigma: float, num_classes: int) -> Objective:
    """The recipe's objective at `sigma`; a linear probe keeps only noise and consistency."""
    default_lbd, default_eta = consistency_defaults(sigma)
    mixup = None
    if not cfg.linear_probe and (cfg.mixup > 0 or cfg.cutmix > 0):
        if cfg.batch_size % 2:
            raise UserError(f"finetune.mixup/cutmix need an even batch_size, got {cfg.batch_size}")
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
    return Objective(
        sigma=sigma,
        num_noise=cfg.num_noise,
        consistency=cfg.consistency,
        lbd=cfg.lbd if cfg.lbd is not None else default_lbd,
        eta=cfg.eta if cfg.eta is not None else default_eta,
        label_smoothing=0.0 if cfg.linear_probe else cfg.label_smoothing,
        mixup=mixup,
    )


# -- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    sigma: float,
    *,
    seed: int,
    copies: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Clean accuracy and accuracy under N(0, sigma^2) pixel noise (`copies` draws per image).

    The noise comes from a generator seeded with `seed` at every call, so every evaluation of
    a run sees the same noise and the numbers are comparable across epochs.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros(2, dtype=torch.float64, device=device)  # clean, noisy
    total = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        noise = torch.randn((copies, *images.shape), generator=generator, device=device)
        batch = torch.cat([images, (images + sigma * noise).flatten(0, 1)])
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            hits = model(batch).argmax(-1) == labels.repeat(copies + 1)
        correct[0] += hits[: len(labels)].sum()
        correct[1] += hits[len(labels) :].sum() / copies
        total += len(labels)
    if distributed.is_distributed():
        stats = torch.cat([correct, total.view(1)])
        torch.distributed.all_reduce(stats)
        correct, total = stats[:2], stats[2]
    clean, noisy = (correct / total.clamp_min(1)).tolist()
    return {"acc_clean": clean, "acc_noisy": noisy}


# -- optimisation ----------------------------------------------------------------------------
def layer_decay_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """timm's layer-wise lr decay groups for the ViT (stem, blocks, head), as MAE/BEiT."""
    vit = model.vit
    groups = param_groups_layer_decay(
        vit,
        weight_decay=cfg.weight_decay,
        no_weight_decay_list=tuple(vit.no_weight_decay()),
        layer_decay=cfg.layer_decay,
    )
    # Head first: the trainer logs the lr of the first group, which should be the peak lr.
    return sorted(groups, key=lambda g: -g["lr_scale"])


def prepare_probe(model: Classifier) -> None:
    """Freeze everything but the (BatchNorm +) linear head; initialise it as MAE's probe."""
    model.requires_grad_(False)
    linear = model.vit.head[-1]
    linear.requires_grad_(True)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)


def probe_groups(model: Classifier, weight_decay: float) -> list[dict[str, Any]]:
    """LARS groups as MAE's: matrices trust-ratio adapted, biases not, no decay on biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]


def lars(momentum: float) -> Any:
    def make(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        for group in groups:
            group["always_adapt"] = any(p.ndim > 1 for p in group["params"])
        return Lars(groups, lr=lr, momentum=momentum)

    return make


# -- data ------------------------------------------------------------------------------------
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


# -- one model per sigma ---------------------------------------------------------------------
def init_label(recipe: Recipe) -> str:
    """Where the weights come from, for the checkpoint's meta (no file check)."""
    init = recipe.finetune.init
    if init is None:
        return str(recipe.stage_dir("pretrain") / "last.pth")
    return "random" if init.strip().lower() == "none" else init


def resolve_init(recipe: Recipe) -> Path | None:
    """The checkpoint to start from, or None for random initialisation."""
    init = recipe.finetune.init
    if init is not None and init.strip().lower() == "none":
        return None
    if init is None:
        path = recipe.stage_dir("pretrain") / "last.pth"
        if not path.is_file():
            raise UserError(
                f"no pretraining run at {path}: run 'dmae pretrain' with this recipe first, or "
                f"pass --init PATH (a DMAE/MAE/timm checkpoint) or --init none (random init)"
            )
        return path
    path = Path(init).expanduser()
    if path.is_dir():  # a pretraining run directory: its latest checkpoint
        if not (path / "last.pth").is_file():
            raise UserError(
                f"finetune.init: {path} is a directory without last.pth (no finished "
                f"pretraining epoch there); run 'dmae pretrain' into it first, or pass a "
                f"checkpoint file or --init none"
            )
        return path / "last.pth"
    if not path.is_file():
        raise UserError(f"finetune.init: {path}: checkpoint not found")
    return path


@dataclass
class SigmaRun:
    sigma: float
    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]  # epoch and accuracies of best.pth


@dataclass
class BestKeeper:
    """Writes best.pth (weights + meta, no optimizer) whenever noisy accuracy does not drop."""

    model: nn.Module
    run_dir: Path
    spec: ModelSpec
    epochs: int
    best: dict[str, Any] | None = None

    def restore(self) -> None:
        path = self.run_dir / BEST
        if path.is_file():
            self.best = checkpoint.load_checkpoint(path).get("metrics")

    def __call__(self, epoch: int, stats: dict[str, float]) -> None:
        if "acc_noisy" not in stats:
            return
        record = {"epoch": epoch, "acc_clean": stats["acc_clean"], "acc_noisy": stats["acc_noisy"]}
        if self.best is None or record["acc_noisy"] >= self.best["acc_noisy"]:
            self.best = record
            state = {"model": self.model.state_dict(), "meta": self.spec.to_dict(), "epoch": epoch}
            checkpoint.save_checkpoint(self.run_dir / BEST, {**state, "metrics": record})
        ui.info(
            f"{sigma_name(self.spec.sigma)} epoch {epoch + 1}/{self.epochs}: "
            f"clean {record['acc_clean']:.1%}, noisy {record['acc_noisy']:.1%} "
            f"(best {self.best['acc_noisy']:.1%} at epoch {self.best['epoch'] + 1})"
        )


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
    keeper = BestKeeper(model, run_dir, spec, optim.epochs)
    amp = autocast_dtype(recipe.precision, device, training=True)
    test_loader = build_loader(test_set, recipe.data, optim.batch_size, recipe.seed, train=False)
    objective = build_objective(cfg, sigma, info.num_classes)
    trainer = Trainer(
        model=distributed.wrap_ddp(model, device),  # DDP broadcasts rank 0's initial weights
        loss_fn=objective,
        loader=build_loader(train_set, recipe.data, optim.batch_size, recipe.seed),
        cfg=optim,
        run_dir=run_dir,
        device=device,
        precision=recipe.precision,
        param_groups=(
            probe_groups(model, optim.weight_decay) if probe else layer_decay_groups(model, cfg)
        ),
        make_optimizer=lars(cfg.probe.momentum) if probe else None,
        eval_fn=lambda m: evaluate(
            m, test_loader, sigma, seed=recipe.seed, copies=cfg.eval_noise_copies, amp_dtype=amp
        ),
        eval_every=cfg.eval_every,
        checkpoint_meta=spec.to_dict(),
        on_checkpoint=keeper,
        description=f"{'linprobe' if probe else 'finetune'} {sigma_name(sigma)}",
        section="finetune.probe" if probe else "finetune",
    )
    if trainer.resume():
        keeper.restore()
    history = trainer.fit(stop_after=stop_after)
    return SigmaRun(sigma, run_dir, history, keeper.best or {})


def _warn_probe_ignores(cfg: FinetuneConfig) -> None:
    if not cfg.linear_probe:
        return
    unused = {
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "label_smoothing": cfg.label_smoothing,
        "auto_augment": cfg.auto_augment,
        "reprob": cfg.reprob,
    }
    named = [f"finetune.{k}" for k, v in unused.items() if v]
    if named:
        _ignored(f"{', '.join(named)} ignored in linear probing (MAE's probe uses none of them)")


def run_finetune(
    recipe: Recipe, out: Path | None = None, stop_after: int | None = None
) -> list[SigmaRun]:
    """Fine-tune one classifier per sigma of the recipe; each resumes from its own last.pth."""
    cfg = recipe.finetune
    stage = "linprobe" if cfg.linear_probe else "finetune"
    base = Path(out) if out is not None else recipe.stage_dir(stage)
    run_dirs = {s: base / sigma_name(s) for s in dict.fromkeys(cfg.sigma)}
    device = resolve_device(recipe.device)
    distributed.init_from_env(device)
    fresh = any(not (d / "last.pth").is_file() for d in run_dirs.values())
    init = resolve_init(recipe) if fresh else None
    _warn_probe_ignores(cfg)
    train_set = load_dataset(recipe, "train", augment=True)
    if not cfg.linear_probe:
        apply_timm_augmentation(train_set, cfg, train_set.info)
    test_set = load_dataset(recipe, "test", augment=False)
    return [
        finetune_sigma(recipe, s, d, init, (train_set, test_set), device, stop_after)
        for s, d in run_dirs.items()
    ]
