"""`dmae shard`: write any registered data set as webdataset tar shards plus a manifest.

The data set is built through the registry exactly as a stage would build it (`augment=False`,
at the data set's default `image_size` unless one is given), so the shards hold what training
would have read: for `imagefolder` the evaluation view (shorter side resized, centre crop), for
`digits` the 16x16 upsampled images. Each sample is two tar members, `<key>.<png|jpg|npy>` and
`<key>.cls`, where the key is the item's zero-padded index in the source split, so any sample
can be traced back to its source. Shards are `PREFIX-000000.tar`, `PREFIX-000001.tar`, ...
(webdataset's `ShardWriter`; a new shard starts once `max_count` samples or `max_size` bytes
are reached, so a shard may exceed `max_size` by one sample). The train split is written in a
seeded random order unless `shuffle` says otherwise: image folders list their files class by
class, which a reader's shuffle buffer of a thousand samples cannot undo.

Formats, and what "lossless" means here:
- `png` (default): 8-bit PNG. Exact for every source that is 8-bit to begin with (image files,
  CIFAR-10): the decoded tensor equals the source's. Float sources (digits, which are bicubic
  upsampled) are rounded to the nearest of 256 levels, an error of at most 1/510 ~ 0.002,
  two orders of magnitude below the smallest noise level (sigma 0.25); that is what a user
  expects of an image file and what every image viewer can show.
- `jpeg`: quality 95; about five times smaller than PNG for photographs, lossy.
- `npy`: the float32 (C, H, W) array itself, bit-exact for any source (read back with
  `allow_pickle=False`).

`PREFIX-manifest.json` describes the set: shard names with sample counts, byte sizes and sha256,
the total, the classes, `num_classes`, `image_size`, `channels`, `mean`, `std`, the source (data
set, root, split, options, fingerprint), the format and the settings. The `webdataset` data set
plugin reads its metadata from it. The manifest is rewritten (atomically) after every finished
shard with `"complete": false`; each shard is written to `NAME.partial` and renamed when
finished. An interrupted run therefore leaves only whole shards, and running the same command
again resumes after the last finished shard. Different settings on an existing prefix are
refused unless `overwrite` is set.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from rich.progress import TextColumn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from dmae_cli import __version__
from dmae_cli.data.manifest import MANIFEST_SUFFIX, bad_shard_name, listed_shard
from dmae_cli.plugins import registry
from dmae_cli.runtime import ui
from dmae_cli.runtime.checkpoint import atomic_write_text, file_sha256
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import GracefulStop, Interrupted

MANIFEST_VERSION = 1
FORMATS = {"png": "png", "jpeg": "jpg", "npy": "npy"}  # --format -> tar member suffix
JPEG_QUALITY = 95
SHARD_DIGITS = 6
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class ShardConfig:
    """Everything `dmae shard` needs; the CLI parses flags into one of these."""

    dataset: str
    out: str  # the shard prefix, e.g. /shards/in1k-train (an existing directory gets a default)
    root: str | None = None
    split: str = "train"
    image_size: int | None = None  # None: the data set factory's default
    max_count: int = 10_000
    max_size: int = 10**9
    shuffle: bool | None = None  # None: on for the train split (image folders sort by class)
    seed: int = 0
    format: str = "png"
    options: dict[str, Any] = field(default_factory=dict)
    workers: int = 0  # DataLoader processes decoding and encoding in parallel
    overwrite: bool = False


@dataclass(frozen=True)
class ShardResult:
    prefix: Path
    shards: list[Path]
    manifest: Path
    total: int
    resumed_at: int  # samples already written by an earlier, interrupted run


# -- arguments -------------------------------------------------------------------------------
def parse_size(text: str | int | float) -> int:
    """Bytes from '1GB', '500MB', '1.5GiB', '1e9' or a number (decimal units: 1GB = 10^9)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise UserError(f"size {text!r}: expected e.g. 1GB, 500MB, 2GiB or 1e9 (bytes)")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise UserError(f"size {text!r}: must be at least one byte")
    return int(size)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs for the data set plugin, values read as YAML scalars (like --set)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. split_seed=1")
        try:
            options[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--option {item!r}: the value is not valid YAML") from None
    return options


def check_config(cfg: ShardConfig) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"unknown format {cfg.format!r}; expected one of {', '.join(FORMATS)}")
    if cfg.max_count < 1:
        raise UserError(f"--max-count must be at least 1, got {cfg.max_count}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {cfg.workers}")


