"""Tests of `dmae shard` and the `webdataset` dataset plugin that reads its shards back.

Shards are written from digits (embedded) and from a small image folder the tests write, so
nothing is downloaded. Ranks are faked with the RANK / WORLD_SIZE variables that webdataset's
node splitter reads; the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.data.shard import ShardConfig, parse_size, run_shard, sample_order
from dmae_cli.data.shard_writer import quantize
from dmae_cli.plugins import registry
from dmae_cli.runtime.errors import UserError
from dmae_plugins.datasets._shard_stream import ShardError, ShardStream, apportion
from dmae_plugins.datasets.digits import digits
from dmae_plugins.datasets.imagefolder import imagefolder
from dmae_plugins.datasets.webdataset import webdataset
from tests.conftest import one_line_error

runner = CliRunner()


# -- helpers -------------------------------------------------------------------------------------
def as_8bit(image: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of `image` decodes to: the image rounded to 256 levels."""
    return TF.to_dtype(quantize(image), torch.float32, scale=True)


def fingerprints(items: list[tuple[torch.Tensor, int]]) -> list[str]:
    """One hash per (image, label), to compare which samples two readers saw."""
    return [
        hashlib.sha1(image.numpy().tobytes() + bytes([label])).hexdigest() for image, label in items
    ]


def shard(tmp: Path, name: str, **settings) -> dict:
    """Run `dmae shard` and return its manifest."""
    result = run_shard(ShardConfig(out=str(tmp / name), **settings))
    return json.loads(result.manifest.read_text())


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def member_offset(path: Path, member: int) -> int:
    """The byte offset of the `member`-th tar member's header: a clean cut between samples."""
    with tarfile.open(path) as tar:
        return tar.getmembers()[member].offset


def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    single_process(monkeypatch)


@pytest.fixture(scope="module")
def digits_test_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits test split (360 images) in 4 shards of at most 100, in source order."""
    root = tmp_path_factory.mktemp("digits-test")
    shard(root, "digits-test", dataset="digits", split="test", max_count=100)
    return root


@pytest.fixture(scope="module")
def digits_train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits train split (1,437 images) in 8 shards of at most 200, shuffled."""
    root = tmp_path_factory.mktemp("digits-train")
    shard(root, "digits-train", dataset="digits", split="train", max_count=200, shuffle=True)
    return root


