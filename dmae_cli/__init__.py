"""dmae: Denoising Masked AutoEncoders for certified robustness by randomized smoothing."""

from __future__ import annotations

__version__ = "0.1.0"
