"""The first layer of every model: [0, 1] pixels at the data's native size in, normalised
model-size images out.

Images reach every model as float tensors in [0, 1] pixel space at the data set's native
resolution. `InputAdapter` resizes them (only when the model's input size differs) and
normalises them, so noise added by the caller is always pixel-space noise and a certified radius
is a pixel-space radius.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class InputAdapter(nn.Module):
    """[0, 1] pixels at native size -> bicubic resize to the model's size -> mean/std normalise."""

    def __init__(
        self, input_size: int, model_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.model_size = model_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.model_size or pixels.shape[-2] != self.model_size:
            size = (self.model_size, self.model_size)
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False)
        return (pixels - self.mean) / self.std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised model-size images back to [0, 1] pixels (for pictures)."""
        return (x * self.std + self.mean).clamp(0, 1)
