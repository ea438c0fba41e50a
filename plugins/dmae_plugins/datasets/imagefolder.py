"""ImageNet-style folders: `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`.

Split "test" (or "val") reads `root/val/`, or `root/test/` when there is no `val/`. Class names
are the sorted sub-directories of `root/train/` when it exists, so that a label means the same
class in both splits even when the evaluation folder lacks some classes.
Links are followed, but no folder is read twice: a link loop (`loop -> .`) or a second link to
one folder adds nothing, and one warning names what was passed over.

Transforms follow the paper (and MAE): for training RandomResizedCrop(image_size, scale 0.2-1,
bicubic) and a horizontal flip; for evaluation a bicubic resize of the shorter side to
image_size * 256 / 224 and a centre crop. Images are delivered in [0, 1] without normalisation:
the model normalises.

A corrupt file is skipped by default: the item at its index becomes the next readable file
(wrapping round), `skipped` counts the files found bad, and a warning names each. Each process
remembers the files it found bad, so a file is counted once per process that meets it (once
per DataLoader worker; workers that persist across epochs count it once in all); the counts
live in shared memory, so `skipped` includes what the workers met, and the trainer reports it
in metrics.jsonl. With `strict: true` the first corrupt file raises one `PluginError` line naming
it instead, also from inside a DataLoader worker.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dmae_cli.api import DatasetInfo, PluginError
from dmae_plugins.datasets._common import (
    DataError,
    SkipCounter,
    check_image_size,
    check_options,
    fingerprint,
    normalize_split,
    require_root,
)

NAME = "imagefolder"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as in the paper
STD = (0.229, 0.224, 0.225)
OPTIONS: dict[str, type] = {"strict": bool}
# What PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError; truncated
# files raise OSError on load; some decoders raise SyntaxError or ValueError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

log = logging.getLogger(__name__)


# -- finding the files -----------------------------------------------------------------------
def split_dir(root: Path, split: str) -> Path:
    """`root/train`, or for the test split `root/val` falling back to `root/test`."""
    candidates = ("train",) if split == "train" else ("val", "test")
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{name}/" for name in candidates)
    raise PluginError(f"dataset '{NAME}': {str(root)!r} has no {wanted} directory of class folders")


def find_classes(directory: Path) -> tuple[str, ...]:
    """The sorted names of the visible sub-directories: one per class."""
    names = sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise PluginError(f"dataset '{NAME}': {str(directory)!r} has no class sub-directories")
    return tuple(names)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def class_files(
    directory: Path, class_name: str, seen: set[tuple[int, int]], skipped: list[str]
) -> list[str]:
    """Every image under `directory/class_name` (recursively, links followed), sorted, as paths
    relative to `directory`.

    Each directory is read once: `seen` holds the (device, inode) of those already read, for
    the whole split, so a link back up the tree (`loop -> .`) or to a folder read elsewhere
    adds nothing; the links passed over are appended to `skipped`. A class folder that is
    itself a folder read before (a link to the split's folder or to another class) is refused.
    """
    class_dir = directory / class_name
    if not _first_visit(class_dir, seen):
        raise PluginError(
            f"dataset '{NAME}': class folder {str(class_dir)!r} is a link to a folder already "
            "read (the split's own folder or another class's); each class needs its own folder"
        )
    found: list[str] = []
    for folder, subdirs, names in os.walk(class_dir, followlinks=True):
        fresh = [d for d in subdirs if _first_visit(Path(folder, d), seen)]
        skipped += [os.path.join(folder, d) for d in subdirs if d not in fresh]
        subdirs[:] = fresh
        relative = os.path.relpath(folder, directory) + os.sep  # once per folder
        found += [relative + name for name in names if _is_image(name)]
    if not found:
        listed = ", ".join(EXTENSIONS)
        raise PluginError(
            f"dataset '{NAME}': class folder {str(class_dir)!r} has no images ({listed})"
        )
    return sorted(found)


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    """Whether `folder` (through links) is a directory not read before; marks it read."""
    try:
        info = folder.stat()
    except OSError:  # a dangling link or a loop too deep to resolve: os.walk passes it over too
        return False
    identity = (info.st_dev, info.st_ino)
    if identity in seen:
        return False
    seen.add(identity)
    return True


def scan(directory: Path, classes: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """The files (relative to `directory`) of every class folder there and their labels; one
    warning names the folders passed over because they were read already (link loops)."""
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    seen: set[tuple[int, int]] = set()
    skipped: list[str] = []
    _first_visit(directory, seen)  # the split's own folder is no class: a link to it is a loop
    for name in find_classes(directory):
        if name not in index:
            raise PluginError(
                f"dataset '{NAME}': class folder {str(directory / name)!r} is not among the "
                f"training classes ({len(classes)} folders in train/)"
            )
        found = class_files(directory, name, seen, skipped)
        files += found
        labels += [index[name]] * len(found)
    if skipped:
        log.warning(
            "dataset '%s': skipped %d linked folder(s) already read through another path (a "
            "link loop or a second link to one folder), e.g. %r; each folder is read once",
            NAME,
            len(skipped),
            skipped[0],
        )
    return files, labels


# -- transforms ------------------------------------------------------------------------------
def build_transform(image_size: int, augment: bool) -> v2.Compose:
    """The paper's train augmentation or its evaluation resize + centre crop, ending in [0, 1]."""
    bicubic = v2.InterpolationMode.BICUBIC
    if augment:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            v2.Resize(int(image_size * 256 / 224), interpolation=bicubic),
            v2.CenterCrop(image_size),
        ]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


