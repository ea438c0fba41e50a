"""The shard manifest that `dmae shard` writes and the `webdataset` dataset reads.

`PREFIX-manifest.json` describes a set of shards: the shard names with sample counts, byte sizes
and sha256, the total, the classes, `num_classes`, `image_size`, `channels`, `mean`, `std`, the
source (data set, root, split, options, fingerprint), the format and the settings. The
`webdataset` data set plugin reads its metadata from it. `dmae shard` rewrites it (atomically)
after every finished shard with `"complete": false`, and once more with `"complete": true` at the
end; a rerun with the same settings resumes after the shards it lists, and different settings on
an existing prefix are refused unless the caller overwrites.

The format itself, what a manifest may say and how a shard name it lists is opened, is
`dmae_cli/runtime/manifest_format.py`, shared with the plugins through `dmae_cli.api`; this
module builds, writes and reads back manifests for `dmae shard`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dmae_cli import __version__
from dmae_cli.runtime.checkpoint import atomic_write_text
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.manifest_format import (
    FORMATS,
    MANIFEST_SUFFIX,
    MANIFEST_VERSION,
    MAX_MANIFEST_BYTES,
    ManifestError,
    bad_shard_name,
    listed_shard,
    read_manifest_file,
)

SHARD_DIGITS = 6


# -- names and patterns of the shards ------------------------------------------------------
def manifest_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + MANIFEST_SUFFIX)


def shard_path(prefix: Path, index: int) -> Path:
    return prefix.with_name(f"{prefix.name}-{index:0{SHARD_DIGITS}d}.tar")


def brace_pattern(prefix: Path, count: int) -> str:
    """The brace pattern naming all `count` shards, as the `webdataset` plugin accepts it."""
    if count == 1:
        return str(shard_path(prefix, 0))
    last = f"{count - 1:0{SHARD_DIGITS}d}"
    return str(prefix.with_name(f"{prefix.name}-{{{0:0{SHARD_DIGITS}d}..{last}}}.tar"))


def normalized_split(split: str) -> str:
    """The manifest's split: "train" or "test" ("val" is an alias), else the name as given."""
    return {"train": "train", "test": "test", "val": "test"}.get(split, split)


# -- writing ---------------------------------------------------------------------------------
def build_manifest(
    info: Any, config: dict[str, Any], shards: list[dict[str, Any]], complete: bool
) -> dict[str, Any]:
    """The manifest of `shards`, written from the source's `info` with settings `config`."""
    total = sum(s["samples"] for s in shards)
    split = normalized_split(config["split"])
    # Defined by the bytes alone: the same shards have the same fingerprint wherever they lie.
    digest = hashlib.sha256(split.encode())
    for shard in shards:
        digest.update(shard["sha256"].encode())
    return {
        "manifest_version": MANIFEST_VERSION,
        "dmae_version": __version__,
        "complete": complete,
        "split": split,
        "format": config["format"],
        "keys": {"image": FORMATS[config["format"]], "label": "cls"},
        "total": total,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "image_size": config["image_size"],
        "channels": info.channels,
        "mean": list(info.mean),
        "std": list(info.std),
        "fingerprint": digest.hexdigest()[:16],
        "source": {
            "dataset": config["dataset"],
            "root": config["root"],
            "split": config["split"],
            "options": config["options"],
            "fingerprint": info.fingerprint,
        },
        "settings": config,
        "shards": shards,
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")


# -- reading back, to resume or overwrite ----------------------------------------------------
def previous_shards(path: Path, config: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """The finished shards of an earlier run with the same settings, to resume after."""
    if not path.is_file():
        return []
    if overwrite:
        remove_listed_shards(path)
        return []
    try:
        old = read_manifest_file(path)
    except (OSError, ManifestError) as exc:
        raise UserError(f"{path} is not a dmae shard manifest ({exc}); use --overwrite") from None
    if "settings" not in old or not all("sha256" in s for s in old.get("shards", [])):
        raise UserError(f"{path} is not a dmae shard manifest; use --overwrite")
    same = json.loads(json.dumps(old["settings"], default=str)) == json.loads(
        json.dumps(config, default=str)
    )
    if not same:
        raise UserError(
            f"{path} holds shards written with other settings; use another --out or --overwrite"
        )
    shards = list(old.get("shards", []))
    for shard in shards:
        try:
            listed = listed_shard(path, shard["name"])
        except ValueError as exc:
            raise UserError(f"{path}: {exc}; use --overwrite") from None
        if not listed.is_file():
            raise UserError(f"cannot resume: {listed} is missing; use --overwrite")
    return shards


def remove_listed_shards(path: Path) -> None:
    """Delete the shards an old manifest lists (plain names next to it only) and the manifest,
    so that an overwritten set never mixes with leftovers of a longer earlier one."""
    try:  # only the names are needed: a manifest wrong elsewhere still lists its shards
        with path.open("rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        old = json.loads(text) if len(text) <= MAX_MANIFEST_BYTES else {}
        names = [s.get("name") for s in old.get("shards", []) if isinstance(s, dict)]
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        names = []
    for name in names:
        if bad_shard_name(name) is None and str(name).endswith(".tar"):
            (path.parent / name).unlink(missing_ok=True)  # a link inside: only the link goes
    path.unlink(missing_ok=True)
