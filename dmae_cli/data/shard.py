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

This module is the stage: its settings, the source and its order, the loop and the summary.
The formats (`png`, `jpeg`, `npy`, and what "lossless" means for each) and the atomic shard
writer are in `shard_writer.py`; `PREFIX-manifest.json`, its contents and the rules for
resuming from it are in `manifest.py`, which the `webdataset` data set plugin reads too.
Each shard is written to `NAME.partial` and renamed when finished, and the manifest is
rewritten (atomically) after every finished shard, so an interrupted run leaves only whole
shards and running the same command again resumes after the last one. Different settings on
an existing prefix are refused unless `overwrite` is set.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.progress import TextColumn
from torch.utils.data import IterableDataset

from dmae_cli.data.manifest import (
    FORMATS,
    SHARD_DIGITS,
    brace_pattern,
    build_manifest,
    manifest_path,
    normalized_split,
    previous_shards,
    write_manifest,
)
from dmae_cli.data.shard_writer import AtomicShardWriter, EncodedItems, encoded_stream
from dmae_cli.plugins import registry
from dmae_cli.plugins.boundary import build_dataset
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import GracefulStop, Interrupted
from dmae_cli.runtime.lock import run_lock

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
    dataset = build_dataset(  # a plugin's failure, its info and first item: one line naming it
        cfg.dataset,
        cfg.split,
        root=cfg.root,
        image_size=image_size,
        augment=False,
        options=cfg.options,
    )
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


# -- the run ---------------------------------------------------------------------------------
def settings(cfg: ShardConfig, image_size: int, fingerprint: str) -> dict[str, Any]:
    """What determines the shards' contents (the manifest's `settings`); a resumed run must
    match it exactly."""
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


def run_shard(cfg: ShardConfig) -> ShardResult:
    """Write the shards and the manifest (resuming an interrupted run); return where they are."""
    check_config(cfg)
    source, image_size = load_source(cfg)
    length = source_length(source, cfg.dataset)
    prefix = resolve_prefix(cfg.out, cfg.dataset, cfg.split)
    with run_lock(prefix.parent, f".{prefix.name}.lock", what=f"{prefix}-*"):
        return _shard(cfg, source, image_size, length, prefix)


def _shard(
    cfg: ShardConfig, source: Any, image_size: int, length: int, prefix: Path
) -> ShardResult:
    info = source.info
    prefix.parent.mkdir(parents=True, exist_ok=True)
    manifest_file = manifest_path(prefix)
    config = settings(cfg, image_size, info.fingerprint)
    shards = previous_shards(manifest_file, config, cfg.overwrite)
    start = sum(s["samples"] for s in shards)
    if start < length or not shards:
        _write_shards(cfg, source, prefix, config, shards, start, image_size)
    manifest = build_manifest(info, config, shards, complete=True)
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
    shape = (info.channels, image_size, image_size)
    items = EncodedItems(source, order, cfg.format, cfg.dataset, shape)
    manifest_file = manifest_path(prefix)
    key_width = max(SHARD_DIGITS, len(str(len(order) - 1)))
    suffix = FORMATS[cfg.format]

    def finished(record: dict[str, Any]) -> None:
        shards.append(record)
        write_manifest(manifest_file, build_manifest(info, config, shards, complete=False))

    columns = (TextColumn("shard {task.fields[shard]}"),)
    with GracefulStop() as stop, ui.progress(*columns) as bar:
        task = bar.add_task(
            f"shard {cfg.dataset}", total=len(order), completed=start, shard=len(shards)
        )
        writer = AtomicShardWriter(prefix, cfg.max_count, cfg.max_size, len(shards), finished)
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
