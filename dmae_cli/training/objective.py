"""The fine-tuning objective: Gaussian noise augmentation with consistency regularisation.

Each image is repeated `num_noise` times, each copy with independent N(0, sigma^2) noise in
[0, 1] pixel space; the loss is the copies' cross-entropy plus Jeong & Shin's (2020) consistency
term, lbd * mean_i KL(avg || p_i) + eta * H(avg), with `p_i` the softmax of copy i and `avg`
their mean (docs/method.md, "Fine-tuning: the base classifier"). `consistency: false` leaves
plain Gaussian augmentation. At sigma 0 the objective is plain cross-entropy on the clean
images: a clean classifier, for a denoiser to stand in front of (`dmae certify --denoiser`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from dmae_cli.config.recipe import FinetuneConfig
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.augment import ConfigIgnoredWarning

# The published (lbd, eta) for the published sigmas; other sigmas use the rule of the nearest
# one (below 0.75 the sigma <= 0.5 rule, from 0.75 up the sigma = 1.0 rule).
PAPER_CONSISTENCY = {0.25: (2.0, 0.5), 0.5: (2.0, 0.5), 1.0: (2.0, 0.1)}


def consistency_defaults(sigma: float) -> tuple[float, float]:
    """(lbd, eta) for `sigma`: the published values, or those of the nearest published sigma."""
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
    noise in [0, 1] pixel space at the images' own resolution (before the model's adapter).
    At sigma 0 the images themselves: no noise is drawn."""
    repeated = images.repeat(copies, 1, 1, 1)
    if sigma == 0:
        return repeated
    return repeated + sigma * torch.randn_like(repeated)


@dataclass
class Objective:
    """The loss of one fine-tuning batch: cross-entropy on noisy copies, plus consistency."""

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


def warn_clean_ignores(cfg: FinetuneConfig) -> None:
    """Warn about the noise settings a clean classifier (sigma 0 among the sigmas) ignores."""
    if 0 not in cfg.sigma:
        return
    unused = {
        "consistency": cfg.consistency,
        "num_noise": cfg.num_noise > 1,
        "lbd": cfg.lbd is not None,
        "eta": cfg.eta is not None,
        "eval_noise_copies": cfg.eval_noise_copies > 1,
    }
    named = [f"finetune.{k}" for k, v in unused.items() if v]
    if named:
        warnings.warn(
            f"{', '.join(named)} ignored at sigma 0: a clean classifier trains on one "
            f"noise-free copy of each image, with nothing for consistency to compare",
            ConfigIgnoredWarning,
            stacklevel=2,
        )


def build_objective(cfg: FinetuneConfig, sigma: float, num_classes: int) -> Objective:
    """The recipe's objective at `sigma`; a linear probe keeps only noise and consistency.
    At sigma 0 (a clean classifier) one copy of each image, without noise or consistency."""
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
        num_noise=cfg.num_noise if sigma > 0 else 1,
        consistency=cfg.consistency and sigma > 0,
        lbd=cfg.lbd if cfg.lbd is not None else default_lbd,
        eta=cfg.eta if cfg.eta is not None else default_eta,
        label_smoothing=0.0 if cfg.linear_probe else cfg.label_smoothing,
        mixup=mixup,
    )
