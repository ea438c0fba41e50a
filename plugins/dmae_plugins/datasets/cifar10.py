"""CIFAR-10 read from the standard local `cifar-10-batches-py` directory; never downloaded.

The official "python version" is a set of pickles (`data_batch_1` .. `data_batch_5`,
`test_batch`, `batches.meta`). Unpickling runs code named by the file, so a plain `pickle.load`
on a user-supplied path is arbitrary code execution. The batches only need dicts, lists, bytes,
str, ints and numpy uint8 arrays, so they are read with an unpickler that resolves exactly the
three globals a numpy array needs and refuses every other one.

Refusing code is not enough: a 256-byte pickle can reference one list a thousand times from a
list referenced a thousand times, and whatever walks it (numpy, `str`, a hash) does a billion
steps. So a file is read whole, up to `MAX_BATCH_BYTES`, by the pure-Python unpickler (whose
memo is a dict, not an array sized by an index the file names); dict keys and set elements
must be plain values (a nested tuple's hash would walk it); an array may only be rebuilt the
way numpy pickles one (empty, then filled from the file's bytes) with a numeric dtype whose
state is a plain number type's (flags or fields could make numpy read bytes as pointers); and the
batch's `data` and `labels` are checked for type, shape and range before anything is converted.

The whole split is kept as one uint8 (N, 3, 32, 32) tensor (150 MB for train); items are
converted to float in [0, 1] one at a time.
"""

from __future__ import annotations

import io
import pickle
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dmae_cli.api import DatasetInfo, PluginError
from dmae_plugins.datasets._common import (
    InMemoryImages,
    check_image_size,
    check_options,
    fingerprint,
    normalize_split,
    random_hflip,
    random_translate,
    require_root,
    resize,
)

try:  # numpy >= 2 moved the module; the old name still appears inside the files themselves
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

NAME = "cifar10"
DIRNAME = "cifar-10-batches-py"
NATIVE_SIZE = 32
CHANNELS = 3
PADDING = 4  # the standard CIFAR augmentation: random crop 32 with padding 4, plus a flip
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META_FILE = "batches.meta"
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean and std of the 50,000 training images' pixels in [0, 1] (the std over all
# pixels, not the often-quoted (0.2023, 0.1994, 0.2010), which averages per-image stds).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
OPTIONS: dict[str, type] = {}

MAX_BATCH_BYTES = 256 * 2**20  # a real batch file is 31 MB
_PLAIN = (str, bytes, int, float, bool, type(None))
_NDARRAY = object()  # what the pickle gets for numpy.ndarray: usable only as `_reconstruct`'s


def _reconstruct_empty(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's `_reconstruct` as numpy's pickles call it: an empty array, filled by BUILD
    (whose `__setstate__` checks the data against the shape) rather than allocated here."""
    if subtype is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("an array rebuilt other than as numpy pickles one")
    return _reconstruct(np.ndarray, (0,), typecode)


def _numeric_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """`numpy.dtype` for a short name of a number type ('u1', 'i8'), nothing structured."""
    named = isinstance(spec, str | bytes) and len(spec) <= 8
    if not named or not all(isinstance(flag, bool | int) for flag in (align, copy)):
        raise pickle.UnpicklingError("a numpy dtype that is not a plain number type")
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"a numpy array of {dtype}, not of numbers")
    return dtype


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _numeric_dtype,
}


_PurePythonUnpickler = pickle._Unpickler  # type: ignore[attr-defined]


class SafeUnpickler(_PurePythonUnpickler):
    """The pure-Python unpickler, able to rebuild numpy arrays and nothing else that names a
    global, whose dict keys and set elements are plain values."""

    dispatch: ClassVar[dict[int, Any]] = dict(_PurePythonUnpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _plain_keys(load: Any, keys_of: Any) -> Any:
    def checked(self: SafeUnpickler) -> None:
        if not all(isinstance(key, _PLAIN) for key in keys_of(self.stack)):
            raise pickle.UnpicklingError("a dict key or set element that is not a plain value")
        load(self)

    return checked


def _plain_dtype_state(load: Any) -> Any:
    """BUILD, refusing to set on a dtype any state but a plain number type's: a state's
    flags, fields or subarray could make numpy read the array's bytes as object pointers."""

    def checked(self: SafeUnpickler) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.dtype) and not (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in ("<", ">", "|", "=", b"<", b">", b"|", b"=")
            and state[2:] == (None, None, None, -1, -1, 0)
        ):
            raise pickle.UnpicklingError("a numpy dtype state that is not a plain number type's")
        load(self)

    return checked


