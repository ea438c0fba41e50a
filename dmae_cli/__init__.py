"""dmae: Denoising Masked AutoEncoders for certified robustness by randomized smoothing.

The Python API (docs/api.md) is the names of `__all__`:

    from dmae_cli import Smoothed, load_classifier

    smoothed = Smoothed(load_classifier("best.pth"), sigma=0.5)
    labels = smoothed.predict(images, n=1000, alpha=0.001)

They are imported on first use, so `import dmae_cli` stays cheap (no torch). `API_VERSION`
here is the Python API's version: it changes whenever one of these names changes
incompatibly. (The plugin contracts have their own, `dmae_cli.api.API_VERSION`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
API_VERSION = 1

__all__ = [
    "ABSTAIN",
    "API_VERSION",
    "BaseClassifier",
    "Certificate",
    "Smoothed",
    "UserError",
    "__version__",
    "load_classifier",
]

if TYPE_CHECKING:
    from dmae_cli.api import ABSTAIN, Certificate
    from dmae_cli.runtime.errors import UserError
    from dmae_cli.smoothing.smoothed import BaseClassifier, Smoothed, load_classifier


def __getattr__(name: str) -> Any:
    """The public names, imported when first asked for (PEP 562)."""
    if name in ("ABSTAIN", "Certificate"):
        from dmae_cli import api

        return getattr(api, name)
    if name == "UserError":
        from dmae_cli.runtime.errors import UserError

        return UserError
    if name in ("BaseClassifier", "Smoothed", "load_classifier"):
        from dmae_cli.smoothing import smoothed

        return getattr(smoothed, name)
    raise AttributeError(f"module 'dmae_cli' has no attribute {name!r}")
