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
from contextlib import contextmanager, suppress
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

    A write that fails (a full disk, a quota, a read-only directory) ends in one `UserError`
    line naming the shard and the reason, even when a library wrapped the OSError on its way up;
    the shard in progress is removed, and so is a finished one the manifest could not record,
    so only whole, listed shards remain and the same command resumes after them.
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
        self._partial: Path | None = None
        self._error: OSError | None = None  # the last failed write, however it was reported
        # ShardWriter names shards `pattern % number`: a '%' in the prefix must stay literal.
        pattern = str(prefix).replace("%", "%%") + f"-%0{SHARD_DIGITS}d.tar"
        with self._writing():
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
        self._partial = Path(name + ".partial")
        self._file = _RecordsWriteErrors(open(self._partial, "wb"), self)  # noqa: SIM115
        self.count = 0
        return self._file

    def _finish(self, name: str) -> None:
        """Make the shard whole (fsync, rename) and have it recorded; undo both on failure."""
        file = self._file
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(name + ".partial", name)
        self._file = self._partial = None
        path = Path(name)
        try:
            self.on_shard(
                {
                    "name": path.name,
                    "samples": self.count,
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                }
            )
        except BaseException:
            path.unlink(missing_ok=True)  # whole but unlisted: the rerun writes it again
            raise

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """On a failed write, drop the shard in progress and say so in one line."""
        try:
            yield
        except Exception as exc:
            cause = exc if isinstance(exc, OSError) else self._error
            shard = self._partial.with_suffix("") if self._partial else "the shards"
            self.abort()
            if cause is None or isinstance(exc, UserError):
                raise
            raise UserError(
                f"could not write {shard}: {cause.strerror or cause}; the shards finished "
                "before it are kept: run the same command again to resume"
            ) from exc

    def write(self, key: str, image: bytes, suffix: str, label: int) -> None:
        with self._writing():
            self.writer.write({"__key__": key, suffix: image, "cls": str(label).encode("ascii")})
        self.count += 1

    def close(self) -> None:
        """Finish the last shard (it may be short)."""
        with self._writing():
            self.writer.close()

    def abort(self) -> None:
        """Drop the shard being written: it may end inside a sample. A rerun redoes it. Never
        raises: it runs while another exception is on its way to the user."""
        writer = getattr(self, "writer", None)  # None when the constructor failed
        if getattr(writer, "tarstream", None) is not None:  # ShardWriter.close deletes it
            with suppress(Exception):  # tarfile flushes into the doomed file, which may fail
                writer.tarstream.close()
            writer.tarstream = None
        if self._file is not None:
            with suppress(Exception):  # closing flushes the buffer: on a full disk, it fails
                self._file.close()
            self._file = None
        if self._partial is not None:
            with suppress(OSError):
                self._partial.unlink(missing_ok=True)
            self._partial = None


class _RecordsWriteErrors:
    """A shard file whose failed writes are remembered, for when a library wraps the OSError."""

    def __init__(self, raw: Any, owner: AtomicShardWriter) -> None:
        self.raw = raw
        self.owner = owner

    def write(self, data: bytes) -> int:
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.owner._error = exc
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as exc:
            self.owner._error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)
