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
their command-line tools (`pipe:aws s3 cp s3://bucket/in1k-train-000000.tar -`), but only
where the user typed them: a manifest is a data file, and the shards it lists are plain file
names in its own directory, opened as files (a name that is a command, a URL, a path or a link
out of the directory is refused in one line).

Metadata (num_classes, class names, channels, mean, std, stored image size, samples per shard)
comes from the manifest, every field checked for its type and range first
(`dmae_cli.api.manifest_format`), and a shard's count checked against its file's size: option
`manifest` (a path or a `pipe:` URL), or the one `dmae shard` wrote next to local shards
(`PREFIX-manifest.json` beside `PREFIX-000000.tar`). Options `num_classes`, `channels`, `mean`,
`std` and `class_names` override it (with a warning) or stand in for it; without either,
construction fails with one line saying what to set. A manifest of another split than the requested
one is refused: training on test data by a misplaced pattern must not pass silently.

Reading. The shards are shuffled per epoch and dealt to ranks and DataLoader workers, or drawn
at random with `resampled: true`, with `len(dataset)` the samples this rank yields per epoch
(`epoch_length` caps or sets it); every random choice follows option `seed`, so a run, and a
resumed epoch, repeats exactly; `shuffle` is the size of the sample buffer (default 1000 for the
train split, 0 for test). Only `<key>.cls` and one image member (png, jpg/jpeg, webp, npy) are
read, never unpickled, and nothing a shard claims is believed unchecked: a member larger than
`max_member_bytes` (default 64 MiB) is not read, and an image whose declared size (an npy
header's shape, a PNG's width and height) is not the manifest's stored size and channels is not
decoded; either makes its sample corrupt. A corrupt sample or a bad shard is skipped with a
warning and counted in `dataset.skipped`; with `strict: true` the first one raises one
`PluginError` line naming the shard instead. The details are the stream's, in `_shard_stream.py`;
the augmentation's code is in `_shard_transforms.py`.

