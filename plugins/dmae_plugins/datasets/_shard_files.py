"""What the `webdataset` plugin's stream reads: a shard opened as a plain file (or, only where
the user typed one, through webdataset's URL opener), its members, and a sample decoded.

A shard is a data file, so nothing it claims is believed before it is checked against a bound:
a member larger than `max_member_bytes` (64 MiB unless the option says otherwise) is not read
and its sample counts as corrupt (one claiming over 16 GiB ends the shard, which reading past
it would take hours); a tar header (pax or GNU long name) that large makes the shard
unreadable; members the plugin never uses are not read at all; an npy header is read and its
shape checked against the stored size and channels (and the bytes that follow it) before a
single element is; a PNG's or JPEG's declared size is checked before it is decoded.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "npy")
LABEL_KEY = "cls"
MAX_MEMBER_BYTES = 64 * 2**20  # per tar member; the option max_member_bytes changes it
MAX_LABEL_BYTES = 32
MAX_PIXELS = 2**26  # declared height x width when no manifest gives the stored size
# A member larger than this is not even skipped (a stream skips by reading): the shard ends.
MAX_SKIP_BYTES = 2**34
SKIP_STEP = 4 * 2**20  # bytes read at a time past an oversized member
MAX_NAME_CHARS = 4096  # PATH_MAX: a longer member name (a pax or GNU header) ends the shard
_LONG_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own: `__key__`-style names


class Oversized:
    """A member too large to read, standing in for its bytes: its sample is corrupt."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        self.name, self.size, self.limit = name, size, limit

    def problem(self) -> str:
        return (
            f"member {self.name!r} is {self.size} bytes, over the limit of {self.limit} "
            "(option max_member_bytes)"
        )


# -- reading members -----------------------------------------------------------------------------
def _capped_tarinfo(limit: int) -> type[tarfile.TarInfo]:
    """A TarInfo class whose extended headers (pax, GNU long names) may not exceed `limit`:
    tarfile reads such a header whole, before any member, at whatever size it claims."""

    class CappedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type in _LONG_HEADERS and self.size > limit:
                # ReadError, not a HeaderError: tarfile takes a bad header past the first
                # for the end of the archive, which would hide the rest without a word.
                raise tarfile.ReadError(f"a tar header of {self.size} bytes (limit {limit})")
            return super()._proc_member(tarfile_)

    return CappedTarInfo


def read_samples(url: str, stream: IO[bytes], limit: int) -> Iterator[dict[str, Any]]:
    """The samples of a tar stream, as webdataset groups them: dicts of a sample's members
    (suffix -> bytes, or `Oversized`) with `__key__` and `__url__`. Only the members the plugin
    decodes are read, each at most `limit` bytes."""
    from webdataset.tariterators import group_by_keys

    return group_by_keys(_members(url, stream, limit))


def _members(url: str, stream: IO[bytes], limit: int) -> Iterator[dict[str, Any]]:
    from webdataset.tariterators import base_plus_ext

    wanted = (*IMAGE_KEYS, LABEL_KEY)
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_capped_tarinfo(limit)) as tar:
        for info in tar:
            tar.members = []  # a stream holds no index: nothing grows with the shard
            name = info.name
            if len(name) > MAX_NAME_CHARS:  # a key that long would fill every warning
                raise tarfile.ReadError(f"a member name of {len(name)} characters")
            if info.size > MAX_SKIP_BYTES:  # even skipping it would read for hours: stop here
                raise tarfile.ReadError(f"member {name!r} claims {info.size} bytes")
            if not info.isreg() or _SKIP_META.match(name):
                continue
            key, suffix = base_plus_ext(name)
            if key is None or suffix.lower() not in wanted:
                continue  # never decoded: not read either (tarfile skips past it)
            if info.size > limit:
                data: Any = Oversized(name, info.size, limit)
                _read_past(tar, info)
            else:
                member = tar.extractfile(info)
                data = member.read() if member is not None else b""
            yield {"fname": name, "data": data, "__url__": url}


def _read_past(tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
    """Read a member to its end without keeping it. tarfile's own skip reads a compressed
    stream 10 KB at a time, each step copying all it has decompressed: half a minute for a
    gigabyte of zeros, where steps of `SKIP_STEP` take a second."""
    member = tar.extractfile(info)
    while member is not None and member.read(SKIP_STEP):
        pass


# -- decoding ------------------------------------------------------------------------------------
def _member(sample: dict[str, Any], key: str) -> bytes:
    data = sample[key]
    if isinstance(data, Oversized):
        raise ValueError(data.problem())
    return data


def decode_image(
    sample: dict[str, Any], channels: int, side: int | None = None
) -> Image.Image | torch.Tensor:
    """The sample's image: a PIL image in the right mode, or a float tensor from npy. `side`,
    the stored size when a manifest gives it, is the only size an image may declare."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise KeyError(f"no image member ({', '.join(IMAGE_KEYS)})")
    data = _member(sample, key)
    if key == "npy":
        return decode_npy(data, channels, side)
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        _check_size(image.height, image.width, side, key)
        return image.convert("L" if channels == 1 else "RGB")  # convert() decodes fully here


def _check_size(height: int, width: int, side: int | None, what: str) -> None:
    if side is not None and (height, width) != (side, side):
        raise ValueError(f"{what} image of {height}x{width}, not the stored {side}x{side}")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{what} image of {height}x{width} pixels, over {MAX_PIXELS}")


def decode_npy(data: bytes, channels: int, side: int | None) -> torch.Tensor:
    """A float (C, H, W) array from npy bytes, its header checked before anything is allocated:
    `np.load` would first allocate whatever shape the header claims."""
    fmt = np.lib.format
    buffer = io.BytesIO(data)
    version = fmt.read_magic(buffer)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy format version {version}, not 1.0 or 2.0")
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(buffer)
    if len(shape) != 3 or shape[0] != channels or dtype.kind != "f":
        raise ValueError(f"npy image of shape {shape} {dtype}, not float ({channels}, H, W)")
    _check_size(shape[1], shape[2], side, "npy")
    body = memoryview(data)[buffer.tell() :]
    if len(body) != shape[0] * shape[1] * shape[2] * dtype.itemsize:
        raise ValueError(f"npy image of shape {shape} {dtype} with {len(body)} bytes of data")
    array = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return torch.from_numpy(array.astype(np.float32)).clamp_(0.0, 1.0)  # a writable copy


def decode_label(sample: dict[str, Any], num_classes: int) -> int:
    raw = _member(sample, LABEL_KEY)
    if len(raw) > MAX_LABEL_BYTES:
        raise ValueError(f"label member of {len(raw)} bytes, not a class number")
    label = int(raw.decode("ascii").strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    return label


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def local_path(url: str) -> Path | None:
    """The file behind a local path or `file:` URL; None for anything streamed."""
    if url.startswith("file:"):
        return Path(url[len("file:") :].removeprefix("//"))
    return Path(url).expanduser() if is_local(url) else None


def open_shard(url: str) -> IO[bytes]:
    """A local shard (a path or `file:` URL, which is all a manifest can name) opened as a
    plain file; only a source the user typed (`pipe:`, `http://`...) goes through webdataset's
    URL opener."""
    from webdataset import gopen

    path = local_path(url)
    return path.open("rb") if path is not None else gopen(url, "rb")
