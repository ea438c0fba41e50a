"""The shard manifest that `dmae shard` writes and the `webdataset` dataset reads.

`PREFIX-manifest.json` describes a set of shards: the shard names with sample counts, byte sizes
and sha256, the total, the classes, `num_classes`, `image_size`, `channels`, `mean`, `std`, the
source (data set, root, split, options, fingerprint), the format and the settings. The
`webdataset` data set plugin reads its metadata from it. `dmae shard` rewrites it (atomically)
after every finished shard with `"complete": false`, and once more with `"complete": true` at the
end; a rerun with the same settings resumes after the shards it lists, and different settings on
an existing prefix are refused unless the caller overwrites.

A manifest is a data file: whoever wrote it need not be whoever runs dmae on it. So the shard
names it lists are only ever plain file names inside the manifest's own directory, opened as
files: never a `pipe:` command, a URL, an absolute path, a `..` or a symlink leading out of the
directory. Commands and URLs stay possible where the user types them (a recipe, `--set`).
Every field is checked for its type and range before anything uses it (`check_manifest`), and
a manifest is read only up to `MAX_MANIFEST_BYTES`: a count of 10**15 samples, a channel count
that is a string or a JSON nesting a million deep ends in one line naming the field, never in
an allocation the file asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmae_cli import __version__
from dmae_cli.runtime.checkpoint import atomic_write_text
from dmae_cli.runtime.errors import UserError

MANIFEST_SUFFIX = "-manifest.json"
MANIFEST_VERSION = 1
FORMATS = {"png": "png", "jpeg": "jpg", "npy": "npy"}  # --format -> tar member suffix
SHARD_DIGITS = 6
# Bounds on what a manifest may claim: far beyond any real data set, far below what would
# exhaust a machine if believed (a classifier head per class, a buffer per sample).
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_SHARD_SAMPLES = 10**8
MAX_CLASSES = 10**6
MAX_CHANNELS = 1024
MAX_IMAGE_SIZE = 2**16
_TYPES: dict[str, type] = {
    "complete": bool,
    "split": str,
    "format": str,
    "fingerprint": str,
    "keys": dict,
    "source": dict,
    "settings": dict,
    "shards": list,
    "mean": list,
    "std": list,
}
_KIND_NAMES = {bool: "true or false", str: "a string", dict: "an object", list: "a list"}


# -- names -----------------------------------------------------------------------------------
def bad_shard_name(name: object) -> str | None:
    """Why `name` is not a plain file name a manifest may list; None when it is one."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        return "a path, not a file name"
    # No ':' at all: it rules out every spelling of `pipe:`, `file:` or a URL scheme at once,
    # and no shard writer puts one in a name.
    if ":" in name:
        return "a URL or command, not a file name"
    if name != name.strip() or not name.isprintable():
        return "blank or control characters at its ends or inside"
    return None


def listed_shard(manifest: Path, name: object) -> Path:
    """The absolute path of shard `name` as `manifest` lists it.

    Raises ValueError naming the problem when `name` is not a plain file name, or when the
    file (through a symlink) lies outside the manifest's directory.
    """
    problem = bad_shard_name(name)
    if problem is not None:
        raise ValueError(f"bad shard name {name!r}: {problem}")
    assert isinstance(name, str)
    directory = manifest.expanduser().absolute().parent.resolve()
    path = directory / name
    if not path.resolve().is_relative_to(directory):
        raise ValueError(f"shard {name!r} is a link to a file outside {str(directory)!r}")
    return path


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


# -- checking what a manifest says -------------------------------------------------------------
class ManifestError(ValueError):
    """A manifest field of the wrong type or out of range; the message names the field."""


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ManifestError(f"{field} must be an integer from {low} to {high}, got {_show(value)}")
    return value


def _numbers(value: Any, field: str, count: int, positive: bool = False) -> list[float]:
    what = f"a list of {count} finite {'positive ' if positive else ''}numbers (one per channel)"
    if not isinstance(value, list) or len(value) != count:
        raise ManifestError(f"{field} must be {what}, got {_show(value)}")
    for item in value:
        number = not isinstance(item, bool) and isinstance(item, int | float)
        if not number or not math.isfinite(item) or (positive and item <= 0):
            raise ManifestError(f"{field} must be {what}, got {_show(value)}")
    return [float(item) for item in value]