Augmentation. Images become float (C, H, W) in [0, 1]. `augmentation: imagenet` is
imagefolder's RandomResizedCrop(scale 0.2-1, bicubic) + flip for training and, for evaluation,
its resize + centre crop unless the stored image already has the delivered size; `light` is the
small-image recipe of digits and CIFAR-10, a random translation by `max_shift` pixels (default
size // 8) and, when `hflip` (default: for 3-channel images), a horizontal flip, then a bicubic
resize when the stored size differs; `none` only resizes. The default, `auto`, is `imagenet`
from 96 pixels up and `light` below.
"""

from __future__ import annotations

import re
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmae_cli.api import DatasetInfo, PluginError, manifest_format
from dmae_plugins.datasets._common import (
    check_image_size,
    check_options,
    fingerprint,
    normalize_split,
)
from dmae_plugins.datasets._shard_files import MAX_MEMBER_BYTES, local_path
from dmae_plugins.datasets._shard_stream import NAME, ShardStream, StreamConfig
from dmae_plugins.datasets._shard_transforms import make_transform

DEFAULT_SHUFFLE = 1000
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
    "max_member_bytes": int,
}
METADATA = ("num_classes", "channels", "mean", "std")


# -- where the shards are ---------------------------------------------------------------------
def expand(pattern: str) -> list[str]:
    """Brace-expand `pattern` (several joined by '::'), as webdataset does."""
    import webdataset as wds

    urls = wds.shardlists.expand_urls(pattern)
    if not urls:
        raise PluginError(f"dataset '{NAME}': {pattern!r} names no shards")
    return urls


def check_local_shards(urls: list[str]) -> None:
    """A typo in a local pattern should fail now, not as N skipped shards later."""
    missing = [u for u in urls if (p := local_path(u)) is not None and not p.is_file()]
    if missing:
        raise PluginError(
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
    candidate = path.with_name(match.group(1) + manifest_format.MANIFEST_SUFFIX)
    return candidate if candidate.is_file() else None


def read_manifest(where: str | Path) -> dict[str, Any]:
    """A manifest from a local path or a `pipe:` URL, every field checked; one clear line when
    it is unusable."""
    try:
        if str(where).startswith("pipe:"):
            import webdataset as wds

            with closing(wds.gopen(str(where), "rb")) as stream:
                text = stream.read(manifest_format.MAX_MANIFEST_BYTES + 1)
            if len(text) > manifest_format.MAX_MANIFEST_BYTES:
                raise manifest_format.ManifestError(
                    f"larger than {manifest_format.MAX_MANIFEST_BYTES >> 20} MiB"
                )
            manifest = manifest_format.parse_manifest(text)
        else:
            manifest = manifest_format.read_manifest_file(Path(where).expanduser())
    except manifest_format.ManifestError as exc:
        raise PluginError(
            f"dataset '{NAME}': {str(where)!r} is not a usable dmae shard manifest: {exc}"
        ) from None
    except OSError as exc:
        raise PluginError(f"dataset '{NAME}': cannot read manifest {str(where)!r}: {exc}") from exc
    if manifest.get("complete") is False:
        raise PluginError(
            f"dataset '{NAME}': {str(where)!r} is incomplete (dmae shard was interrupted); "
            "run the same dmae shard command again to finish it"
        )
    return manifest


def manifest_shards(manifest: dict[str, Any], where: Path) -> tuple[list[str], list[int]]:
    """The shard files (absolute paths beside the manifest) and their sample counts."""
    urls, counts = [], []
    for shard in manifest.get("shards", []):
        try:  # a data file names files beside itself, never a command, URL or path elsewhere
            urls.append(str(manifest_format.listed_shard(where, shard["name"])))
        except ValueError as exc:
            raise PluginError(f"dataset '{NAME}': {str(where)!r}: {exc}") from None
        counts.append(shard["samples"])  # an int in range: check_manifest saw to it
    if not urls:
        raise PluginError(f"dataset '{NAME}': {str(where)!r} lists no shards")
    return urls, counts


def check_counts(urls: list[str], counts: list[int] | None) -> None:
    """A count no file could hold is a lie, not a promise: every sample takes at least a byte of
    its shard (two 512-byte tar headers and their data, however well compressed)."""
    if counts is None:  # no manifest gives them
        return
    for url, count in zip(urls, counts, strict=True):
        path = local_path(url)
        size = path.stat().st_size if path is not None and path.is_file() else None
        if size is not None and count > size:
            raise PluginError(
                f"dataset '{NAME}': the manifest says {url!r} holds {count} samples, but the "
                f"file has {size} bytes; it is not the manifest of these shards"
            )


def peek_split(path: Path) -> tuple[Any, str | None]:
    """The split a manifest declares, and why it is not a usable manifest (None when it is)."""
    try:
        return manifest_format.read_manifest_file(path).get("split"), None
    except (OSError, manifest_format.ManifestError) as exc:
        return None, str(exc)


def manifest_in_dir(directory: Path, split: str) -> Path:
    """The one `*-manifest.json` in `directory` whose split is `split`; when there is none, the
    first manifest there that is unusable is named with its problem."""
    found = {
        path: peek_split(path)
        for path in sorted(directory.glob("*" + manifest_format.MANIFEST_SUFFIX))
    }
    matches = [path for path, (s, _) in found.items() if s == split]
    if len(matches) == 1:
        return matches[0]
    broken = [(path, problem) for path, (_, problem) in found.items() if problem is not None]
    if not matches and broken:
        path, problem = broken[0]
        raise PluginError(
            f"dataset '{NAME}': {str(path)!r} is not a usable dmae shard manifest: {problem}"
        )
    listed = ", ".join(f"{p.name} ({s})" for p, (s, _) in found.items()) or "none"
    if not matches:
        raise PluginError(
            f"dataset '{NAME}': no manifest for split '{split}' in {str(directory)!r} "
            f"(found: {listed}); write one with dmae shard or set option urls_{split}"
        )
    raise PluginError(
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
            raise PluginError(
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
            raise PluginError(f"dataset '{NAME}': with a pipe: manifest, give the shards as urls")
        manifest = read_manifest(manifest_ref)
        urls, counts = manifest_shards(manifest, Path(manifest_ref).expanduser())
    else:
        urls = expand(pattern)
        ref = manifest_ref or sibling_manifest(urls[0])
        manifest = read_manifest(ref) if ref else None
        counts = counts_for(urls, manifest)
    if manifest is not None and manifest.get("split", split) != split:
        raise PluginError(
            f"dataset '{NAME}': the manifest for these shards is of split "
            f"'{manifest.get('split')}', not '{split}'; set option urls_{split} or data.root"
        )
    check_local_shards(urls)
    check_counts(urls, counts)
    return Located(urls, counts, manifest)


def counts_for(urls: list[str], manifest: dict[str, Any] | None) -> list[int] | None:
    """Per-shard counts for explicit URLs, matched to the manifest by file name."""
    if manifest is None:
        return None
    by_name = {s["name"]: s["samples"] for s in manifest.get("shards", [])}
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
    if manifest and "image_size" in manifest:  # the stored side: decoded images must have it
        meta["image_size"] = manifest["image_size"]
    missing = [key for key in METADATA if key not in meta]
    if missing:
        raise PluginError(
            f"dataset '{NAME}': no manifest found for these shards and no option "
            f"{', '.join(missing)}; set option manifest (PREFIX-manifest.json from dmae shard) "
            f"or give {', '.join(METADATA)}"
        )
    return meta


def build_info(meta: dict[str, Any], split: str, image_size: int, source: Any) -> DatasetInfo:
    """The data set's description; `meta` (options over a checked manifest) checked whole."""
    try:
        manifest_format.check_metadata(meta)
    except manifest_format.ManifestError as exc:
        raise PluginError(f"dataset '{NAME}': {exc}") from None
    return DatasetInfo(
        num_classes=meta["num_classes"],
        image_size=image_size,
        channels=meta["channels"],
        mean=tuple(float(m) for m in meta["mean"]),
        std=tuple(float(s) for s in meta["std"]),
        class_names=tuple(str(n) for n in meta.get("class_names") or ()),
        fingerprint=fingerprint(NAME, split, image_size, source),
    )


# -- the factory --------------------------------------------------------------------------------
def stream_config(
    split: str, opts: dict[str, Any], counts: list[int] | None, stored_size: int | None = None
) -> StreamConfig:
    train = split == "train"
    shuffle = opts.get("shuffle", DEFAULT_SHUFFLE if train else 0)
    epoch_length = opts.get("epoch_length")
    resampled = opts.get("resampled", False)
    if shuffle < 0:
        raise PluginError(f"dataset '{NAME}': option shuffle must be >= 0, got {shuffle}")
    if epoch_length is not None and epoch_length < 1:
        raise PluginError(f"dataset '{NAME}': option epoch_length must be >= 1, got {epoch_length}")
    max_member = opts.get("max_member_bytes", MAX_MEMBER_BYTES)
    if max_member < 1:
        raise PluginError(
            f"dataset '{NAME}': option max_member_bytes must be >= 1, got {max_member}"
        )
    if resampled and epoch_length is None and counts is None:
        raise PluginError(
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
        stored_size=stored_size,
        max_member_bytes=max_member,
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
    strict, augmentation, max_shift, hflip, max_member_bytes, and num_classes, channels, mean,
    std, class_names
    when no manifest describes the shards. See the module docstrings (this one's and
    `_shard_stream`'s) for each.
    """
    split = normalize_split(NAME, split)
    image_size = check_image_size(NAME, image_size)
    opts = check_options(NAME, options, OPTIONS)
    located = locate(split, root, opts)
    meta = metadata(located.manifest, opts)
    source = (located.manifest or {}).get("fingerprint") or "::".join(located.urls)
    info = build_info(meta, split, image_size, source)
    transform = make_transform(opts, image_size, augment, info.channels)
    config = stream_config(split, opts, located.counts, meta.get("image_size"))
    return ShardStream(located.urls, located.counts, info, transform, config)
