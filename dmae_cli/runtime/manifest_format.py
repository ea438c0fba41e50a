"""The shard manifest format: what `PREFIX-manifest.json` may say, checked field by field.

`dmae shard` writes a manifest beside its tar shards (`dmae_cli/data/manifest.py` builds it);
the `webdataset` dataset plugin, or any reader of dmae's shards, reads one back through
`dmae_cli.api.manifest_format`. A manifest is a data file: whoever wrote it need not be whoever
runs dmae on it. So the shard names it lists are only ever plain file names inside the
manifest's own directory (`listed_shard`): never a `pipe:` command, a URL, an absolute path, a
`..` or a symlink leading out of the directory. Every field is checked for its type and range
before anything uses it (`check_manifest`), and a manifest is read only up to
`MAX_MANIFEST_BYTES`: a count of 10**15 samples, a channel count that is a string or a JSON
nesting a million deep ends in one line naming the field, never in an allocation the file
asked for.

This module imports nothing of dmae: the format is shared by the core and its plugins.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MANIFEST_SUFFIX = "-manifest.json"
MANIFEST_VERSION = 1
FORMATS = {"png": "png", "jpeg": "jpg", "npy": "npy"}  # --format -> tar member suffix
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
