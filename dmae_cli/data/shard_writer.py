"""The parts of `dmae shard` that turn images into tar shards: encoding and the atomic writer.

Formats, and what "lossless" means here:
- `png` (default): 8-bit PNG. Exact for every source that is 8-bit to begin with (image files,
  CIFAR-10): the decoded tensor equals the source's. Float sources (digits, which are bicubic
  upsampled) are rounded to the nearest of 256 levels, an error of at most 1/510 ~ 0.002,
  two orders of magnitude below the smallest noise level (sigma 0.25); that is what a user
  expects of an image file and what every image viewer can show.
- `jpeg`: quality 95; about five times smaller than PNG for photographs, lossy.
- `npy`: the float32 (C, H, W) array itself, bit-exact for any source (read back with
  `allow_pickle=False`).

Each shard is written to `NAME.partial` and renamed when finished, so an interrupted run leaves
only whole shards; the caller records each finished one in the manifest (`manifest.py`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from dmae_cli.data.manifest import SHARD_DIGITS
from dmae_cli.runtime.checkpoint import file_sha256
from dmae_cli.runtime.errors import UserError

JPEG_QUALITY = 95


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

    def __init__(self, source: Any, order: np.ndarray, fmt: str, name: str, shape: tuple) -> None:
        self.source = source
        self.order = order
        self.fmt = fmt
        self.name = name  # the data set's, for error messages
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


# -- writing ---------------------------------------------------------------------------------
class AtomicShardWriter:
    """webdataset's `ShardWriter`, each shard written to NAME.partial and renamed when whole.

    A new shard starts once `max_count` samples or `max_size` bytes are reached (so a shard may
    exceed `max_size` by one sample). After every finished shard `on_shard(record)` is called
    with its name, sample count, bytes and sha256; the caller records it in the manifest, which
    is what makes resuming safe.
    """

    def __init__(
        self,
        prefix: Path,
        max_count: int,
        max_size: int,
        start_shard: int,
        on_shard: Callable[[dict[str, Any]], None],
    ) -> None:
        import webdataset as wds  # imported here: only this command needs it

        self.on_shard = on_shard
        self.count = 0
        self._file: Any = None
        # ShardWriter names shards `pattern % number`: a '%' in the prefix must stay literal.
        pattern = str(prefix).replace("%", "%%") + f"-%0{SHARD_DIGITS}d.tar"
        self.writer = wds.ShardWriter(
            pattern,
            maxcount=max_count,
            maxsize=max_size,
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
