"""Webdataset tar shards (as `dmae shard` writes them), streamed from local disk or a command.

Where the shards are (the first that applies wins):
- option `urls_train` / `urls_test`: the shards of that split;
- option `urls`: the shards, whatever the split;
- `root`, a directory: the `*-manifest.json` there whose split is the requested one (so one
  `data.root=/shards` serves `/shards/in1k-train-*.tar` and `/shards/in1k-val-*.tar`);
- `root`, a `.json` file: that manifest; its shards lie next to it;
- `root`, anything else: a shard pattern or URL, as for `urls`.
A pattern is brace-expanded (`/shards/in1k-train-{000000..001023}.tar`); several are joined
with `::`. Local paths, `file:` and `pipe:CMD` URLs work, the latter for object stores through
their command-line tools (`pipe:aws s3 cp s3://bucket/in1k-train-000000.tar -`).

Metadata (num_classes, class names, channels, mean, std, stored image size, samples per shard)
comes from the manifest: option `manifest` (a path or a `pipe:` URL), or the one `dmae shard`
wrote next to local shards (`PREFIX-manifest.json` beside `PREFIX-000000.tar`). Options
`num_classes`, `channels`, `mean`, `std` and `class_names` override it (with a warning) or
stand in for it; without either, construction fails with one line saying what to set. A
manifest of another split than the requested one is refused: training on test data by a
misplaced pattern must not pass silently.

Distribution and length. The shards are shuffled per epoch (train split; the same permutation
on every rank), then dealt to ranks (`wds.split_by_node`) and within a rank to DataLoader
workers (`wds.split_by_worker`'s rule). `len(dataset)` is the number of samples this rank yields per
epoch. For the train split every rank yields the same number: the smallest of the ranks'
shares (the few extra samples of a luckier rank wait for another epoch), and a rank that loses
samples to a bad shard tops up by reading its shards again, so no rank ever runs out of
batches before the others and DistributedDataParallel never waits forever. With `resampled:
true` each worker instead draws shards at random with replacement, forever, and every rank
yields exactly `epoch_length` samples per epoch (default: the manifest's total / world size):
the mode for many nodes, and for shards that do not split evenly. The test split is read
exactly once, in order, each rank its own shards; `len` is then that rank's share.
`set_batch_size(n)` (called by the trainer's loader) makes each worker's share a multiple of
`n`, so that `len(loader)` batches is exactly what the loader yields. `set_epoch(epoch, skip)`
resumes inside an epoch: the rank's first `skip` samples are read but not delivered (nor
augmented), and the workers' roles rotate so that the loader, which always asks worker 0
first, continues with exactly the batch an uninterrupted run would have had next.

Shuffling and seeds. webdataset's own `shuffle` seeds itself from the pid and the clock, and its
`detshuffle`/`ResampledShards(deterministic=True)` count epochs inside the worker's copy, which
restarts with every non-persistent worker. Here every random choice is drawn from
`random.Random("seed/epoch/rank/worker/...")`, with the epoch set by `set_epoch` and kept in
shared memory (so persistent workers see it too): a run is repeatable, an epoch's order does not
depend on how many times the loader was iterated before, and a resumed epoch repeats exactly.
`shuffle` is the size of the sample buffer (default 1000 for the train split, 0 for test); it
holds encoded samples, so 1000 ImageNet PNGs cost about 100 MB per worker.

Decoding and augmentation. Only `<key>.cls` (an ASCII integer) and one image member are read:
png, jpg/jpeg, webp (PIL) or npy (`allow_pickle=False`); every other member is ignored, and
nothing in a shard is unpickled or becomes a file path. Images become float (C, H, W) in
[0, 1]. `augmentation: imagenet` is imagefolder's RandomResizedCrop(scale 0.2-1, bicubic) +
flip for training and, for evaluation, its resize + centre crop unless the stored image already
has the delivered size; `light` is the small-image recipe of digits and CIFAR-10, a random
translation by `max_shift` pixels (default size // 8) and, when `hflip` (default: for 3-channel
images), a horizontal flip, then a bicubic resize when the stored size differs; `none` only
resizes. The default, `auto`, is `imagenet` from 96 pixels up and `light` below.

Corrupt data. A sample that does not decode, and a shard that cannot be opened, is truncated
(reading fails, or it ends before the count its manifest gives) are skipped with a warning;
`dataset.skipped` counts them (one per sample, one per shard read; a top-up that reads a bad
shard again counts it again). The counter lives in shared memory, so it includes what
DataLoader workers met; it is per rank and cumulative over epochs. With `strict: true` the
first one raises one `UserError` line naming the shard instead, also from inside a worker.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset
from torchvision.transforms.v2 import functional as TF

from dmae_cli.api import DatasetInfo
from dmae_cli.errors import UserError
from dmae_plugins.datasets._common import (
    check_image_size,
    check_options,
    fingerprint,
    normalize_split,
    random_hflip,
    random_translate,
    resize,
)
from dmae_plugins.datasets.imagefolder import DECODE_ERRORS, build_transform

NAME = "webdataset"
MANIFEST_SUFFIX = "-manifest.json"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "npy")
LABEL_KEY = "cls"
DEFAULT_SHUFFLE = 1000
IMAGENET_STYLE_FROM = 96  # delivered sides from here up get RandomResizedCrop augmentation
AUGMENTATIONS = ("auto", "imagenet", "light", "none")
MAX_EMPTY_DRAWS = 20  # resampled mode: unreadable shards in a row before giving up
MAX_FAILURES = 1000  # undecodable samples in a row before giving up
SKIP_SLOTS = 256  # one shared counter per DataLoader worker (mod SKIP_SLOTS): no lost updates
OPTIONS: dict[str, type] = {
    "urls": str,
    "urls_train": str,
    "urls_test": str,
    "manifest": str,
    "shuffle": int,
    "resampled": bool,
    "epoch_length": int,
    "seed": int,
    "strict": bool,
    "augmentation": str,
    "max_shift": int,
    "hflip": bool,
    "num_classes": int,
    "channels": int,
    "mean": list,
    "std": list,
    "class_names": list,
}
METADATA = ("num_classes", "channels", "mean", "std")
# What reading a shard raises when it is missing, truncated or not a tar (a failing `pipe:`
# command raises OSError when its stream is closed).
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
SAMPLE_ERRORS = (*DECODE_ERRORS, EOFError, KeyError)

log = logging.getLogger(__name__)


class ShardError(UserError):
    """A bad shard or sample in strict mode: one line, even after a DataLoader worker.

    A worker's exception is re-raised in the main process as `type(exc)(message)`, where the
    message is "Caught ShardError in DataLoader worker process N.\\nOriginal Traceback ...";
    keeping only the original last line is what lets the CLI print one line.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_original_message(message))