for _opcode, _keys_of in (
    (pickle.SETITEM, lambda stack: stack[-2:-1]),
    (pickle.SETITEMS, lambda stack: stack[::2]),  # after a MARK the stack holds the items
    (pickle.DICT, lambda stack: stack[::2]),
    (pickle.ADDITEMS, lambda stack: stack),
    (pickle.FROZENSET, lambda stack: stack),
):
    SafeUnpickler.dispatch[_opcode[0]] = _plain_keys(SafeUnpickler.dispatch[_opcode[0]], _keys_of)
SafeUnpickler.dispatch[pickle.BUILD[0]] = _plain_dtype_state(
    SafeUnpickler.dispatch[pickle.BUILD[0]]
)


def safe_load(path: Path) -> Any:
    """Unpickle a CIFAR batch file (Python 2 format, hence `encoding="bytes"`) safely."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BATCH_BYTES + 1)
    except OSError as exc:
        raise PluginError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BATCH_BYTES:
        raise PluginError(
            f"{str(path)!r} is larger than {MAX_BATCH_BYTES >> 20} MiB: not a CIFAR-10 batch"
        )
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # whatever a damaged or hostile file makes the unpickler raise
        first = exc.args[0] if exc.args else None  # a message, never a repr of the file's data
        reason = first.splitlines()[0][:200] if isinstance(first, str) and first.strip() else ""
        reason = reason or type(exc).__name__
        raise PluginError(
            f"{str(path)!r} is not a readable CIFAR-10 python batch: {reason}"
        ) from exc


def _field(batch: Any, key: str, path: Path) -> Any:
    """`batch[key]`, whether the file was pickled by Python 2 (bytes keys) or 3 (str keys)."""
    if isinstance(batch, dict):
        for candidate in (key.encode(), key):
            if candidate in batch:
                return batch[candidate]
    raise PluginError(f"{str(path)!r} is not a CIFAR-10 python batch: no '{key}' entry")


def _describe(value: Any) -> str:
    """A value from a file, for a message: small ints as they are, anything else by its type
    (the repr of a hostile nesting could be anything but short)."""
    if isinstance(value, bool):
        return f"a bool ({value})"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**6 else "an integer beyond 10**6"
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def check_batch(batch: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as uint8 (N, 3, 32, 32) and labels as int64 (N,), once their types,
    shapes and values are checked; nothing is converted before."""
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    row = CHANNELS * NATIVE_SIZE * NATIVE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else _describe(data)
        raise PluginError(f"{str(path)!r}: expected uint8 data of shape (N, {row}), got {got}")
    if data.shape[1] != row:
        raise PluginError(
            f"{str(path)!r}: expected uint8 data of shape (N, {row}), got {data.shape}"
        )
    count = data.shape[0]
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu" or labels.shape != (count,):
            got = f"{labels.dtype} array of shape {labels.shape}"
            raise PluginError(f"{str(path)!r}: expected {count} integer labels, got a {got}")
        labels = labels.tolist()  # numbers only: the dtype is numeric
    if not isinstance(labels, list | tuple) or len(labels) != count:
        got = f"{len(labels)}" if isinstance(labels, list | tuple) else _describe(labels)
        raise PluginError(f"{str(path)!r}: expected a list of {count} labels, got {got}")
    for position, label in enumerate(labels):
        if (
            isinstance(label, bool)
            or not isinstance(label, int)
            or not 0 <= label < len(CLASS_NAMES)
        ):
            raise PluginError(
                f"{str(path)!r}: label {position} is {_describe(label)}, not a class number "
                f"0..{len(CLASS_NAMES) - 1}"
            )
    images = data.reshape(-1, CHANNELS, NATIVE_SIZE, NATIVE_SIZE)
    return images, np.asarray(labels, dtype=np.int64)