# -- names -----------------------------------------------------------------------------------
def resolve_prefix(out: str, dataset: str, split: str) -> Path:
    """The shard prefix; an existing directory gets `<dir>/<dataset>-<split>` inside it."""
    path = Path(out).expanduser()
    if path.is_dir():
        return path / f"{dataset.replace(':', '-')}-{split}"
    if not path.name or path.name in (".", ".."):
        raise UserError(f"--out {out!r}: expected a prefix such as /shards/in1k-train")
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


# -- the source ------------------------------------------------------------------------------
def default_image_size(factory: Any, name: str) -> int:
    """The `image_size` default of a data set factory: its native delivery size."""
    try:
        parameter = inspect.signature(factory).parameters.get("image_size")
    except (TypeError, ValueError):
        parameter = None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise UserError(f"dataset '{name}' has no default image_size; pass --image-size")
    return int(parameter.default)


def load_source(cfg: ShardConfig) -> tuple[Any, int]:
    """The source split, unaugmented, and the side its images are delivered at."""
    factory = registry.datasets.get(cfg.dataset)
    image_size = cfg.image_size or default_image_size(factory, cfg.dataset)
    dataset = factory(cfg.split, root=cfg.root, image_size=image_size, augment=False, **cfg.options)
    if not hasattr(dataset, "info"):
        raise UserError(f"dataset '{cfg.dataset}' returned an object without .info (DatasetInfo)")
    if isinstance(dataset, IterableDataset):  # shuffling and resuming need indices
        raise UserError(f"dataset '{cfg.dataset}' is a stream; dmae shard reads indexable datasets")
    return dataset, image_size


def source_length(dataset: Any, name: str) -> int:
    try:
        length = len(dataset)
    except TypeError:
        raise UserError(
            f"dataset '{name}' does not report its length; dmae shard needs a sized data set"
        ) from None
    if length == 0:
        raise UserError(f"dataset '{name}' is empty")
    return length


def shuffles(cfg: ShardConfig) -> bool:
    """Shuffle unless told: a class-sorted train split defeats the reader's shuffle buffer."""
    return normalized_split(cfg.split) == "train" if cfg.shuffle is None else cfg.shuffle


def sample_order(length: int, shuffle: bool, seed: int) -> np.ndarray:
    """Source indices in shard order: as they are, or one permutation fixed by `seed`."""
    if not shuffle:
        return np.arange(length)
    return np.random.default_rng(seed).permutation(length)


# -- encoding --------------------------------------------------------------------------------
def quantize(image: torch.Tensor) -> torch.Tensor:
    """A [0, 1] float image as uint8, rounded to the nearest of 256 levels."""
    return image.detach().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def encode_image(image: torch.Tensor, fmt: str) -> bytes:
    """One (C, H, W) float image in [0, 1] as PNG, JPEG or npy bytes."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, image.detach().float().cpu().contiguous().numpy(), allow_pickle=False)
        return buffer.getvalue()
    channels = image.shape[0]
    if channels not in (1, 3):
        raise UserError(f"{fmt} holds 1 or 3 channels, the images have {channels}; use npy")
    array = quantize(image).permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array[..., 0] if channels == 1 else array)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


class EncodedItems(Dataset):
    """The source items in shard order, encoded: what DataLoader workers compute in parallel."""

    def __init__(self, source: Any, order: np.ndarray, cfg: ShardConfig, shape: tuple) -> None:
        self.source = source
        self.order = order
        self.fmt = cfg.format
        self.name = cfg.dataset
        self.shape = shape
        self.num_classes = source.info.num_classes

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[int, bytes, int]:
        index = int(self.order[position])
        image, label = self.source[index]
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != self.shape:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise UserError(f"dataset '{self.name}' item {index}: expected {self.shape}, got {got}")
        label = int(label)
        if not 0 <= label < self.num_classes:
            last = self.num_classes - 1
            raise UserError(f"dataset '{self.name}' item {index}: label {label} outside 0..{last}")
        return index, encode_image(image, self.fmt), label


def encoded_stream(
    items: EncodedItems, start: int, workers: int
) -> Iterator[tuple[int, bytes, int]]:
    """Items from position `start` on, in order; decoding and encoding in `workers` processes."""
    remaining = Subset(items, range(start, len(items)))
    if workers == 0:
        yield from (remaining[i] for i in range(len(remaining)))
        return
    # batch_size=None hands items through one by one; the loader keeps their order.
    loader = DataLoader(remaining, batch_size=None, num_workers=workers, prefetch_factor=8)
    for index, data, label in loader:
        yield int(index), bytes(data), int(label)


# -- the manifest ----------------------------------------------------------------------------
def settings(cfg: ShardConfig, image_size: int, fingerprint: str) -> dict[str, Any]:
    """What determines the shards' contents; a resumed run must match it exactly."""
    return {
        "dataset": cfg.dataset,
        "root": str(Path(cfg.root).expanduser().resolve()) if cfg.root else None,
        "split": cfg.split,
        "options": cfg.options,
        "image_size": image_size,
        "source_fingerprint": fingerprint,
        "max_count": cfg.max_count,
        "max_size": cfg.max_size,
        "shuffle": shuffles(cfg),
        "seed": cfg.seed,
        "format": cfg.format,
    }


