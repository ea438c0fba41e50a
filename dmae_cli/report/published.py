"""Published certified accuracies (the DMAE paper's comparison tables), shipped as package data
with their sources.

The numbers live in `dmae_cli/report/published.yaml` so that they can be read, cited and
corrected without touching code; this module only loads and looks them up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from dmae_cli.runtime.errors import UserError

DATA = "report/published.yaml"
RADIUS_TOLERANCE = 1e-9  # radii are compared as decimals written in a table, not computed


@dataclass(frozen=True)
class PublishedRow:
    method: str
    params: str
    reference: str
    accuracy: dict[float, float]  # radius -> certified accuracy in %

    def at(self, radius: float) -> float | None:
        """The published number at `radius`, or None where the paper gives none."""
        for r, value in self.accuracy.items():
            if abs(r - radius) <= RADIUS_TOLERANCE:
                return value
        return None


@dataclass(frozen=True)
class PublishedTable:
    name: str
    title: str
    source: str
    radii: tuple[float, ...]
    rows: tuple[PublishedRow, ...]


@functools.cache
def _raw() -> dict[str, Any]:
    text = resources.files("dmae_cli").joinpath(DATA).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def names() -> list[str]:
    return list(_raw())


def published_table(name: str) -> PublishedTable:
    """The published table `name` (imagenet, cifar10); a `UserError` for an unknown name."""
    raw = _raw()
    if name not in raw:
        raise UserError(f"--compare {name!r}: unknown table; choose one of {', '.join(raw)}")
    table = raw[name]
    radii = tuple(float(r) for r in table["radii"])
    rows = []
    for row in table["rows"]:
        assert len(row["accuracy"]) == len(radii), f"{DATA}: {name}: {row['method']}"
        accuracy = dict(zip(radii, (float(v) for v in row["accuracy"]), strict=True))
        rows.append(PublishedRow(row["method"], str(row["params"]), row["reference"], accuracy))
    return PublishedTable(name, table["title"], table["source"], radii, tuple(rows))
