"""`dmae plugins --check`: import a plugin and check it on real output, never raising.

Every kind: the module imports and the factory's signature fits its contract (`entry.load`).
Certifiers: the certifier its factory builds with no options, and which API it implements.
Datasets: built for "train" on the tiny data the factory's optional `synthetic_root` writes
(else without a root), then checked as a stage checks it (its `.info` and first item); one
that needs files and cannot make them is "not checked: needs data". Backbones are
not built: a ViT-H takes seconds and gigabytes, and a stage checks what it builds.
"""

from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass
from typing import Any

from dmae_cli.api import certifier_api
from dmae_cli.plugins import boundary
from dmae_cli.plugins.registry import PluginEntry, describe_failure
from dmae_cli.runtime.errors import UserError

CHECK_IMAGE_SIZE = 32  # for a dataset factory without a default image_size
NEEDS_DATA = "not checked: needs data"


@dataclass(frozen=True)
class Verdict:
    """What `--check` found: a status (`ok`, `failed` or `not checked: needs data`), what went
    wrong (or why it was not checked), and a certifier's API."""

    status: str
    error: str | None = None
    api: int | None = None


def verify(entry: PluginEntry) -> Verdict:
    """Import, check and (for datasets) build the plugin of `entry`; never raises."""
    try:
        obj = entry.load()
    except Exception as exc:  # a broken plugin is a row of the report, not a crash
        return Verdict("failed", describe_failure(exc))
    if entry.kind == "certifier":
        try:
            return Verdict("ok", api=certifier_api(obj))
        except Exception as exc:
            return Verdict("failed", f"certifier_api: {type(exc).__name__}: {exc}")
    if entry.kind == "dataset":
        return verify_dataset(entry, obj)
    return Verdict("ok")


def default_image_size(factory: Any) -> int:
    try:
        parameter = inspect.signature(factory).parameters.get("image_size")
    except (TypeError, ValueError):
        return CHECK_IMAGE_SIZE
    default = None if parameter is None else parameter.default
    if isinstance(default, int) and not isinstance(default, bool) and default > 0:
        return default
    return CHECK_IMAGE_SIZE


def verify_dataset(entry: PluginEntry, factory: Any) -> Verdict:
    """Build the dataset as a stage would and check it: on the tiny data its factory's optional
    `synthetic_root(directory) -> root` writes, else without a root."""
    make_root = getattr(factory, "synthetic_root", None)
    with tempfile.TemporaryDirectory(prefix="dmae-check-") as directory:
        try:
            with boundary.contained(entry):
                root = make_root(directory) if callable(make_root) else None
                dataset = factory(
                    "train", root=root, image_size=default_image_size(factory), augment=False
                )
        except boundary.PluginFailure as exc:
            if root_missing(exc) and not callable(make_root):  # it said what it needs
                return Verdict(NEEDS_DATA, boundary.one_line(exc.__cause__ or exc))
            return Verdict("failed", str(exc))
        try:
            boundary.check_dataset(entry, dataset, "train")
        except boundary.PluginFailure as exc:
            return Verdict("failed", str(exc))
    return Verdict("ok")


def root_missing(exc: boundary.PluginFailure) -> bool:
    """Whether building failed with the plugin's own report of a user mistake (no data)."""
    return isinstance(exc.__cause__, UserError | ValueError)
