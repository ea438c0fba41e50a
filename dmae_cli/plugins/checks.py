"""What a dataset plugin delivers, checked on real output before any stage relies on it.

A factory's signature says little about what its dataset returns. An image in HWC order, in
[0, 255], of another size than its `DatasetInfo` claims, or a label past `num_classes`, would
otherwise surface deep inside a model as a shape error hundreds of lines long. So each stage
looks at the first item of every dataset it builds (and `dmae plugins --check` does too), and
what is wrong is said in one line, in the dataset's own terms.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from dmae_cli.api import DatasetInfo

_INTEGERS = (int,)  # bool is an int too, and refused below: True is no class index


def info_problems(dataset: Any) -> list[str]:
    """What is wrong with `dataset.info`: missing, not a `DatasetInfo`, or inconsistent."""
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        got = "no .info" if info is None else f".info of type {type(info).__name__}"
        return [f"returned {type(dataset).__name__} with {got}; expected a DatasetInfo"]
    problems = []
    for field in ("num_classes", "image_size", "channels"):
        value = getattr(info, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"DatasetInfo.{field} is {value!r}; expected a positive integer")
    if problems:
        return problems
    for field in ("mean", "std"):
        values = getattr(info, field)
        if not isinstance(values, tuple | list) or len(values) != info.channels:
            problems.append(f"DatasetInfo.{field} is {values!r}; expected {info.channels} numbers")
        elif not all(_finite(v) and (field == "mean" or v > 0) for v in values):
            what = "finite numbers" if field == "mean" else "positive finite numbers"
            problems.append(f"DatasetInfo.{field} is {values!r}; expected {what}")
    return problems


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def item_problems(info: DatasetInfo, item: Any) -> list[str]:
    """What is wrong with one `(image, label)` item of a dataset described by `info`."""
    if not isinstance(item, tuple | list) or len(item) != 2:
        return [f"an item is {_kind(item)}; expected a pair (image, label)"]
    image, label = item
    expected = (info.channels, info.image_size, info.image_size)
    if not isinstance(image, torch.Tensor):
        return [f"an image is {_kind(image)}; expected a float tensor of shape {expected}"]
    problems = []
    if not image.is_floating_point():
        problems.append(f"an image has dtype {image.dtype}; expected a floating dtype")
    elif tuple(image.shape) != expected:
        problems.append(
            f"an image has shape {tuple(image.shape)}; expected {expected} "
            f"(channels, image_size, image_size of its DatasetInfo)"
        )
    elif image.numel() and not bool(torch.isfinite(image).all()):
        problems.append("an image has values that are not finite; expected [0, 1]")
    elif image.numel() and (image.min() < 0 or image.max() > 1):
        low, high = float(image.min()), float(image.max())
        problems.append(f"an image has values in [{low:g}, {high:g}]; expected [0, 1]")
    problems.extend(_label_problems(info, label))
    return problems


def _label_problems(info: DatasetInfo, label: Any) -> list[str]:
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()  # a 0-d integer tensor is what default collation makes of an int
    elif hasattr(label, "dtype") and hasattr(label, "item") and getattr(label, "ndim", 1) == 0:
        label = label.item()  # a numpy integer scalar
    if isinstance(label, bool) or not isinstance(label, _INTEGERS):
        return [f"a label is {_kind(label)}; expected an int"]
    if not 0 <= label < info.num_classes:
        return [f"a label is {label}; expected 0 <= label < num_classes ({info.num_classes})"]
    return []


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def first_item(dataset: Any) -> Any:
    """Item 0 of a map-style dataset, or the first item a stream yields (the stream is closed
    again, so no reader is left open). The random number generators are left as they were:
    an augmenting dataset draws from them, and a check must not change what a run trains on."""
    with _random_state_kept():
        return _first(dataset)


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Restore torch's CPU generator, Python's and NumPy's global ones on the way out."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _first(dataset: Any) -> Any:
    if not isinstance(dataset, IterableDataset):
        return dataset[0]
    stream: Iterator[Any] = iter(dataset)
    try:
        return next(stream)
    except StopIteration:
        return None
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