def copy_shards(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(source, target)
    return target


# -- arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1e9", 10**9), ("1.5 kb", 1500)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "1XB", "0", "-5MB"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(UserError, match="size"):
        parse_size(text)


def test_apportion_is_proportional_and_exact() -> None:
    assert apportion(10, [1.0, 1.0]) == [5, 5]
    assert apportion(7, [200.0, 200.0, 37.0]) == [3, 3, 1]
    assert sum(apportion(1437, [600.0, 437.0, 400.0])) == 1437
    assert apportion(5, [0.0, 0.0]) == [0, 0]


# -- round trips ---------------------------------------------------------------------------------
def test_digits_png_round_trip_equals_the_8bit_source(digits_test_shards: Path) -> None:
    manifest = json.loads((digits_test_shards / "digits-test-manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [100, 100, 100, 60]
    assert manifest["total"] == 360 and manifest["split"] == "test" and manifest["complete"]
    assert (manifest["num_classes"], manifest["image_size"], manifest["channels"]) == (10, 16, 1)
    assert manifest["class_names"] == list("0123456789") and manifest["format"] == "png"
    assert manifest["source"]["dataset"] == "digits" and len(manifest["fingerprint"]) == 16

    source = digits("test", root=None, image_size=16, augment=False)
    stream = webdataset("test", root=str(digits_test_shards), image_size=16, augment=False)
    assert isinstance(stream, ShardStream) and len(stream) == 360
    assert stream.info.mean == source.info.mean and stream.info.num_classes == 10
    items = list(stream)
    assert len(items) == 360 and stream.skipped == 0
    for index, (image, label) in enumerate(items):
        expected, expected_label = source[index]
        assert image.dtype == torch.float32 and image.shape == (1, 16, 16)
        assert torch.equal(image, as_8bit(expected)) and label == expected_label
    # 8 bits is the only loss: at most half a level from the float source
    worst = max((image - source[i][0]).abs().max().item() for i, (image, _) in enumerate(items))
    assert worst <= 0.5 / 255 + 1e-6


def test_digits_npy_round_trip_is_bit_exact(tmp_path: Path) -> None:
    shard(tmp_path, "d", dataset="digits", split="test", format="npy", max_count=400)
    source = digits("test", root=None, image_size=16, augment=False)
    items = list(webdataset("test", root=str(tmp_path), image_size=16, augment=False))
    assert len(items) == 360
    assert all(torch.equal(image, source[i][0]) for i, (image, _) in enumerate(items))


def test_shuffled_shards_hold_a_seeded_permutation(digits_train_shards: Path) -> None:
    source = digits("train", root=None, image_size=16, augment=False)
    stream = webdataset(
        "train", root=str(digits_train_shards), image_size=16, augment=False, shuffle=0
    )
    items = list(stream)
    order = sample_order(len(source), shuffle=True, seed=0)
    assert len(items) == len(source) == 1437 and sorted(order) == list(range(1437))
    for position in (0, 1, 500, 1436):
        image, label = items[position]
        expected, expected_label = source[int(order[position])]
        assert torch.equal(image, as_8bit(expected)) and label == expected_label


def write_folder(root: Path, sizes: list[tuple[int, int]]) -> None:
    """train/ and val/ with two classes of random RGB PNGs of the given sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (width, height) in enumerate(sizes):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.parametrize("augmentation", ["auto", "imagenet"])
def test_imagefolder_round_trip_is_exact(tmp_path: Path, augmentation: str) -> None:
    write_folder(tmp_path / "images", [(40, 30), (33, 50), (36, 36)])
    manifest = shard(
        tmp_path / "shards",
        "folder-val",
        dataset="imagefolder",
        root=str(tmp_path / "images"),
        split="val",
        image_size=32,
        max_count=4,
    )
    assert manifest["split"] == "test" and manifest["total"] == 6 and len(manifest["shards"]) == 2
    assert manifest["class_names"] == ["cat", "dog"] and manifest["channels"] == 3
    source = imagefolder("val", root=str(tmp_path / "images"), image_size=32, augment=False)
    stream = webdataset(
        "val",
        root=str(tmp_path / "shards"),
        image_size=32,
        augment=False,
        augmentation=augmentation,
    )
    items = list(stream)
    assert len(items) == len(source) == 6
    for index, (image, label) in enumerate(items):
        expected, expected_label = source[index]
        assert torch.equal(image, expected) and label == expected_label  # 8-bit source: exact


def test_training_augmentation_keeps_the_contract(digits_test_shards: Path) -> None:
    stream = webdataset(
        "test", root=str(digits_test_shards), image_size=24, augment=False, augmentation="light"
    )
    image, _ = next(iter(stream))
    assert image.shape == (1, 24, 24)  # resized from the stored 16
    for style, size in (("light", 16), ("imagenet", 12)):
        urls = str(digits_test_shards / "digits-test-{000000..000003}.tar")
        stream = webdataset(
            "test", root=None, image_size=size, augment=True, urls=urls, augmentation=style
        )
        for image, label in list(stream)[:20]:
            assert image.shape == (1, size, size) and image.dtype == torch.float32
            assert image.min() >= 0.0 and image.max() <= 1.0 and 0 <= label < 10


# -- distribution --------------------------------------------------------------------------------
def test_two_ranks_read_disjoint_halves_of_the_test_split(
    digits_test_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, lengths = [], []
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        stream = webdataset("test", root=str(digits_test_shards), image_size=16, augment=False)
        items = list(stream)
        lengths.append(len(stream))
        assert len(items) == len(stream)
        seen.append(set(fingerprints(items)))
    single_process(monkeypatch)
    everything = webdataset("test", root=str(digits_test_shards), image_size=16, augment=False)
    assert lengths == [200, 160]  # shards 0 and 2, shards 1 and 3
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(fingerprints(list(everything)))


def test_two_ranks_get_equal_disjoint_shares_every_epoch(
    digits_train_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_epoch = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            as_rank(monkeypatch, rank, 2)
            stream = webdataset(
                "train", root=str(digits_train_shards), image_size=16, augment=False
            )
            stream.set_epoch(epoch)
            items = list(stream)
            # 8 shards, 7 x 200 + 37: the ranks hold 800 and 637; both yield 637
            assert len(items) == len(stream) == 637
            seen.append(fingerprints(items))
        assert len(seen[0]) == len(seen[1])
        assert not set(seen[0]) & set(seen[1])
        per_epoch.append(seen)
    assert per_epoch[0][0] != per_epoch[1][0]  # a new shard and sample order each epoch


def test_epoch_order_is_reproducible(digits_train_shards: Path) -> None:
    def epoch_items(epoch: int) -> list[str]:
        stream = webdataset("train", root=str(digits_train_shards), image_size=16, augment=False)
        stream.set_epoch(epoch)
        return fingerprints(list(stream)[:50])

    assert epoch_items(3) == epoch_items(3) != epoch_items(4)


def test_resampled_mode_gives_every_rank_epoch_length(
    digits_test_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 3)
        stream = webdataset(
            "test",
            root=str(digits_test_shards),
            image_size=16,
            augment=False,
            resampled=True,
            epoch_length=70,
        )
        assert len(stream) == 70 and len(list(stream)) == 70


def test_too_few_shards_for_the_ranks_is_one_clear_error(
    digits_test_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_rank(monkeypatch, 0, 8)
    stream = webdataset("test", root=str(digits_test_shards), image_size=16, augment=False)
    with pytest.raises(UserError, match="4 shards cannot be split across 8 ranks"):
        len(stream)


def test_loader_with_workers_yields_exactly_len_batches_and_sees_worker_skips(
    digits_train_shards: Path, tmp_path: Path
) -> None:
    root = copy_shards(digits_train_shards, tmp_path)
    bad = root / "digits-train-000003.tar"
    truncate(bad, bad.stat().st_size // 2)
    stream = webdataset("train", root=str(root), image_size=16, augment=True)
    stream.set_batch_size(64)
    loader = DataLoader(stream, batch_size=64, drop_last=True, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 1437 // 64
    assert all(images.shape == (64, 1, 16, 16) for images, _ in batches)
    assert stream.skipped >= 1  # counted in a worker (again if a top-up rereads it), seen here


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_with_skip_resumes_inside_an_epoch(
    digits_train_shards: Path, workers: int
) -> None:
    """What a run resumed after 5 batches sees is what the uninterrupted one saw after them."""
    stream = webdataset("train", root=str(digits_train_shards), image_size=16, augment=False)
    stream.set_batch_size(50)
    loader = DataLoader(stream, batch_size=50, drop_last=True, num_workers=workers)
    stream.set_epoch(2)
    full = [[*labels.tolist(), images.sum().item()] for images, labels in loader]
    stream.set_epoch(2, skip=5 * 50)
    assert len(loader) == len(full) - 5 == 1437 // 50 - 5
    resumed = [[*labels.tolist(), images.sum().item()] for images, labels in loader]
    assert resumed == full[5:]


# -- corrupt data --------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", ["middle", "between samples"])
def test_truncated_shard_is_skipped_and_counted(
    digits_test_shards: Path, tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_shards(digits_test_shards, tmp_path)
    bad = root / "digits-test-000001.tar"
    # 20 members = 10 whole samples; "middle" cuts inside the 11th sample's image
    size = member_offset(bad, 20) + (0 if cut == "between samples" else 1000)
    truncate(bad, size)
    stream = webdataset("test", root=str(root), image_size=16, augment=False)
    with caplog.at_level(logging.WARNING):
        items = list(stream)
    assert len(items) == 360 - 90 and stream.skipped == 1
    assert "digits-test-000001.tar" in caplog.text


def test_truncated_shard_tops_up_training_so_the_length_holds(
    digits_train_shards: Path, tmp_path: Path
) -> None:
    root = copy_shards(digits_train_shards, tmp_path)
    truncate(root / "digits-train-000002.tar", 5000)
    stream = webdataset("train", root=str(root), image_size=16, augment=False, shuffle=10)
    assert len(list(stream)) == len(stream) == 1437 and stream.skipped >= 1


def test_truncated_shard_in_strict_mode_is_one_line_naming_it(
    digits_test_shards: Path, tmp_path: Path
) -> None:
    root = copy_shards(digits_test_shards, tmp_path)
    bad = root / "digits-test-000002.tar"
    truncate(bad, bad.stat().st_size // 2)
    stream = webdataset("test", root=str(root), image_size=16, augment=False, strict=True)
    with pytest.raises(ShardError) as caught:
        list(stream)
    assert "digits-test-000002.tar" in str(caught.value)
    # the same single line when a DataLoader worker raised it
    batches = iter(DataLoader(stream, batch_size=32, num_workers=1))
    with pytest.raises(ShardError) as caught:
        list(batches)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "digits-test-000002.tar" in message
    assert "Traceback" not in message
    del batches, caught  # torch waits ~5 s for a worker that raised; here, not in the next test
    gc.collect()


def test_corrupt_sample_is_skipped_and_nothing_is_unpickled(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(canary),))

    good = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(good, format="PNG")
    members = {
        "000000.png": good.getvalue(),
        "000000.cls": b"3",
        "000000.pyd": pickle.dumps(Evil()),  # webdataset's default decoders would run this
        "../../000001.png": b"not a png",  # a hostile name is only ever a key
        "../../000001.cls": b"1",
    }
    shards = tmp_path / "s"
    shards.mkdir()
    with tarfile.open(shards / "x-000000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = webdataset(
        "test",
        root=str(shards / "x-000000.tar"),
        image_size=8,
        augment=False,
        num_classes=10,
        channels=1,
        mean=[0.5],
        std=[0.5],
    )
    items = list(stream)
    assert len(items) == 1 and items[0][1] == 3 and stream.skipped == 1
    assert torch.allclose(items[0][0], torch.full((1, 8, 8), 200 / 255))
    assert not canary.exists() and not (tmp_path.parent / "000001.png").exists()


# -- metadata and locating the shards ----------------------------------------------------------
def test_missing_manifest_and_metadata_is_one_clear_error(
    digits_test_shards: Path, tmp_path: Path
) -> None:
    root = copy_shards(digits_test_shards, tmp_path)
    (root / "digits-test-manifest.json").unlink()
    urls = str(root / "digits-test-{000000..000003}.tar")
    with pytest.raises(UserError, match="num_classes, channels, mean, std"):
        webdataset("test", root=urls, image_size=16, augment=False)
    stream = webdataset(
        "test",
        root=None,
        image_size=16,
        augment=False,
        urls=urls,
        num_classes=10,
        channels=1,
        mean=[0.3],
        std=[0.4],
        epoch_length=360,
    )
    assert len(list(stream)) == 360 and stream.info.mean == (0.3,)


def test_pattern_and_pipe_urls_find_the_manifest_or_take_it_as_option(
    digits_test_shards: Path,
) -> None:
    pattern = str(digits_test_shards / "digits-test-{000000..000003}.tar")
    stream = webdataset("test", root=pattern, image_size=16, augment=False)
    assert len(stream) == 360  # the manifest next to the shards gave the counts
    piped = "::".join(f"pipe:cat {digits_test_shards}/digits-test-{i:06d}.tar" for i in range(4))
    manifest = str(digits_test_shards / "digits-test-manifest.json")
    stream = webdataset(
        "test", root=None, image_size=16, augment=False, urls=piped, manifest=manifest
    )
    assert len(stream) == 360 and len(list(stream)) == 360 and stream.skipped == 0


def test_wrong_split_and_missing_shards_are_refused(digits_test_shards: Path) -> None:
    pattern = str(digits_test_shards / "digits-test-{000000..000003}.tar")
    with pytest.raises(UserError, match="of split 'test', not 'train'"):
        webdataset("train", root=pattern, image_size=16, augment=False)
    with pytest.raises(UserError, match="no manifest for split 'train'"):
        webdataset("train", root=str(digits_test_shards), image_size=16, augment=False)
    with pytest.raises(UserError, match="4 of 5 shards not found"):
        webdataset(
            "test",
            root=str(digits_test_shards / "digits-test-{000003..000007}.tar"),
            image_size=16,
            augment=False,
        )
    with pytest.raises(UserError, match="needs data.root"):
        webdataset("test", root=None, image_size=16, augment=False)


# -- resuming ------------------------------------------------------------------------------------
class Flaky:
    """digits' test split that fails once at item `fail_at` (then behaves)."""

    fail_at: int | None = None

    def __call__(self, split, *, root=None, image_size=16, augment=False, **options):
        dataset = digits(split, root=root, image_size=image_size, augment=augment, **options)
        flaky = self

        class Wrapped(torch.utils.data.Dataset):
            info = dataset.info

            def __len__(self) -> int:
                return len(dataset)

            def __getitem__(self, index: int):
                if index == flaky.fail_at:
                    flaky.fail_at = None
                    raise KeyboardInterrupt
                return dataset[index]

        return Wrapped()


def test_interrupted_run_keeps_whole_shards_and_resumes_to_identical_shards(
    tmp_path: Path,
) -> None:
    flaky = Flaky()
    registry.datasets.add("flaky", flaky)
    try:
        settings = dict(dataset="flaky", split="test", max_count=100)
        flaky.fail_at = 250
        with pytest.raises(KeyboardInterrupt):
            run_shard(ShardConfig(out=str(tmp_path / "a" / "f"), **settings))
        partial = json.loads((tmp_path / "a" / "f-manifest.json").read_text())
        assert not partial["complete"] and [s["samples"] for s in partial["shards"]] == [100, 100]
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
            "f-000000.tar",
            "f-000001.tar",
            "f-manifest.json",
        ]
        with pytest.raises(UserError, match="incomplete"):
            webdataset("test", root=str(tmp_path / "a"), image_size=16, augment=False)
        resumed = run_shard(ShardConfig(out=str(tmp_path / "a" / "f"), **settings))
        assert resumed.resumed_at == 200 and resumed.total == 360
        fresh = run_shard(ShardConfig(out=str(tmp_path / "b" / "f"), **settings))
        digests = [json.loads(r.manifest.read_text())["shards"] for r in (resumed, fresh)]
        assert [s["sha256"] for s in digests[0]] == [s["sha256"] for s in digests[1]]
        with pytest.raises(UserError, match="other settings"):
            run_shard(ShardConfig(out=str(tmp_path / "a" / "f"), **{**settings, "max_count": 50}))
        again = run_shard(
            ShardConfig(
                out=str(tmp_path / "a" / "f"), overwrite=True, **{**settings, "max_count": 200}
            )
        )
        assert len(again.shards) == 2 and not (tmp_path / "a" / "f-000003.tar").exists()
    finally:
        registry.datasets.remove("flaky")


# -- the command line ----------------------------------------------------------------------------
def test_cli_writes_shards_and_says_where(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["shard", "digits", "--split", "test", "--out", str(tmp_path / "d"), "--max-count", "200"],
    )
    assert result.exit_code == 0, result.output
    assert "360 samples in 2 shards" in result.stderr and "d-manifest.json" in result.stderr
    assert (tmp_path / "d-000001.tar").is_file()


def test_cli_help_has_an_example() -> None:
    result = runner.invoke(app, ["shard", "--help"])
    assert result.exit_code == 0 and "dmae shard imagefolder" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nosuch"], "unknown dataset 'nosuch'"),
        (["imagefolder", "--root", "/nowhere/at/all"], "is not a directory"),
        (["digits", "--max-size", "huge"], "size 'huge'"),
        (["digits", "--format", "gif"], "unknown format 'gif'"),
        (["digits", "--option", "nonsense"], "expected KEY=VALUE"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["shard", *args, "--out", str(tmp_path / "x")])
    assert expected in one_line_error(result)
