"""Tests of the first-party dataset plugins: digits, cifar10 and imagefolder.

CIFAR-10 and image folders are written by the tests themselves (a few images in the real
formats), so nothing is downloaded and the file runs in a few seconds on CPU.
"""

from __future__ import annotations

import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmae_cli.api import DatasetInfo, ImageDataset
from dmae_cli.runtime.errors import UserError
from dmae_plugins.datasets import _common
from dmae_plugins.datasets.cifar10 import CLASS_NAMES as CIFAR_NAMES
from dmae_plugins.datasets.cifar10 import cifar10, safe_load
from dmae_plugins.datasets.digits import digits, split_indices
from dmae_plugins.datasets.imagefolder import imagefolder


def check_items(dataset: ImageDataset, channels: int, size: int, count: int = 5) -> None:
    """The contract every item honours: float32 (C, H, W) in [0, 1] and an int label."""
    for index in range(min(count, len(dataset))):
        image, label = dataset[index]
        assert image.dtype == torch.float32
        assert image.shape == (channels, size, size)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert isinstance(label, int) and 0 <= label < dataset.info.num_classes


def shifts(image: torch.Tensor, max_shift: int) -> list[torch.Tensor]:
    """Every zero-filled translation of `image` by at most `max_shift` pixels each way."""
    height, width = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (max_shift,) * 4)
    span = range(2 * max_shift + 1)
    return [padded[..., i : i + height, j : j + width] for i in span for j in span]


# -- digits ----------------------------------------------------------------------------------
def test_digits_split_sizes_and_items() -> None:
    train = digits("train", root=None, image_size=16, augment=False)
    test = digits("test", root=None, image_size=16, augment=False)
    assert (len(train), len(test)) == (1437, 360)
    check_items(train, 1, 16)
    check_items(test, 1, 16)
    info = train.info
    assert isinstance(train, ImageDataset) and isinstance(info, DatasetInfo)
    assert (info.num_classes, info.image_size, info.channels) == (10, 16, 1)
    assert info.class_names == tuple("0123456789")
    assert len(info.fingerprint) == 16 and int(info.fingerprint, 16) >= 0
    assert test.info.mean == info.mean and test.info.std == info.std  # one normalisation


def test_digits_split_is_a_stratified_partition() -> None:
    indices = split_indices(0)
    both = np.concatenate([indices["train"], indices["test"]])
    assert np.array_equal(np.sort(both), np.arange(1797))
    test_labels = digits("test").labels
    assert torch.bincount(test_labels, minlength=10).min() >= 35  # about 36 per class


def test_digits_mean_std_are_the_train_statistics() -> None:
    train = digits("train", image_size=8)
    assert train.info.mean[0] == pytest.approx(train.images.mean().item(), abs=1e-4)
    assert train.info.std[0] == pytest.approx(train.images.std().item(), abs=1e-3)


def test_digits_native_size_is_the_raw_data() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    test = digits("test", image_size=8)
    index = int(split_indices(0)["test"][0])
    image, label = test[0]
    assert torch.equal(image[0], torch.from_numpy(raw.images[index] / 16.0).float())
    assert label == raw.target[index]


def test_digits_determinism_and_fingerprints() -> None:
    first, again = digits("train"), digits("train")
    assert torch.equal(first.images, again.images)
    assert first.info.fingerprint == again.info.fingerprint
    assert digits("val").info.fingerprint == digits("test").info.fingerprint
    others = {
        digits("test").info.fingerprint,
        digits("train", image_size=32).info.fingerprint,
        digits("train", split_seed=1).info.fingerprint,
    }
    assert first.info.fingerprint not in others and len(others) == 3
    assert digits("train", augment=True).info.fingerprint == first.info.fingerprint


def test_digits_augmentation_translates_and_never_flips() -> None:
    plain = digits("train", image_size=16)
    augmented = digits("train", image_size=16, augment=True)
    original, label = plain[0]
    candidates = shifts(original, max_shift=2)
    flipped = original.flip(-1)
    assert not any(torch.equal(flipped, c) for c in candidates)  # the check below means something
    torch.manual_seed(0)
    seen = set()
    for _ in range(100):
        image, aug_label = augmented[0]
        assert aug_label == label and image.shape == (1, 16, 16)
        assert image.min() >= 0.0 and image.max() <= 1.0
        matches = [k for k, c in enumerate(candidates) if torch.equal(image, c)]
        assert matches, "augmented digit is not a translation of the original"
        seen.add(matches[0])
    assert len(seen) > 5  # random, and not stuck on one shift
    torch.manual_seed(3)
    first = augmented[0][0]
    torch.manual_seed(3)
    assert torch.equal(first, augmented[0][0])  # reproducible under torch.manual_seed