def normalized_split(split: str) -> str:
    """The manifest's split: "train" or "test" ("val" is an alias), else the name as given."""
    return {"train": "train", "test": "test", "val": "test"}.get(split, split)


def build_manifest(
    cfg: ShardConfig,
    info: Any,
    config: dict[str, Any],
    shards: list[dict[str, Any]],
    complete: bool,
) -> dict[str, Any]:
    total = sum(s["samples"] for s in shards)
    # Defined by the bytes alone: the same shards have the same fingerprint wherever they lie.
    digest = hashlib.sha256(normalized_split(cfg.split).encode())
    for shard in shards:
        digest.update(shard["sha256"].encode())
    return {
        "manifest_version": MANIFEST_VERSION,
        "dmae_version": __version__,
        "complete": complete,
        "split": normalized_split(cfg.split),
        "format": cfg.format,
        "keys": {"image": FORMATS[cfg.format], "label": "cls"},
        "total": total,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "image_size": config["image_size"],
        "channels": info.channels,
        "mean": list(info.mean),
        "std": list(info.std),
        "fingerprint": digest.hexdigest()[:16],
        "source": {
            "dataset": cfg.dataset,
            "root": config["root"],
            "split": cfg.split,
            "options": cfg.options,
            "fingerprint": info.fingerprint,
        },
        "settings": config,
        "shards": shards,
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")


def previous_shards(path: Path, config: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """The finished shards of an earlier run with the same settings, to resume after."""
    if not path.is_file():
        return []
    if overwrite:
        remove_listed_shards(path)
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        same = json.loads(json.dumps(old["settings"], default=str)) == json.loads(
            json.dumps(config, default=str)
        )
        shards = list(old["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a dmae shard manifest; use --overwrite") from None
    if not same:
        raise UserError(
            f"{path} holds shards written with other settings; use another --out or --overwrite"
        )
    for shard in shards:
        try:
            listed = listed_shard(path, shard.get("name") if isinstance(shard, dict) else None)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}; use --overwrite") from None
        if not listed.is_file():
            raise UserError(f"cannot resume: {listed} is missing; use --overwrite")
    return shards


def remove_listed_shards(path: Path) -> None:
    """Delete the shards an old manifest lists (plain names next to it only) and the manifest,
    so that an overwritten set never mixes with leftovers of a longer earlier one."""
    try:
        names = [s["name"] for s in json.loads(path.read_text(encoding="utf-8"))["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    for name in names:
        if bad_shard_name(name) is None and str(name).endswith(".tar"):
            (path.parent / name).unlink(missing_ok=True)  # a link inside: only the link goes
    path.unlink(missing_ok=True)


# -- writing ---------------------------------------------------------------------------------
class AtomicShardWriter:
    """webdataset's `ShardWriter`, each shard written to NAME.partial and renamed when whole.

    After every finished shard `on_shard(record)` is called with its name, sample count, bytes
    and sha256; the caller records it in the manifest, which is what makes resuming safe.
    """

    def __init__(self, prefix: Path, cfg: ShardConfig, start_shard: int, on_shard: Any) -> None:
        import webdataset as wds  # imported here: only this command needs it

        self.on_shard = on_shard
        self.count = 0
        self._file: Any = None
        # ShardWriter names shards `pattern % number`: a '%' in the prefix must stay literal.
        pattern = str(prefix).replace("%", "%%") + f"-%0{SHARD_DIGITS}d.tar"
        self.writer = wds.ShardWriter(
            pattern,
            maxcount=cfg.max_count,
            maxsize=cfg.max_size,
            post=self._finish,
            start_shard=start_shard,
            verbose=0,
            opener=self._open,
            encoder=False,  # values are bytes already: nothing is pickled
            mtime=0,  # reproducible archives: the same settings give the same sha256
        )

    def _open(self, name: str) -> Any:
        self._file = open(name + ".partial", "wb")  # noqa: SIM115 - closed in _finish
        self.count = 0
        return self._file

    def _finish(self, name: str) -> None:
        file, self._file = self._file, None
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(name + ".partial", name)
        path = Path(name)
        self.on_shard(
            {
                "name": path.name,
                "samples": self.count,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )

    def write(self, key: str, image: bytes, suffix: str, label: int) -> None:
        self.writer.write({"__key__": key, suffix: image, "cls": str(label).encode("ascii")})
        self.count += 1

    def close(self) -> None:
        """Finish the last shard (it may be short)."""
        self.writer.close()

    def abort(self) -> None:
        """Drop the shard being written: it may end inside a sample. A rerun redoes it."""
        if self._file is None:
            return
        with suppress(Exception):  # let tarfile flush into the doomed file, not a closed one
            self.writer.tarstream.close()
        self.writer.tarstream = None
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)
        self._file = None


def run_shard(cfg: ShardConfig) -> ShardResult:
    """Write the shards and the manifest (resuming an interrupted run); return where they are."""
    check_config(cfg)
    source, image_size = load_source(cfg)
    info = source.info
    length = source_length(source, cfg.dataset)
    prefix = resolve_prefix(cfg.out, cfg.dataset, cfg.split)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    manifest_file = manifest_path(prefix)
    config = settings(cfg, image_size, info.fingerprint)
    shards = previous_shards(manifest_file, config, cfg.overwrite)
    start = sum(s["samples"] for s in shards)
    if start < length or not shards:
        _write_shards(cfg, source, prefix, config, shards, start, image_size)
    manifest = build_manifest(cfg, info, config, shards, complete=True)
    write_manifest(manifest_file, manifest)
    return ShardResult(
        prefix, [prefix.parent / s["name"] for s in shards], manifest_file, manifest["total"], start
    )


def _write_shards(
    cfg: ShardConfig,
    source: Any,
    prefix: Path,
    config: dict[str, Any],
    shards: list[dict[str, Any]],
    start: int,
    image_size: int,
) -> None:
    """Append shards after the `start` samples already written (the list grows in place)."""
    info = source.info
    order = sample_order(len(source), shuffles(cfg), cfg.seed)
    items = EncodedItems(source, order, cfg, (info.channels, image_size, image_size))
    manifest_file = manifest_path(prefix)
    key_width = max(SHARD_DIGITS, len(str(len(order) - 1)))
    suffix = FORMATS[cfg.format]

    def finished(record: dict[str, Any]) -> None:
        shards.append(record)
        write_manifest(manifest_file, build_manifest(cfg, info, config, shards, complete=False))

    columns = (TextColumn("shard {task.fields[shard]}"),)
    with GracefulStop() as stop, ui.progress(*columns) as bar:
        task = bar.add_task(
            f"shard {cfg.dataset}", total=len(order), completed=start, shard=len(shards)
        )
        writer = AtomicShardWriter(prefix, cfg, len(shards), finished)
        try:
            for index, data, label in encoded_stream(items, start, cfg.workers):
                writer.write(f"{index:0{key_width}d}", data, suffix, label)
                bar.update(task, advance=1, shard=len(shards))
                if stop.requested():
                    break  # between samples: the shard in progress is whole, only short
        except BaseException:  # failed, or a second Ctrl-C: keep only the finished shards
            writer.abort()
            raise
        writer.close()
        bar.update(task, shard=len(shards))
    if stop.signum:
        written = sum(s["samples"] for s in shards)
        raise Interrupted(
            f"interrupted after {written} of {len(order)} samples ({len(shards)} shards kept); "
            "run the same dmae shard command again to resume",
            stop.signum,
        )


def summary(result: ShardResult) -> list[str]:
    """What the CLI prints: where the shards went and how to train on them."""
    pattern = brace_pattern(result.prefix, len(result.shards))
    lines = [f"{result.total} samples in {len(result.shards)} shards: {pattern}"]
    if result.resumed_at:
        lines.append(f"resumed after {result.resumed_at} samples written by an earlier run")
    lines.append(f"manifest: {result.manifest}")
    lines.append(
        f"train on them: --set data.dataset=webdataset --set data.root={result.prefix.parent}"
    )
    return lines