def batch_dir(root: str | Path | None) -> Path:
    """The `cifar-10-batches-py` directory: `root` itself or its child of that name."""
    base = require_root(NAME, root, f"a {DIRNAME} directory (or its parent)")
    child = base / DIRNAME
    return child if child.is_dir() else base


def read_batches(directory: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,) from the named batch files."""
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise PluginError(
            f"dataset '{NAME}': {str(directory)!r} lacks {', '.join(missing)}; expected the "
            f"extracted {DIRNAME} directory (data_batch_1..5, test_batch, batches.meta)"
        )
    images, labels = [], []
    for name in names:
        path = directory / name
        batch_images, batch_labels = check_batch(safe_load(path), path)
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def class_names(directory: Path) -> tuple[str, ...]:
    """The label names from `batches.meta` when present, else the standard ten."""
    path = directory / META_FILE
    if not path.is_file():
        return CLASS_NAMES
    names = _field(safe_load(path), "label_names", path)
    if not isinstance(names, list | tuple) or len(names) != len(CLASS_NAMES):
        got = len(names) if isinstance(names, list | tuple) else _describe(names)
        raise PluginError(f"{str(path)!r}: expected {len(CLASS_NAMES)} label names, got {got}")
    if not all(isinstance(n, str | bytes) and len(n) <= 256 for n in names):
        raise PluginError(f"{str(path)!r}: label names must be short strings")
    return tuple(n.decode(errors="replace") if isinstance(n, bytes) else n for n in names)


def _transform(augment: bool, image_size: int) -> Any:
    """Per-item pipeline on a float (3, 32, 32) image: crop-with-padding + flip, then resize."""
    steps: list[Any] = []
    if augment:
        steps += [partial(random_translate, max_shift=PADDING), random_hflip]
    if image_size != NATIVE_SIZE:
        steps.append(partial(resize, size=image_size))
    if not steps:
        return None

    def apply(image: torch.Tensor) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return image

    return apply


def cifar10(
    split: str,
    *,
    root: str | None = None,
    image_size: int = NATIVE_SIZE,
    augment: bool = False,
    **options: Any,
) -> InMemoryImages:
    """CIFAR-10 `split` ("train", "test" or "val") from `root`, delivered at `image_size`.

    `root` is the extracted `cifar-10-batches-py` directory or its parent. With `augment`, each
    item is randomly cropped (padding 4, zero fill) and flipped; when `image_size` is not 32 the
    result is resized bicubically afterwards. No options are accepted.
    """
    split = normalize_split(NAME, split)
    image_size = check_image_size(NAME, image_size)
    check_options(NAME, options, OPTIONS)
    directory = batch_dir(root)
    images, labels = read_batches(directory, FILES[split])
    info = DatasetInfo(
        num_classes=len(CLASS_NAMES),
        image_size=image_size,
        channels=CHANNELS,
        mean=MEAN,
        std=STD,
        class_names=class_names(directory),
        fingerprint=fingerprint(NAME, split, image_size, images, labels),
    )
    return InMemoryImages(
        torch.from_numpy(images), torch.from_numpy(labels), info, _transform(augment, image_size)
    )


def synthetic_root(directory: str) -> str:
    """A tiny `cifar-10-batches-py` under `directory` (two random images per batch file), for
    `dmae plugins --check`: the real layout and file format, read back by `cifar10`."""
    batches = Path(directory) / DIRNAME
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in (*FILES["train"], *FILES["test"]):
        data = rng.integers(0, 256, (2, 3 * NATIVE_SIZE * NATIVE_SIZE), dtype=np.uint8)
        # protocol 4: what the safe unpickler reads (5 stores arrays through another global)
        (batches / name).write_bytes(pickle.dumps({"data": data, "labels": [0, 1]}, protocol=4))
    return directory


cifar10.synthetic_root = synthetic_root  # type: ignore[attr-defined]
