"""The hot path of certification: class counts of a classifier on noisy copies of one image.

A certifier asks for `counts(num)` several times per image; each call draws `num` copies of
the image plus N(0, sigma^2 I) noise, generated in fp32 in [0, 1] pixel space at the image's
native resolution directly on the model's device (the model's `InputAdapter` then resizes and
normalises), forwards them in batches (bf16 autocast on CUDA unless the recipe says fp32),
and votes with argmax. Predictions are written into one preallocated device tensor and counted
by a single `bincount` at the end, so the batches run back to back with no host
synchronisation between them (CUDA's `bincount` synchronises to size its output: once per
call, together with the copy of the counts to the host, instead of once per batch).

Every example draws its noise from its own generator, seeded from (seed, example index), so a
certificate does not depend on how many processes share the work, on which examples ran
before it, or on a resume.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from dmae_cli.api import CountsFn
from dmae_cli.train import autocast, autocast_dtype


def example_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for example `index` of a run seeded with `seed`.

    Hashed rather than `seed + index` so that runs with neighbouring seeds do not share noise.
    """
    digest = hashlib.sha256(f"dmae-certify/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(example_seed(seed, index))


class Sampler:
    """Counts the votes of `model` on noisy copies of an image, `batch_size` copies at a time.

    `drawn` counts every noisy copy classified so far (for throughput displays).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        precision: str = "auto",
    ) -> None:
        if sigma <= 0 or batch_size < 1 or num_classes < 1:
            raise ValueError(
                f"sampler: need sigma > 0, batch_size >= 1 and num_classes >= 1, got "
                f"{sigma}, {batch_size} and {num_classes}"
            )
        self.model = model.eval()
        self.sigma = float(sigma)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.amp = autocast_dtype(precision, self.device)
        self.drawn = 0

    def counts(self, image: torch.Tensor, generator: torch.Generator) -> CountsFn:
        """The `counts(num)` function of one (C, H, W) image in [0, 1], for a certifier."""
        clean = image.to(self.device, torch.float32).unsqueeze(0)
        return lambda num: self._count(clean, num, generator)

    @torch.inference_mode()
    def _count(self, clean: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        votes = torch.empty(num, dtype=torch.int64, device=self.device)
        for start in range(0, num, self.batch_size):
            size = min(self.batch_size, num - start)
            noise = torch.randn((size, *clean.shape[1:]), generator=generator, device=self.device)
            with autocast(self.amp, self.device):
                logits = self.model(noise.mul_(self.sigma).add_(clean))
            votes[start : start + size] = logits.argmax(dim=1)
        self.drawn += num
        return torch.bincount(votes, minlength=self.num_classes).cpu()