class UnknownLength(UserError, TypeError):
    """`len()` of shards nobody counted. A TypeError too, so that `list(dataset)` (which asks
    for a length hint) still iterates, while `len(loader)` ends in one line, not a traceback."""


def _original_message(message: str) -> str:
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]
    name, sep, original = last.partition(": ")
    return original if sep and name.endswith(ShardError.__name__) else message


# -- where the shards are ---------------------------------------------------------------------
def expand(pattern: str) -> list[str]:
    """Brace-expand `pattern` (several joined by '::'), as webdataset does."""
    import webdataset as wds

    urls = wds.shardlists.expand_urls(pattern)
    if not urls:
        raise UserError(f"dataset '{NAME}': {pattern!r} names no shards")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def local_path(url: str) -> Path | None:
    """The file behind a local path or `file:` URL; None for anything streamed."""
    if url.startswith("file:"):
        return Path(url[len("file:") :].removeprefix("//"))
    return Path(url).expanduser() if is_local(url) else None


def check_local_shards(urls: list[str]) -> None:
    """A typo in a local pattern should fail now, not as N skipped shards later."""
    missing = [u for u in urls if (p := local_path(u)) is not None and not p.is_file()]
    if missing:
        raise UserError(
            f"dataset '{NAME}': {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]!r}"
        )