def test_digits_items_are_fresh_tensors() -> None:
    dataset = digits("test")
    image, _ = dataset[0]
    image.add_(1.0)  # e.g. noise added in place by a caller
    assert dataset[0][0].max() <= 1.0


def test_digits_options_are_checked() -> None:
    with pytest.raises(UserError, match="unknown option 'flip'"):
        digits("train", flip=True)
    with pytest.raises(UserError, match="option 'split_seed' must be of type int"):
        digits("train", split_seed="1")
    with pytest.raises(UserError, match="unknown split 'training'"):
        digits("training")
    with pytest.raises(UserError, match="image_size must be a positive integer"):
        digits("train", image_size=0)
    assert len(digits("train", augment=True, max_shift=0)[0][0]) == 1


# -- cifar10 ---------------------------------------------------------------------------------
def python2_pickle(obj: object) -> bytes:
    """`obj` pickled as the real CIFAR files are: Python 2's cPickle, protocol 2.

    Python 3 cannot write that format directly (its protocol 2 wraps bytes in `_codecs.encode`),
    so a protocol-3 pickle is rewritten opcode by opcode: bytes and text become Python 2 `str`
    (BINSTRING), and numpy's module gets its old name `numpy.core.multiarray`.
    """
    raw = pickle.dumps(obj, protocol=3)
    ops = list(pickletools.genops(raw))
    out = bytearray()
    for (op, arg, pos), following in zip(ops, [*ops[1:], (None, None, len(raw))], strict=True):
        chunk = raw[pos : following[2]]
        if op.name == "PROTO":
            chunk = b"\x80\x02"
        elif op.name in ("SHORT_BINBYTES", "BINBYTES", "BINUNICODE", "SHORT_BINUNICODE"):
            data = arg if isinstance(arg, bytes) else arg.encode("latin-1")
            short = len(data) < 256
            chunk = b"U" + bytes([len(data)]) if short else b"T" + len(data).to_bytes(4, "little")
            chunk += data
        elif op.name == "GLOBAL":
            chunk = chunk.replace(b"numpy._core.", b"numpy.core.")
        out += chunk
    return bytes(out)


