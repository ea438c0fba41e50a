"""A module that cannot be imported: it needs a package that is not installed."""

from __future__ import annotations

import acme_dmae_plugins_native  # noqa: F401  (does not exist: importing this module fails)


def blobs(split: str, *, root: str | None, image_size: int, augment: bool) -> None:
    """Never reached."""