def sibling_manifest(url: str) -> Path | None:
    """`PREFIX-manifest.json` for a local `PREFIX-000123.tar`, if it exists."""
    path = local_path(url)
    if path is None:
        return None
    match = re.match(r"^(.*)-\d+\.tar$", path.name)
    if not match:
        return None
    candidate = path.with_name(match.group(1) + MANIFEST_SUFFIX)
    return candidate if candidate.is_file() else None


def read_manifest(where: str | Path) -> dict[str, Any]:
    """A manifest from a local path or a `pipe:` URL; one clear line when it is unusable."""
    try:
        if str(where).startswith("pipe:"):
            import webdataset as wds

            with closing(wds.gopen(str(where), "rb")) as stream:
                text = stream.read().decode("utf-8")
        else:
            text = Path(where).expanduser().read_text(encoding="utf-8")
        manifest = json.loads(text)
    except (OSError, ValueError) as exc:
        raise UserError(f"dataset '{NAME}': cannot read manifest {str(where)!r}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        raise UserError(f"dataset '{NAME}': {str(where)!r} is not a dmae shard manifest")
    if manifest.get("complete") is False:
        raise UserError(
            f"dataset '{NAME}': {str(where)!r} is incomplete (dmae shard was interrupted); "
            "run the same dmae shard command again to finish it"
        )
    return manifest


def manifest_shards(manifest: dict[str, Any], where: Path) -> tuple[list[str], list[int]]:
    """The shard paths (next to the manifest) and their sample counts."""
    urls, counts = [], []
    for shard in manifest.get("shards", []):
        name = shard.get("name") if isinstance(shard, dict) else None
        # A manifest names files beside itself, never a path elsewhere.
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
            raise UserError(f"dataset '{NAME}': {str(where)!r} lists a bad shard name {name!r}")
        urls.append(str(where.parent / name))
        counts.append(int(shard.get("samples", 0)))
    if not urls:
        raise UserError(f"dataset '{NAME}': {str(where)!r} lists no shards")
    return urls, counts


def peek_split(path: Path) -> Any:
    """The split a manifest declares (None when unreadable), without validating the rest."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("split")
    except (OSError, ValueError, AttributeError):
        return None


def manifest_in_dir(directory: Path, split: str) -> Path:
    """The one `*-manifest.json` in `directory` whose split is `split`."""
    splits = {path: peek_split(path) for path in sorted(directory.glob("*" + MANIFEST_SUFFIX))}
    matches = [path for path, s in splits.items() if s == split]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(f"{p.name} ({s})" for p, s in splits.items()) or "none"
    if not matches:
        raise UserError(
            f"dataset '{NAME}': no manifest for split '{split}' in {str(directory)!r} "
            f"(found: {listed}); write one with dmae shard or set option urls_{split}"
        )
    raise UserError(
        f"dataset '{NAME}': several manifests for split '{split}' in {str(directory)!r} "
        f"({listed}); set data.root to one of them"
    )


@dataclass(frozen=True)
class Located:
    urls: list[str]
    counts: list[int] | None  # samples per shard, when a manifest gives them
    manifest: dict[str, Any] | None


def locate(split: str, root: str | None, opts: dict[str, Any]) -> Located:
    """The shards of `split` and their manifest, following the rules of the module docstring."""
    pattern = opts.get(f"urls_{split}") or opts.get("urls")
    manifest_ref: str | None = opts.get("manifest")
    if pattern is None and manifest_ref is None:
        if root is None or str(root) == "":
            raise UserError(
                f"dataset '{NAME}' needs data.root (a directory of shards with their manifests, "
                "a manifest .json or a shard pattern) or option urls / urls_train / urls_test"
            )
        path = Path(root).expanduser()
        if path.is_dir():
            manifest_ref = str(manifest_in_dir(path, split))
        elif str(root).endswith(".json"):
            manifest_ref = str(path)
        else:
            pattern = str(root)
    if pattern is None:  # the shards are the ones a local manifest lists beside itself
        assert manifest_ref is not None
        if manifest_ref.startswith("pipe:"):
            raise UserError(f"dataset '{NAME}': with a pipe: manifest, give the shards as urls")
        manifest = read_manifest(manifest_ref)
        urls, counts = manifest_shards(manifest, Path(manifest_ref).expanduser())
    else:
        urls = expand(pattern)
        ref = manifest_ref or sibling_manifest(urls[0])
        manifest = read_manifest(ref) if ref else None
        counts = counts_for(urls, manifest)
    if manifest is not None and manifest.get("split", split) != split:
        raise UserError(
            f"dataset '{NAME}': the manifest for these shards is of split "
            f"'{manifest.get('split')}', not '{split}'; set option urls_{split} or data.root"
        )
    check_local_shards(urls)
    return Located(urls, counts, manifest)


def counts_for(urls: list[str], manifest: dict[str, Any] | None) -> list[int] | None:
    """Per-shard counts for explicit URLs, matched to the manifest by file name."""
    if manifest is None:
        return None
    by_name = {s.get("name"): int(s.get("samples", 0)) for s in manifest.get("shards", [])}
    names = [url.rstrip("/").rsplit("/", 1)[-1].split()[0] for url in urls]
    if not all(name in by_name for name in names):
        return None  # e.g. pipe: commands: counts cannot be matched to URLs
    return [by_name[name] for name in names]


# -- metadata ---------------------------------------------------------------------------------
def metadata(manifest: dict[str, Any] | None, opts: dict[str, Any]) -> dict[str, Any]:
    """num_classes, channels, mean, std, class_names: options over the manifest."""
    meta: dict[str, Any] = {}
    for key in (*METADATA, "class_names"):
        from_manifest = manifest.get(key) if manifest else None
        if key in opts:
            if from_manifest is not None and opts[key] != from_manifest:
                warnings.warn(
                    f"dataset '{NAME}': option {key}={opts[key]!r} overrides the manifest's "
                    f"{from_manifest!r}",
                    stacklevel=3,
                )
            meta[key] = opts[key]
        elif from_manifest is not None:
            meta[key] = from_manifest
    missing = [key for key in METADATA if key not in meta]
    if missing:
        raise UserError(
            f"dataset '{NAME}': no manifest found for these shards and no option "
            f"{', '.join(missing)}; set option manifest (PREFIX-manifest.json from dmae shard) "
            f"or give {', '.join(METADATA)}"
        )
    return meta


def build_info(meta: dict[str, Any], split: str, image_size: int, source: Any) -> DatasetInfo:
    channels, num_classes = int(meta["channels"]), int(meta["num_classes"])
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    names = tuple(str(n) for n in meta.get("class_names") or ())
    if channels < 1 or num_classes < 1 or len(mean) != channels or len(std) != channels:
        raise UserError(
            f"dataset '{NAME}': need channels >= 1, num_classes >= 1 and one mean and std per "
            f"channel; got channels={channels}, num_classes={num_classes}, mean={list(mean)}, "
            f"std={list(std)}"
        )
    if names and len(names) != num_classes:
        raise UserError(f"dataset '{NAME}': {len(names)} class_names for {num_classes} classes")
    return DatasetInfo(
        num_classes=num_classes,
        image_size=image_size,
        channels=channels,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=names,
        fingerprint=fingerprint(NAME, split, image_size, source),
    )


# -- decoding and augmentation -----------------------------------------------------------------
def to_float(image: Image.Image) -> torch.Tensor:
    """A PIL image as float (C, H, W) in [0, 1], converted as imagefolder converts its files."""
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)


def decode_image(sample: dict[str, Any], channels: int) -> Image.Image | torch.Tensor:
    """The sample's image: a PIL image in the right mode, or a float tensor from npy."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise KeyError(f"no image member ({', '.join(IMAGE_KEYS)})")
    if key == "npy":
        array = np.load(io.BytesIO(sample[key]), allow_pickle=False)
        if array.ndim != 3 or array.shape[0] != channels or array.dtype.kind != "f":
            raise ValueError(f"npy image of shape {array.shape} {array.dtype}, not float (C,H,W)")
        return torch.from_numpy(array.astype(np.float32, copy=False)).clamp_(0.0, 1.0)
    with Image.open(io.BytesIO(sample[key])) as image:
        return image.convert("L" if channels == 1 else "RGB")  # convert() decodes fully here


def decode_label(sample: dict[str, Any], num_classes: int) -> int:
    label = int(sample[LABEL_KEY].decode("ascii").strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    return label


def image_side(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return image.height, image.width


class ImagenetTransform:
    """imagefolder's transforms; evaluation leaves an image of the delivered size as it is
    (`dmae shard` stored imagefolder's centre crop already: cropping it again would zoom)."""

    def __init__(self, image_size: int, augment: bool) -> None:
        self.image_size = image_size
        self.augment = augment
        self.pipeline = build_transform(image_size, augment)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if not self.augment and image_side(image) == (size, size):
            out = image if isinstance(image, torch.Tensor) else to_float(image)
        else:
            out = self.pipeline(image).as_subclass(torch.Tensor)
        return out.clamp_(0.0, 1.0)  # bicubic on float (npy) input overshoots


@dataclass(frozen=True)
class LightTransform:
    """digits / CIFAR-10 style: translate (+ flip) at the stored size, then resize if needed."""

    image_size: int
    augment: bool
    max_shift: int | None  # None: an eighth of the stored side, at least 1
    hflip: bool

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        out = image if isinstance(image, torch.Tensor) else to_float(image)
        if self.augment:
            shift = max(1, out.shape[-1] // 8) if self.max_shift is None else self.max_shift
            out = random_translate(out, shift)
            if self.hflip:
                out = random_hflip(out)
        return resize(out, self.image_size)


def make_transform(opts: dict[str, Any], image_size: int, augment: bool, channels: int) -> Any:
    style = opts.get("augmentation", "auto")
    if style not in AUGMENTATIONS:
        raise UserError(
            f"dataset '{NAME}': option augmentation must be one of {', '.join(AUGMENTATIONS)}, "
            f"got {style!r}"
        )
    if style == "auto":
        style = "imagenet" if image_size >= IMAGENET_STYLE_FROM else "light"
    if style == "imagenet":
        return ImagenetTransform(image_size, augment)
    hflip = opts.get("hflip", channels == 3)  # glyphs (1 channel) are not mirror-symmetric
    return LightTransform(image_size, augment and style == "light", opts.get("max_shift"), hflip)


# -- planning: who reads what --------------------------------------------------------------------
def worker_info() -> tuple[int, int, int, int]:
    """(rank, world size, worker, workers) as webdataset's splitters see them."""
    import webdataset as wds

    return wds.utils.pytorch_worker_info()


def apportion(total: int, capacities: list[float]) -> list[int]:
    """Split `total` into integers proportional to `capacities` (largest remainders)."""
    weight = sum(capacities)
    if total <= 0 or weight <= 0:
        return [0] * len(capacities)
    exact = [total * c / weight for c in capacities]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass(frozen=True)
class StreamConfig:
    train: bool  # shuffle, equal shares across ranks, top up after bad shards
    shuffle: int  # sample buffer size; 0 disables shuffling (shards too)
    resampled: bool
    epoch_length: int | None  # samples per rank per epoch
    strict: bool
    seed: int


class ShardStream(IterableDataset):
    """An `IterableDataset` of (image, label) over tar shards; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int] | None,
        info: DatasetInfo,
        transform: Callable[[Any], torch.Tensor],
        config: StreamConfig,
    ) -> None:
        self.urls = urls
        self.counts = counts
        self.info = info
        self.transform = transform
        self.config = config
        self.batch_size: int | None = None
        # Shared memory: set_epoch reaches persistent workers, and workers' skips reach us.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, skip
        self._skips = torch.zeros(SKIP_SLOTS, dtype=torch.int64).share_memory_()

    # -- what the trainer's loader uses ------------------------------------------------------
    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate `epoch` next, leaving out its first `skip` samples on this rank (those a
        resumed run already trained on; a multiple of the batch size given to set_batch_size)."""
        self._position[0] = epoch
        self._position[1] = skip

    def set_batch_size(self, batch_size: int) -> None:
        """Give each worker a whole number of batches, so the loader yields len(loader)."""
        self.batch_size = batch_size

    @property
    def skipped(self) -> int:
        """Corrupt samples and bad shards skipped so far, in this process and its workers."""
        return int(self._skips.sum())

    def __len__(self) -> int:
        rank, world, _, _ = worker_info()
        epoch, skip = self._position.tolist()
        quota = self._rank_quota(epoch, rank, world)
        if quota is None:
            raise UnknownLength(
                f"dataset '{NAME}': the number of samples is unknown (no manifest with sample "
                "counts); set option epoch_length"
            )
        return max(quota - skip, 0)

    # -- the plan ------------------------------------------------------------------------------
    @property
    def shuffling(self) -> bool:
        return self.config.train and self.config.shuffle > 0

    def _rng(self, *parts: object) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.config.seed, *parts)))

    def _order(self, epoch: int) -> list[int]:
        """This epoch's shard order: identical on every rank, so the node split is disjoint."""
        order = list(range(len(self.urls)))
        if self.shuffling:
            self._rng(epoch, "shards").shuffle(order)
        return order

    def _rank_quota(self, epoch: int, rank: int, world: int) -> int | None:
        """Samples this rank yields in `epoch`; None when unknown (read everything once)."""
        cfg = self.config
        if cfg.resampled:
            return cfg.epoch_length or sum(self.counts or ()) // world
        if world > len(self.urls):
            raise UserError(
                f"dataset '{NAME}': {len(self.urls)} shards cannot be split across {world} ranks; "
                "write more, smaller shards (dmae shard --max-count) or set option resampled: true"
            )
        if self.counts is None:
            return cfg.epoch_length
        order = self._order(epoch)
        shares = [sum(self.counts[i] for i in order[r::world]) for r in range(world)]
        quota = min(shares) if cfg.train else shares[rank]  # equal shares: no rank runs dry
        return min(quota, cfg.epoch_length) if cfg.epoch_length else quota

    def _worker_shares(self, quota: int, capacities: list[float]) -> list[int]:
        """Every worker's part of the rank's quota, in whole batches when the size is known."""
        unit = self.batch_size or 1
        batches = apportion(quota // unit, [c / unit for c in capacities])
        shares = [b * unit for b in batches]
        spare = [c - s for c, s in zip(capacities, shares, strict=True)]
        shares[spare.index(max(spare))] += quota - sum(shares)  # the last, partial batch
        return shares

    def _worker_skip(self, skip: int, shares: list[int]) -> tuple[list[int], int]:
        """How many of the rank's first `skip` samples each worker role made, and the role
        whose batch came next.

        The loader takes whole batches from its workers in turn (0, 1, ..., passing over those
        that ran out), so the first `skip // batch` batches came round-robin from the roles
        with batches left. Without a batch size (one worker, or no hint) it counts samples.
        """
        unit = self.batch_size or 1
        left = [share // unit for share in shares]
        taken = [0] * len(shares)
        role, remaining = 0, skip // unit
        while remaining > 0 and any(left):
            if left[role]:
                taken[role], left[role], remaining = taken[role] + 1, left[role] - 1, remaining - 1
            role = (role + 1) % len(shares)
        return [t * unit for t in taken], role

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds

        rank, world, worker, workers = worker_info()
        epoch, skip = self._position.tolist()
        quota = self._rank_quota(epoch, rank, world)
        mine = list(wds.split_by_node(iter(self._order(epoch))))
        if quota is None:  # uncounted shards, no epoch_length: each worker reads its own once
            ids = list(wds.split_by_worker(iter(mine)))
            yield from self._passes(ids, None, 0, self._rng(epoch, rank, worker))
            return
        if self.config.resampled:
            capacities = [1.0] * workers
        else:
            capacities = [self._capacity(mine[w::workers]) for w in range(workers)]
        shares = self._worker_shares(quota, capacities)
        skips, next_role = self._worker_skip(skip, shares)
        # A resumed epoch must continue with the role whose batch came next, but the loader
        # always asks worker 0 first: so worker w plays role w + next_role. With no skip this
        # is wds.split_by_worker's split, islice(shards, worker, None, workers).
        role = (worker + next_role) % workers
        rng = self._rng(epoch, rank, role)
        if self.config.resampled:
            samples = self._decoded(self._resampled(rng), rng, skips[role])
            yield from self._take(samples, shares[role])
        else:
            yield from self._passes(mine[role::workers], shares[role], skips[role], rng)

    def _capacity(self, ids: list[int]) -> float:
        """Samples in these shards (their number when the counts are unknown)."""
        return float(sum(self.counts[i] for i in ids) if self.counts is not None else len(ids))

    def _passes(
        self, ids: list[int], quota: int | None, skip: int, rng: random.Random
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """One pass over `ids`; for training, more passes until `quota` samples came out.
        The first `skip` samples count towards the quota but are not yielded."""
        produced = 0
        while True:
            got = 0
            stream = self._decoded(self._read(ids), rng, max(skip - produced, 0))
            with closing(stream):  # stopping early must close the shard (and end its pipe)
                for item in stream:
                    if item is not None:
                        yield item
                    produced, got = produced + 1, got + 1
                    if quota is not None and produced >= quota:
                        return
            if quota is None or not self.config.train or got == 0:
                return
            log.warning("topping up %d samples from the same shards", quota - produced)

    @staticmethod
    def _take(items: Iterator[Any], count: int) -> Iterator[Any]:
        """The first `count` items, less the skipped ones (None), closing the source."""
        with closing(items):  # type: ignore[type-var]
            for i, item in enumerate(items):
                if i >= count:
                    return
                if item is not None:
                    yield item

    def _resampled(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Shards drawn with replacement, forever: the quota ends the epoch."""
        empty = 0
        while True:
            index = rng.randrange(len(self.urls))
            read = 0
            for sample in self._read_shard(index):
                read += 1
                yield sample
            empty = 0 if read else empty + 1
            if empty > MAX_EMPTY_DRAWS + 2 * len(self.urls):  # never loop forever on bad data
                raise UserError(
                    f"dataset '{NAME}': {empty} shards in a row yielded no samples "
                    f"(last: {self.urls[index]!r}); are the shards readable?"
                )

    def _read(self, ids: Iterable[int]) -> Iterator[dict[str, Any]]:
        for index in ids:
            yield from self._read_shard(index)

    def _decoded(
        self, samples: Iterator[dict[str, Any]], rng: random.Random, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, int] | None]:
        """Decoded, transformed items; the first `skip` good ones are decoded (so a corrupt
        sample counts as it would have) but come out as None, without the transform's cost."""
        import webdataset as wds

        if self.shuffling:
            samples = wds.shuffle(self.config.shuffle, initial=self.config.shuffle, rng=rng)(
                samples
            )
        failures = 0
        with closing(samples):  # type: ignore[type-var]
            for sample in samples:
                item = self._decode(sample, transform=skip <= 0)
                if item is not None:
                    failures = 0
                    skip -= 1
                    yield item if skip < 0 else None
                    continue
                failures += 1
                if failures >= MAX_FAILURES:  # systematic, not a few bad bytes
                    raise UserError(
                        f"dataset '{NAME}': {failures} samples in a row failed to decode "
                        f"(last in {sample.get('__url__')!r}); see the warnings above"
                    )

    def _decode(self, sample: dict[str, Any], transform: bool = True) -> Any:
        """(image, label); None when the sample is corrupt (and not strict); True when it is
        fine but `transform` is off."""
        try:
            label = decode_label(sample, self.info.num_classes)
            image = decode_image(sample, self.info.channels)
        except SAMPLE_ERRORS as exc:
            self._skip(
                f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')!r} is corrupt "
                f"({_reason(exc)})"
            )
            return None
        return (self.transform(image), label) if transform else True

    def _read_shard(self, index: int) -> Iterator[dict[str, Any]]:
        """The samples of one shard, as dicts of raw bytes; a bad shard is skipped or raised."""
        from webdataset import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        url, read, finished = self.urls[index], 0, False
        try:
            stream = gopen(url, "rb")
            try:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    read += 1
                    yield sample
                finished = True
            finally:
                if finished:
                    stream.close()  # a pipe's exit status is checked here
                else:  # stopped early (quota reached) or failed: the status means nothing
                    with suppress(Exception):
                        stream.close()
        except READ_ERRORS as exc:
            self._skip(f"shard {url!r} is unreadable after {read} samples ({_reason(exc)})")
            return
        expected = self.counts[index] if self.counts is not None else None
        if expected is not None and read < expected:
            self._skip(f"shard {url!r} ended after {read} of {expected} samples (truncated?)")

    def _skip(self, message: str) -> None:
        if self.config.strict:
            raise ShardError(f"dataset '{NAME}': {message}")
        _, _, worker, _ = worker_info()
        self._skips[worker % SKIP_SLOTS] += 1
        log.warning("skipping: %s", message)


def _reason(exc: BaseException) -> str:
    """The first line of an exception, without the stream webdataset appends to its args."""
    first = str(exc.args[0]) if exc.args else type(exc).__name__
    status = re.search(r": exit (-?\d+) \(read\)", first)  # a failed pipe: command
    if status:
        return f"its command exited with status {status.group(1)}"
    return first.split(" @ ")[0].splitlines()[0] if first else type(exc).__name__


# -- the factory --------------------------------------------------------------------------------
def stream_config(split: str, opts: dict[str, Any], counts: list[int] | None) -> StreamConfig:
    train = split == "train"
    shuffle = opts.get("shuffle", DEFAULT_SHUFFLE if train else 0)
    epoch_length = opts.get("epoch_length")
    resampled = opts.get("resampled", False)
    if shuffle < 0:
        raise UserError(f"dataset '{NAME}': option shuffle must be >= 0, got {shuffle}")
    if epoch_length is not None and epoch_length < 1:
        raise UserError(f"dataset '{NAME}': option epoch_length must be >= 1, got {epoch_length}")
    if resampled and epoch_length is None and counts is None:
        raise UserError(
            f"dataset '{NAME}': resampled: true needs option epoch_length (samples per rank per "
            "epoch) when no manifest gives the sample counts"
        )
    return StreamConfig(
        train=train,
        shuffle=shuffle,
        resampled=resampled,
        epoch_length=epoch_length,
        strict=opts.get("strict", False),
        seed=opts.get("seed", 0),
    )


def webdataset(
    split: str,
    *,
    root: str | None = None,
    image_size: int = 224,
    augment: bool = False,
    **options: Any,
) -> ShardStream:
    """Webdataset tar shards (e.g. from dmae shard), streamed; split by node and worker.

    `root` is a directory of shards with their manifests, a manifest .json or a shard pattern.
    Options: urls, urls_train, urls_test, manifest, shuffle, resampled, epoch_length, seed,
    strict, augmentation, max_shift, hflip, and num_classes, channels, mean, std, class_names
    when no manifest describes the shards. See the module docstring for each.
    """
    split = normalize_split(NAME, split)
    image_size = check_image_size(NAME, image_size)
    opts = check_options(NAME, options, OPTIONS)
    located = locate(split, root, opts)
    meta = metadata(located.manifest, opts)
    source = (located.manifest or {}).get("fingerprint") or "::".join(located.urls)
    info = build_info(meta, split, image_size, source)
    transform = make_transform(opts, image_size, augment, info.channels)
    config = stream_config(split, opts, located.counts)
    return ShardStream(located.urls, located.counts, info, transform, config)