# -- the data set ----------------------------------------------------------------------------
class ImageFolder(Dataset):
    """Images decoded from files on demand, with corrupt files skipped or reported."""

    def __init__(
        self,
        directory: Path,
        files: list[str],
        labels: list[int],
        info: DatasetInfo,
        transform: Any,
        strict: bool,
    ) -> None:
        # Paths relative to `directory`, as one fixed-width bytes array rather than a list of
        # str: forked DataLoader workers reading millions of Python objects would copy their
        # pages (refcounts), and an array of ~30-byte names costs ~40 MB for ImageNet.
        self.directory = directory
        self.files = np.array([os.fsencode(f) for f in files])
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.info = info
        self.transform = transform
        self.strict = strict
        self._skips = SkipCounter()
        self._bad: set[int] = set()  # per process: what this process (or worker) found bad

    def path(self, index: int) -> Path:
        """The file of item `index`."""
        return self.directory / os.fsdecode(self.files[index])

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        """Corrupt files skipped so far, in this process and its DataLoader workers."""
        return self._skips.total

    def _decode(self, index: int) -> Image.Image | None:
        """The RGB image at `index`, or None when the file cannot be decoded (and not strict)."""
        path = str(self.path(index))
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # convert() forces the full decode inside the try
        except DECODE_ERRORS as exc:
            if self.strict:
                raise CorruptImage(
                    f"dataset '{NAME}': cannot decode image {path!r} ({_reason(exc, path)}); "
                    f"remove or replace it, or drop option strict to skip corrupt images"
                ) from exc
            self._bad.add(index)
            self._skips.add()
            log.warning("skipping unreadable image %s (%s)", path, exc)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        count = len(self.files)
        for offset in range(count):
            candidate = (index + offset) % count
            if candidate in self._bad:
                continue
            image = self._decode(candidate)
            if image is not None:
                return self.transform(image), int(self.labels[candidate])
        raise CorruptImage(f"dataset '{NAME}': none of the {count} images could be decoded")


class CorruptImage(DataError):
    """An image that does not decode, under `strict: true` (or every image): one line."""


def _reason(exc: BaseException, path: str) -> str:
    """PIL's first line, without the path it repeats ("cannot identify image file '...'")."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.replace(f" {path!r}", "")


def imagefolder(
    split: str,
    *,
    root: str | None = None,
    image_size: int = 224,
    augment: bool = False,
    **options: Any,
) -> ImageFolder:
    """The `split` ("train", "test" or "val") of the class folders under `root`.

    Options: `strict` (bool, default false) turns a corrupt image into an error instead of a
    skipped item.
    """
    split = normalize_split(NAME, split)
    image_size = check_image_size(NAME, image_size)
    opts = check_options(NAME, options, OPTIONS)
    base = require_root(NAME, root, "train/ and val/ (or test/) folders of class sub-directories")
    directory = split_dir(base, split)
    train_dir = base / "train"
    classes = find_classes(train_dir if train_dir.is_dir() else directory)
    files, labels = scan(directory, classes)
    info = DatasetInfo(
        num_classes=len(classes),
        image_size=image_size,
        channels=3,
        mean=MEAN,
        std=STD,
        class_names=classes,
        fingerprint=fingerprint(
            NAME, split, image_size, classes, "\0".join(files), np.asarray(labels)
        ),
    )
    transform = build_transform(image_size, augment)
    return ImageFolder(directory, files, labels, info, transform, strict=opts.get("strict", False))


def synthetic_root(directory: str) -> str:
    """A tiny folder tree under `directory` (`train/` and `val/`, two classes of one 8x8 PNG
    each), for `dmae plugins --check`."""
    for split in ("train", "val"):
        for shade, name in enumerate(("dark", "bright")):
            folder = Path(directory) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (255 * shade,) * 3).save(folder / "0.png")
    return directory


imagefolder.synthetic_root = synthetic_root  # type: ignore[attr-defined]