def write_batch(path: Path, data: np.ndarray, labels: list[int], python2: bool) -> None:
    """One batch: the real Python 2 format, or a Python 3 re-pickle with str keys.

    Protocol 4, not 5: protocol 5 stores arrays through `numpy._core.numeric._frombuffer`, a
    global the safe unpickler does not allow (the real files never need it).
    """
    if python2:
        batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x"]}
        path.write_bytes(python2_pickle(batch))
    else:
        batch = {"batch_label": "fake", "labels": labels, "data": data, "filenames": ["x"]}
        path.write_bytes(pickle.dumps(batch, protocol=4))


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny `cifar-10-batches-py`: 5 train batches of 2 images, a test batch of 3.

    Batches 2 and 4 are Python 3 re-pickles; the others, and the meta file, are in the real
    Python 2 format.
    """
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train": [], "train_labels": [], "test": None, "test_labels": None}
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 2)]
        write_batch(directory / f"data_batch_{i}", data, labels, python2=i % 2 == 1)
        arrays["train"].append(data)
        arrays["train_labels"] += labels
    arrays["test"] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    arrays["test_labels"] = [0, 5, 9]
    write_batch(directory / "test_batch", arrays["test"], arrays["test_labels"], True)
    meta = {b"num_cases_per_batch": 2, b"label_names": [n.encode() for n in CIFAR_NAMES]}
    (directory / "batches.meta").write_bytes(python2_pickle(meta))
    arrays["train"] = np.concatenate(arrays["train"])
    return tmp_path, arrays


def test_cifar10_reads_pixels_back_exactly(cifar_root) -> None:
    root, arrays = cifar_root
    for split, count in (("train", 10), ("test", 3)):
        dataset = cifar10(split, root=str(root), image_size=32, augment=False)
        assert len(dataset) == count
        check_items(dataset, 3, 32)
        expected = arrays[split].reshape(-1, 3, 32, 32)
        for index in range(count):
            image, label = dataset[index]
            assert np.array_equal((image * 255).round().to(torch.uint8).numpy(), expected[index])
            assert label == arrays[f"{split}_labels"][index]
    info = cifar10("test", root=str(root)).info
    assert (info.num_classes, info.image_size, info.channels) == (10, 32, 3)
    assert info.class_names == CIFAR_NAMES and info.mean == (0.4914, 0.4822, 0.4465)


def test_cifar10_root_may_be_the_directory_itself(cifar_root) -> None:
    root, _ = cifar_root
    parent = cifar10("test", root=str(root))
    itself = cifar10("val", root=str(root / "cifar-10-batches-py"))
    assert torch.equal(parent.images, itself.images)
    assert parent.info.fingerprint == itself.info.fingerprint


def test_cifar10_fingerprints(cifar_root) -> None:
    root, _ = cifar_root
    train, test = cifar10("train", root=str(root)), cifar10("test", root=str(root))
    assert train.info.fingerprint == cifar10("train", root=str(root)).info.fingerprint
    assert train.info.fingerprint != test.info.fingerprint
    assert cifar10("test", root=str(root), image_size=64).info.fingerprint != test.info.fingerprint


def test_cifar10_augmentation_and_resize(cifar_root) -> None:
    root, _ = cifar_root
    plain = cifar10("train", root=str(root))
    augmented = cifar10("train", root=str(root), augment=True)
    original, _ = plain[0]
    candidates = shifts(original, 4) + shifts(original.flip(-1), 4)
    torch.manual_seed(0)
    for _ in range(20):
        image, _ = augmented[0]
        assert any(torch.equal(image, c) for c in candidates)
    check_items(cifar10("train", root=str(root), image_size=48, augment=True), 3, 48)
    check_items(cifar10("test", root=str(root), image_size=16), 3, 16)


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")

    class Evil:
        def __reduce__(self):
            return (os.remove, (str(victim),))

    evil = tmp_path / "test_batch"
    evil.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(UserError, match="refusing to load global"):
        safe_load(evil)
    with pytest.raises(UserError, match="test_batch"):
        cifar10("test", root=str(tmp_path))
    assert victim.read_text() == "still here"


def test_cifar10_user_errors(tmp_path: Path, cifar_root) -> None:
    with pytest.raises(UserError, match=r"needs data\.root"):
        cifar10("train", root=None)
    with pytest.raises(UserError, match="is not a directory"):
        cifar10("train", root=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"lacks data_batch_1, .*data_batch_5"):
        cifar10("train", root=str(empty))
    (empty / "test_batch").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable CIFAR-10 python batch"):
        cifar10("test", root=str(empty))
    root, _ = cifar_root
    with pytest.raises(UserError, match="unknown option 'padding'"):
        cifar10("train", root=str(root), padding=4)


# -- imagefolder -----------------------------------------------------------------------------
def write_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """train/{cat,dog} with 3 and 2 images (one grayscale, one JPEG) and val/{cat,dog}."""
    root = tmp_path / "images"
    write_image(root / "train" / "dog" / "d0.png", 0)
    write_image(root / "train" / "dog" / "d1.jpg", 1)
    write_image(root / "train" / "cat" / "c0.png", 2)
    write_image(root / "train" / "cat" / "c1.png", 3, mode="L")
    write_image(root / "train" / "cat" / "sub" / "c2.PNG", 4)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "val" / "cat" / "c.png", 5)
    write_image(root / "val" / "dog" / "d.png", 6)
    return root


def test_imagefolder_reads_classes_and_items(folder_root: Path) -> None:
    train = imagefolder("train", root=str(folder_root), image_size=16, augment=True)
    test = imagefolder("test", root=str(folder_root), image_size=16, augment=False)
    assert (len(train), len(test)) == (5, 2)
    assert train.info.class_names == ("cat", "dog") and train.info.num_classes == 2
    assert (train.info.channels, train.info.image_size) == (3, 16)
    assert train.info.mean == (0.485, 0.456, 0.406) and train.info.std == (0.229, 0.224, 0.225)
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    check_items(train, 3, 16)
    check_items(test, 3, 16)
    assert torch.equal(test[0][0], test[0][0])  # evaluation transform is deterministic
    assert [test[i][1] for i in range(2)] == [0, 1]


def test_imagefolder_eval_transform_is_resize_and_center_crop(folder_root: Path) -> None:
    test = imagefolder("val", root=str(folder_root), image_size=8)
    image, _ = test[0]
    with Image.open(folder_root / "val" / "cat" / "c.png") as pil:
        # shorter side 20 -> int(8 * 256 / 224) = 9, then the central 8x8
        resized = pil.convert("RGB").resize((10, 9), Image.Resampling.BICUBIC)
    reference = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255
    top, left = round((9 - 8) / 2), round((10 - 8) / 2)
    expected = reference[:, top : top + 8, left : left + 8]
    assert torch.allclose(image, expected, atol=2 / 255)


def test_imagefolder_test_falls_back_to_test_dir(folder_root: Path) -> None:
    (folder_root / "val").rename(folder_root / "test")
    assert len(imagefolder("test", root=str(folder_root), image_size=8)) == 2


def test_imagefolder_fingerprints(folder_root: Path) -> None:
    def fp(split: str, size: int = 8) -> str:
        return imagefolder(split, root=str(folder_root), image_size=size).info.fingerprint

    assert fp("train") == fp("train") and fp("test") == fp("val")
    assert len({fp("train"), fp("test"), fp("train", 16)}) == 3
    write_image(folder_root / "train" / "dog" / "d2.png", 7)
    assert (
        fp("train") != imagefolder("train", root=str(folder_root), image_size=16).info.fingerprint
    )


def test_imagefolder_corrupt_image_skipped_and_counted(folder_root: Path) -> None:
    bad = folder_root / "train" / "cat" / "c0.png"
    bad.write_bytes(b"\x89PNG but not really")
    dataset = imagefolder("train", root=str(folder_root), image_size=8)
    assert len(dataset) == 5 and dataset.skipped == 0
    replacement, label = dataset[0]  # c0.png is the first file: the next one stands in
    assert torch.equal(replacement, dataset[1][0]) and label == 0
    for index in range(len(dataset)):
        dataset[index]
    assert dataset.skipped == 1  # each bad file counted once
    strict = imagefolder("train", root=str(folder_root), image_size=8, strict=True)
    with pytest.raises(UserError, match=r"cannot decode image .*c0\.png"):
        strict[0]


def test_imagefolder_all_corrupt_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"nope")
    dataset = imagefolder("train", root=str(tmp_path), image_size=8)
    with pytest.raises(UserError, match="none of the 1 images"):
        dataset[0]


def test_imagefolder_user_errors(tmp_path: Path, folder_root: Path) -> None:
    with pytest.raises(UserError, match=r"needs data\.root"):
        imagefolder("train", root=None)
    with pytest.raises(UserError, match="is not a directory"):
        imagefolder("train", root=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has no val/ or test/ directory"):
        imagefolder("test", root=str(folder_root / "train"))
    with pytest.raises(UserError, match="unknown option 'strcit'"):
        imagefolder("train", root=str(folder_root), strcit=True)
    with pytest.raises(UserError, match="option 'strict' must be of type bool"):
        imagefolder("train", root=str(folder_root), strict="yes")
    (folder_root / "train" / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty.* has no images"):
        imagefolder("train", root=str(folder_root))
    (folder_root / "train" / "empty").rmdir()
    write_image(folder_root / "val" / "bird" / "b.png", 8)
    with pytest.raises(UserError, match=r"bird.* is not among the training classes"):
        imagefolder("val", root=str(folder_root))
    bare = tmp_path / "bare"
    (bare / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="has no class sub-directories"):
        imagefolder("train", root=str(bare))


# -- shared helpers and registration -------------------------------------------------------
def test_fingerprint_frames_its_parts() -> None:
    assert _common.fingerprint("ab", "c") != _common.fingerprint("a", "bc")
    assert _common.fingerprint(np.arange(3)) != _common.fingerprint(np.arange(3).astype(np.int32))
    assert _common.fingerprint(torch.arange(3)) == _common.fingerprint(np.arange(3))


def test_plugins_are_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmae_cli.plugins.registry import datasets

    monkeypatch.setenv("DMAE_PLUGINS", "builtin")
    datasets.refresh()
    assert {"cifar10", "digits", "imagefolder"} <= set(datasets.names())
    assert datasets.get("digits") is digits


def test_digits_warns_that_root_is_ignored() -> None:
    with pytest.warns(UserWarning, match="data.root='/data' is ignored"):
        digits("test", root="/data")