def _show(value: Any) -> str:
    """A value for a message: its repr, cut short (a hostile file can make it any length)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_metadata(meta: Mapping[str, Any]) -> None:
    """What a data set needs to describe its images, from a manifest or options: num_classes,
    channels, mean, std, class_names, image_size, each of its type and in range when present."""
    if "num_classes" in meta:
        _integer(meta["num_classes"], "num_classes", 1, MAX_CLASSES)
    if "image_size" in meta:
        _integer(meta["image_size"], "image_size", 1, MAX_IMAGE_SIZE)
    if "channels" in meta:
        channels = _integer(meta["channels"], "channels", 1, MAX_CHANNELS)
        for key in ("mean", "std"):
            if key in meta:
                _numbers(meta[key], key, channels, positive=key == "std")
    names = meta.get("class_names")
    if names is not None:
        named = isinstance(names, list) and all(
            isinstance(n, str | int) and not isinstance(n, bool) for n in names
        )
        if not named:
            raise ManifestError(f"class_names must be a list of names, got {_show(names)}")
        if "num_classes" in meta and len(names) != meta["num_classes"]:
            raise ManifestError(f"{len(names)} class_names for num_classes={meta['num_classes']}")


def check_manifest(manifest: Any) -> dict[str, Any]:
    """`manifest` (parsed JSON) when every field it has is of its type and in range.

    Raises ManifestError naming the first field that is not. A manifest is a data file anyone
    may have written; nothing in it is used before this check (the shard names are checked
    again where they are opened: `listed_shard`).
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"not a JSON object but {type(manifest).__name__}")
    version = manifest.get("manifest_version", MANIFEST_VERSION)
    _integer(version, "manifest_version", 1, MANIFEST_VERSION)
    for key, kind in _TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise ManifestError(f"{key} must be {_KIND_NAMES[kind]}, got {_show(manifest[key])}")
    fmt = manifest.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ManifestError(f"format must be one of {', '.join(FORMATS)}, got {_show(fmt)}")
    check_metadata(manifest)
    if fmt in ("png", "jpeg") and manifest.get("channels", 3) not in (1, 3):
        raise ManifestError(f"{fmt} images hold 1 or 3 channels, not {manifest['channels']}")
    total = sum(_check_shard(i, s) for i, s in enumerate(manifest.get("shards", [])))
    if "total" in manifest and _integer(manifest["total"], "total", 0, 2**63) != total:
        raise ManifestError(f"total is {manifest['total']} but its shards hold {total} samples")
    return manifest


def _check_shard(index: int, shard: Any) -> int:
    """The samples of the `index`-th shard record, once its fields are checked."""
    where = f"shard {index}"
    if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
        raise ManifestError(f"{where} must be an object with a file name, got {_show(shard)}")
    where = f"shard {index} ({shard['name']!r})"
    if "samples" not in shard:
        raise ManifestError(f"{where} gives no samples count")
    samples = _integer(shard["samples"], f"{where}: samples", 0, MAX_SHARD_SAMPLES)
    if "bytes" in shard:
        _integer(shard["bytes"], f"{where}: bytes", 0, 2**63)
    digest = shard.get("sha256", "0" * 64)
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ManifestError(f"{where}: sha256 must be 64 hex digits, got {_show(digest)}")
    return samples


def parse_manifest(text: str | bytes) -> dict[str, Any]:
    """A manifest from its JSON text, checked (`check_manifest`); ManifestError when it is not
    one. The caller bounds the text's size (`MAX_MANIFEST_BYTES`)."""
    try:
        data = json.loads(text)
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise ManifestError("not a JSON manifest: nested too deeply") from None
    except ValueError as exc:  # including bad UTF-8 and integers of thousands of digits
        raise ManifestError(f"not JSON: {exc}") from None
    return check_manifest(data)


def read_manifest_file(path: Path) -> dict[str, Any]:
    """A local manifest file, size-bounded and checked; OSError or ManifestError otherwise."""
    with path.open("rb") as f:
        text = f.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a shard manifest")
    return parse_manifest(text)


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
