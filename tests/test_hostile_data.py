"""Data files that lie, and disks that fill: `dmae shard` and the data set plugins end in one
line naming the file and what is wrong (a sample inside a shard: skipped with a warning, or one
line with `strict`), never a traceback, an endless loop or an allocation a file asked for.

- CIFAR-10 batches: labels out of range or of the wrong type, data that is no uint8 array, a
  256-byte pickle of shared lists (2**30 numbers once materialised), a dict key that hashes for
  ever, a memo index of 2**31, a dtype state with flags: test_hostile_cifar_batch_is_one_line
- webdataset manifests: samples 10**15 or "abc", channels "x", and every other field of the
  wrong type or out of range: test_hostile_manifest_is_one_line_naming_the_field; the same
  manifest met by a resumed `dmae shard`: test_resuming_over_a_hostile_manifest_is_one_line
- shard members: an npy header claiming 1e10 floats, a PNG claiming 9000x9000 pixels, a
  100 MB member in a 100 KB gzip shard, a megabyte label: test_hostile_member_is_a_corrupt_sample
  (and test_strict_hostile_member_is_one_line); an oversized pax header:
  test_an_oversized_tar_header_makes_the_shard_unreadable
- imagefolder: link loops (`loop -> .`, two of them), a folder linked twice, a class folder
  that links to another: test_link_loops_are_read_once, test_dmae_shard_reads_a_looping_folder_once,
  test_class_folder_linking_back_is_one_line
- a full disk under `dmae shard --format npy`, on a shard or on the manifest:
  test_full_disk_is_one_line_and_leaves_only_listed_shards

Whatever a hostile file claims is never allocated, even by a regression: those cases run under
`address_space_cap`, which makes any allocation beyond a gigabyte fail fast.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import resource
import signal
import struct
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.data import manifest as manifest_module
from dmae_cli.data import shard_writer
from dmae_cli.runtime.checkpoint import atomic_write
from dmae_cli.runtime.errors import UserError
from dmae_plugins.datasets.imagefolder import imagefolder
from dmae_plugins.datasets.webdataset import webdataset
from tests.conftest import one_line_error

runner = CliRunner()
GiB = 2**30


@contextmanager
def address_space_cap(extra: int = GiB) -> Iterator[None]:
    """Any allocation beyond `extra` bytes more than the process maps now fails (MemoryError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    mapped = next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmSize" in line)
    cap = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class StillRunning(Exception):
    """Not a TimeoutError: that is an OSError, which os.walk swallows and walks on."""


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A hang (a link loop walked for ever) fails the test instead of the whole run."""

    def expire(*_: object) -> None:
        raise StillRunning(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- 1. CIFAR-10 batches ---------------------------------------------------------------------------
def shared_lists(depth: int = 30) -> list:
    """[l, l] of [l', l'] ... depth times: a few hundred bytes pickled, 2**depth leaves walked."""
    nested: list = [0]
    for _ in range(depth):
        nested = [nested, nested]
    return nested


def shared_tuples(depth: int = 26) -> tuple:
    """The same, as tuples: hashing one (a dict key) walks all 2**depth leaves, in one C call
    that no signal interrupts. A hostile file nests 40 deep (hours); 26 (a second) is enough to
    see it refused, and fails rather than hangs a regression. Pickled alone, never hashed here."""
    nested: tuple = (0,)
    for _ in range(depth):
        nested = (nested, nested)
    return nested


class DtypeWithFlags:
    """Pickles as numpy.dtype('u1') whose state sets flags (an object-holding dtype)."""

    def __reduce__(self) -> tuple:
        return (np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63))


PIXELS = np.zeros((2, 3072), np.uint8)
# case: (what the batch file holds, the message's tail)
CIFAR_CASES: dict[str, tuple[Any, str]] = {
    "label-too-large": ({"data": PIXELS, "labels": [0, 10]}, "label 1 is 10, not a class number"),
    "label-negative": ({"data": PIXELS, "labels": [-1, 0]}, "label 0 is -1, not a class number"),
    "label-string": ({"data": PIXELS, "labels": ["cat", 1]}, "label 0 is a str, not a class"),
    "label-float": ({"data": PIXELS, "labels": [1, 2.0]}, "label 1 is a float, not a class"),
    "label-bool": ({"data": PIXELS, "labels": [True, 1]}, "label 0 is a bool (True), not a class"),
    "label-huge": (
        {"data": PIXELS, "labels": [0, 10**400]},
        "label 1 is an integer beyond 10**6, not a",
    ),
    "labels-not-a-list": ({"data": PIXELS, "labels": 7}, "expected a list of 2 labels, got 7"),
    "labels-too-few": ({"data": PIXELS, "labels": [0]}, "expected a list of 2 labels, got 1"),
    "labels-float-array": (
        {"data": PIXELS, "labels": np.array([0.0, 1.5])},
        "expected 2 integer labels, got a float64 array of shape (2,)",
    ),
    "data-float": (
        {"data": PIXELS.astype(np.float32), "labels": [0, 1]},
        "expected uint8 data of shape (N, 3072), got float32 (2, 3072)",
    ),
    "data-short-rows": (
        {"data": PIXELS[:, :100], "labels": [0, 1]},
        "expected uint8 data of shape (N, 3072), got (2, 100)",
    ),
    "data-shared-lists": (
        {"data": shared_lists(), "labels": [0, 1]},
        "expected uint8 data of shape (N, 3072), got a list",
    ),
    "labels-shared-lists": (
        {"data": PIXELS, "labels": shared_lists()[0]},
        "label 0 is a list, not a class number",
    ),
    "key-shared-tuples": (
        b"\x80\x02}" + pickle.dumps(shared_tuples(), protocol=2)[2:-1] + b"K\x01s.",
        "a dict key or set element that is not a plain value",
    ),
    "dtype-with-flags": (
        {"data": DtypeWithFlags(), "labels": []},
        "a numpy dtype state that is not a plain number type's",
    ),
    "code": ({"data": os.system, "labels": []}, "refusing to load global posix.system"),
    "no-data": ({"labels": [0, 1]}, "is not a CIFAR-10 python batch: no 'data' entry"),
    # LONG_BINPUT at 2**31: the C unpickler would size its memo array by it (16 GiB)
    "memo-index": (b"\x80\x02]r\xff\xff\xff\x7f.", "is not a CIFAR-10 python batch: no 'data'"),
}


def test_the_shared_lists_pickle_is_small() -> None:
    assert len(pickle.dumps({"data": shared_lists(), "labels": []}, protocol=4)) < 400


@pytest.mark.parametrize("case", CIFAR_CASES)
def test_hostile_cifar_batch_is_one_line(tmp_path: Path, case: str) -> None:
    batch, expected = CIFAR_CASES[case]
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    path = directory / "test_batch"
    path.write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=4))
    with address_space_cap(), deadline(60):
        result = runner.invoke(
            app, ["shard", "cifar10", "--root", str(tmp_path), "--split", "test",
                  "--out", str(tmp_path / "out" / "c")],
        )  # fmt: skip
    line = one_line_error(result)
    assert str(path) in line and expected in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_oversized_cifar_file_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmae_plugins.datasets import cifar10

    monkeypatch.setattr(cifar10, "MAX_BATCH_BYTES", 1000)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    (directory / "test_batch").write_bytes(pickle.dumps({"data": PIXELS, "labels": [0, 1]}))
    with pytest.raises(UserError, match=r"test_batch' is larger than .*: not a CIFAR-10 batch"):
        cifar10.cifar10("test", root=str(tmp_path))


# -- 2. webdataset manifests -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits' test split (360 samples) as two shards and a manifest, written once."""
    from dmae_cli.data.shard import ShardConfig, run_shard

    root = tmp_path_factory.mktemp("digits-shards")
    run_shard(ShardConfig(dataset="digits", split="test", out=str(root / "d"), max_count=200))
    return root


def copy_shards(written: Path, tmp_path: Path) -> Path:
    target = tmp_path / "shards"
    target.mkdir()
    for path in written.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def first_shard(field: str, value: Any) -> Callable[[dict], None]:
    return lambda manifest: manifest["shards"][0].__setitem__(field, value)


def top(field: str, value: Any) -> Callable[[dict], None]:
    return lambda manifest: manifest.__setitem__(field, value)


# case: (a change to the manifest, or its whole text; what the message says)
MANIFEST_CASES: dict[str, tuple[Any, str]] = {
    "samples-1e15": (
        first_shard("samples", 10**15),
        "samples must be an integer from 0 to 100000000, got 1000000000000000",
    ),
    "samples-abc": (first_shard("samples", "abc"), "samples must be an integer"),
    "samples-negative": (first_shard("samples", -1), "samples must be an integer"),
    "samples-float": (first_shard("samples", 1.5), "samples must be an integer"),
    "samples-missing": (lambda m: m["shards"][0].pop("samples"), "gives no samples count"),
    "samples-beyond-the-file": (
        lambda m: (first_shard("samples", 10**7)(m), m.update(total=10**7 + 160)),
        "holds 10000000 samples, but the file has",
    ),
    "shard-not-an-object": (top("shards", [["d-000000.tar"]]), "shard 0 must be an object"),
    "shards-not-a-list": (top("shards", {"d-000000.tar": 200}), "shards must be a list"),
    "sha256": (first_shard("sha256", "zz"), "sha256 must be 64 hex digits"),
    "channels-x": (top("channels", "x"), "channels must be an integer from 1 to 1024, got 'x'"),
    "channels-1e9": (top("channels", 10**9), "channels must be an integer from 1 to 1024"),
    "png-with-2-channels": (
        lambda m: m.update(channels=2, mean=[0.5, 0.5], std=[0.2, 0.2]),
        "png images hold 1 or 3 channels, not 2",
    ),
    "num-classes-1e12": (top("num_classes", 10**12), "num_classes must be an integer from 1"),
    "num-classes-0": (top("num_classes", 0), "num_classes must be an integer from 1"),
    "image-size-1e9": (top("image_size", 10**9), "image_size must be an integer from 1 to 65536"),
    "mean-text": (top("mean", ["a"]), "mean must be a list of 1 finite numbers"),
    "mean-too-long": (top("mean", [0.1] * 10**5), "mean must be a list of 1 finite numbers"),
    "std-zero": (top("std", [0]), "std must be a list of 1 finite positive numbers"),
    "std-nan": (top("std", [float("nan")]), "std must be a list of 1 finite positive numbers"),
    "class-names-text": (top("class_names", "abc"), "class_names must be a list of names"),
    "class-names-count": (top("class_names", ["a"]), "1 class_names for num_classes=10"),
    "format": (top("format", "exe"), "format must be one of png, jpeg, npy, got 'exe'"),
    "complete-text": (top("complete", "yes"), "complete must be true or false"),
    "total": (top("total", 7), "total is 7 but its shards hold 360 samples"),
    "version": (top("manifest_version", 99), "manifest_version must be an integer from 1 to 1"),
    "a-list": ("[]", "not a JSON object but list"),
    "nested": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "huge-integer": (
        '{"shards": [{"name": "d-000000.tar", "samples": 1' + "0" * 5000 + "}]}",
        "not JSON",
    ),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_hostile_manifest_is_one_line_naming_the_field(
    written: Path, tmp_path: Path, case: str
) -> None:
    change, expected = MANIFEST_CASES[case]
    shards = copy_shards(written, tmp_path)
    path = shards / "d-manifest.json"
    if isinstance(change, str):
        path.write_text(change)
    else:
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    with address_space_cap(), pytest.raises(UserError) as caught:
        stream = webdataset("test", root=str(path), image_size=16)
        len(stream)  # what a loader asks first
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and expected in message, message
    assert str(path) in message or "d-000000.tar" in message, message


def test_a_hostile_manifest_in_a_directory_is_named(written: Path, tmp_path: Path) -> None:
    shards = copy_shards(written, tmp_path)
    manifest = json.loads((shards / "d-manifest.json").read_text())
    manifest["shards"][0]["samples"] = "abc"
    (shards / "d-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"d-manifest\.json' is not a usable .*: shard 0 .*abc"):
        webdataset("test", root=str(shards), image_size=16)


def test_resuming_over_a_hostile_manifest_is_one_line(written: Path, tmp_path: Path) -> None:
    shards = copy_shards(written, tmp_path)
    manifest = json.loads((shards / "d-manifest.json").read_text())
    manifest["shards"][0]["samples"] = 10**15
    (shards / "d-manifest.json").write_text(json.dumps(manifest))
    args = ["shard", "digits", "--split", "test", "--max-count", "200", "--out", str(shards / "d")]
    with address_space_cap():
        line = one_line_error(runner.invoke(app, args))
    assert "d-manifest.json is not a dmae shard manifest (shard 0" in line, line
    assert "got 1000000000000000); use --overwrite" in line, line
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


# -- 2b. members of a shard ------------------------------------------------------------------------
class Zeros(io.RawIOBase):
    """`size` zero bytes, streamed into a tar member without holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_claiming(shape: tuple, descr: str = "<f4", body: bytes = b"") -> bytes:
    """An npy header saying `shape` and `descr`, followed by `body` only."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + body


def png_claiming(side: int) -> bytes:
    """A 16x16 PNG whose header (checksum and all) says side x side."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def pax_header(size: int) -> bytes:
    """A pax extended header announcing `size` bytes of records (all of them there)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    return info.tobuf(tarfile.USTAR_FORMAT) + bytes(-(-size // 512) * 512)


GOOD = npy(np.full((1, 16, 16), 0.5, np.float32))
# case: (sample 000001's members, what the warning says, plugin options, gzip, manifest change)
MEMBER_CASES: dict[str, tuple[list[tuple[str, Any]], str, dict, bool, dict]] = {
    "npy-claims-1e10-floats": (
        [("000001.npy", npy_claiming((1, 100_000, 100_000)))],
        "npy image of 100000x100000, not the stored 16x16",
        {}, False, {},
    ),
    "npy-claims-1e10-floats-no-stored-size": (
        [("000001.npy", npy_claiming((1, 100_000, 100_000)))],
        "npy image of 100000x100000 pixels, over 67108864",
        {}, False, {"image_size": None},
    ),
    "npy-short-body": (
        [("000001.npy", npy_claiming((1, 16, 16), body=bytes(10)))],
        "with 10 bytes of data", {}, False, {},
    ),
    "npy-objects": (
        [("000001.npy", npy_claiming((1, 16, 16), "|O", bytes(2048)))],
        "not float (1, H, W)", {}, False, {},
    ),
    "npy-3-channels": (
        [("000001.npy", npy(np.zeros((3, 16, 16), np.float32)))],
        "npy image of shape (3, 16, 16) float32, not float (1, H, W)", {}, False, {},
    ),
    "npy-header-of-4-GB": (
        [("000001.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + bytes(10))],
        "array header", {}, False, {},
    ),
    "png-claims-9000x9000": (
        [("000001.png", png_claiming(9000))],
        "png image of 9000x9000, not the stored 16x16", {}, False, {},
    ),
    "label-of-a-megabyte": (
        [("000001.npy", GOOD), ("000001.cls", b"1" * 2**20)],
        "label member of 1048576 bytes", {}, False, {},
    ),
    "member-of-100-MB-in-gzip": (
        [("000001.npy", 100 * 2**20)],
        "member '000001.npy' is 104857600 bytes, over the limit of 67108864 (option "
        "max_member_bytes)", {}, True, {},
    ),
    "member-over-the-option": (
        [("000001.npy", 5000)],
        "member '000001.npy' is 5000 bytes, over the limit of 2000",
        {"max_member_bytes": 2000}, False, {},
    ),
}  # fmt: skip


def handmade_shard(directory: Path, bad: list[tuple[str, Any]], gz: bool, change: dict) -> Path:
    """h-000000.tar (samples 000000 and 000002 good, 000001 `bad`) and its manifest."""
    members = [("000000.npy", GOOD), ("000000.cls", b"3"), *bad]
    if not any(name.endswith(".cls") for name, _ in bad):
        members.append(("000001.cls", b"1"))
    members += [("000002.npy", GOOD), ("000002.cls", b"5")]
    shard = directory / "h-000000.tar"
    with tarfile.open(shard, "w:gz", compresslevel=1) if gz else tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            tar.addfile(info, Zeros(data) if isinstance(data, int) else io.BytesIO(data))
    manifest = {
        "manifest_version": 1, "complete": True, "split": "test", "format": "npy",
        "num_classes": 10, "channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25],
        "shards": [{"name": shard.name, "samples": 3}], "total": 3, **change,
    }  # fmt: skip
    path = directory / "h-manifest.json"
    path.write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return path


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_hostile_member_is_a_corrupt_sample(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad, expected, options, gz, change = MEMBER_CASES[case]
    manifest = handmade_shard(tmp_path, bad, gz, change)
    stream = webdataset("test", root=str(manifest), image_size=16, **options)
    tracemalloc.start()
    try:
        with address_space_cap(), caplog.at_level(logging.WARNING):
            items = list(stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [label for _, label in items] == [3, 5] and stream.skipped == 1
    assert "sample '000001' of shard" in caplog.text and expected in caplog.text, caplog.text
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB traced"


def test_an_oversized_tar_header_makes_the_shard_unreadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = handmade_shard(tmp_path, [], False, {})
    shard = tmp_path / "h-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[2].offset  # after sample 000000
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] + pax_header(2 * 2**20) + data[cut:])
    stream = webdataset("test", root=str(manifest), image_size=16, max_member_bytes=2**20)
    with caplog.at_level(logging.WARNING):
        items = list(stream)
    assert [label for _, label in items] in ([], [3]) and stream.skipped == 1
    assert "(a tar header of 2097152 bytes (limit 1048576))" in caplog.text, caplog.text


def test_strict_hostile_member_is_one_line(tmp_path: Path) -> None:
    manifest = handmade_shard(tmp_path, MEMBER_CASES["npy-claims-1e10-floats"][0], False, {})
    stream = webdataset("test", root=str(manifest), image_size=16, strict=True)
    with address_space_cap(), pytest.raises(UserError) as caught:
        list(stream)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "h-000000.tar" in message
    assert "is corrupt (npy image of 100000x100000, not the stored 16x16)" in message


# -- 3. imagefolder and link loops -----------------------------------------------------------------
def image_tree(root: Path, per_class: int = 3) -> Path:
    """root/train/{a,b}/ with `per_class` 8x8 PNGs each; returns root/train."""
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return root / "train"


LOOPS: dict[str, Callable[[Path], None]] = {
    "loop-to-itself": lambda train: (train / "a" / "loop").symlink_to("."),
    "two-loops": lambda train: (
        (train / "a" / "loop").symlink_to("."),
        (train / "a" / "up").symlink_to(".."),  # the split: class b again, through a
    ),
    "a-folder-linked-twice": lambda train: (
        (train.parent / "extra").mkdir(),
        Image.new("RGB", (8, 8)).save(train.parent / "extra" / "x.png"),
        (train / "a" / "extra").symlink_to(train.parent / "extra"),
        (train / "b" / "extra").symlink_to(train.parent / "extra"),
    ),
}


@pytest.mark.parametrize("case", LOOPS)
def test_link_loops_are_read_once(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    train = image_tree(tmp_path)
    LOOPS[case](train)
    expected = 7 if case == "a-folder-linked-twice" else 6  # the extra image once, in class a
    with deadline(60), caplog.at_level(logging.WARNING):
        dataset = imagefolder("train", root=str(tmp_path), image_size=8)
    assert len(dataset) == expected
    assert "skipped" in caplog.text and "already read through another path" in caplog.text


def test_dmae_shard_reads_a_looping_folder_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = image_tree(tmp_path)
    (train / "a" / "loop").symlink_to(".")
    (train / "b" / "loop").symlink_to("..")
    out = tmp_path / "out" / "f"
    with deadline(120), caplog.at_level(logging.WARNING):
        result = runner.invoke(
            app, ["shard", "imagefolder", "--root", str(tmp_path), "--image-size", "8",
                  "--out", str(out)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(Path(f"{out}-manifest.json").read_text())["total"] == 6
    assert "skipped 2 linked folder(s)" in caplog.text  # on stderr outside pytest


def test_class_folder_linking_back_is_one_line(tmp_path: Path) -> None:
    train = image_tree(tmp_path)
    (train / "c").symlink_to("a")
    with deadline(60), pytest.raises(UserError, match=r"class folder .*c' is a link to a folder"):
        imagefolder("train", root=str(tmp_path), image_size=8)


# -- 4. a full disk --------------------------------------------------------------------------------
class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, raw: Any, room: int) -> None:
        self.raw, self.room = raw, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def disk_filling_after(room: int) -> Callable[..., Any]:
    """`open` for the shard writer: every shard file shares `room` bytes in all."""
    files: list[FullDisk] = []

    def opener(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        left = files[-1].room if files else room
        files.append(FullDisk(open(path, mode, *args, **kwargs), left))  # noqa: SIM115
        return files[-1]

    return opener


def manifest_failing_on(call: int) -> Callable[[Any, str], Any]:
    """`atomic_write_text` for the manifest whose `call`-th write finds the disk full."""
    calls = [0]

    def write_text(path: Any, text: str) -> Any:
        calls[0] += 1

        def write(file: Any) -> None:
            if calls[0] == call:
                file.write(text[:100].encode())
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            file.write(text.encode("utf-8"))

        return atomic_write(path, write)

    return write_text


def error_line(result: Any) -> str:
    """Exit code 2 and one line besides the progress bar the run had drawn; no traceback."""
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("shard digits")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


def check_only_listed_shards(directory: Path, prefix: str) -> dict:
    """Nothing torn, nothing left over: every shard the manifest lists is whole (its sha256),
    and no other shard, `.partial` or temporary file is there."""
    manifest = json.loads((directory / f"{prefix}-manifest.json").read_text())
    listed = {s["name"]: s["sha256"] for s in manifest["shards"]}
    for name, digest in listed.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
    left = {p.name for p in directory.iterdir()} - set(listed) - {f"{prefix}-manifest.json"}
    assert left == set(), left
    return manifest


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_full_disk_is_one_line_and_leaves_only_listed_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "s"
    args = ["shard", "digits", "--split", "test", "--format", "npy", "--max-count", "100",
            "--out", str(out / "d")]  # fmt: skip
    out.mkdir()
    if where == "shard":  # room for a shard and a half of 100 npy samples (3 kB each)
        monkeypatch.setattr(shard_writer, "open", disk_filling_after(450_000), raising=False)
    else:  # the manifest's update after the second shard
        monkeypatch.setattr(manifest_module, "atomic_write_text", manifest_failing_on(2))
    line = error_line(runner.invoke(app, args))
    failed = "d-000001.tar" if where == "shard" else "d-manifest.json"
    assert f"could not write {out / failed}: No space left on device" in line, line
    manifest = check_only_listed_shards(out, "d")
    assert [s["name"] for s in manifest["shards"]] == ["d-000000.tar"]
    assert manifest["complete"] is False
    monkeypatch.undo()  # room again: the same command resumes after the shard that is whole
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resumed after 100 samples" in result.output
    assert check_only_listed_shards(out, "d")["total"] == 360
