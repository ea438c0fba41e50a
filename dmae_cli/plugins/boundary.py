"""The plugin boundary: every call into a plugin's code happens inside `contained`.

Whatever a plugin raises there becomes one line naming the plugin: its kind, its name and the
distribution that provides it, so a user knows whose code failed and what to fix.

- A mistake the user can fix, reported by the plugin as `PluginError` (or `ValueError`, the
  type plugins used before `PluginError`):
  `dataset 'idx' from acme-dmae-plugins: data.root nowhere is not a directory`.
- Options the factory cannot take (arguments that do not bind; for a backbone also what timm
  asserts against): `backbone 'vit_micro' from acme rejected its options {...}: ...`.
- Anything else is a bug in the plugin; still one line, naming the exception's type:
  `dataset 'idx' from acme failed: KeyError: 'x' (a bug in the plugin; ...)`.

The CLI prints the line and exits with code 2; `DMAE_DEBUG=1` shows the plugin's traceback
(the original exception is the line's `__cause__`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch.nn as nn

from dmae_cli.plugins import registry
from dmae_cli.plugins.checks import first_item, info_problems, item_problems
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import Interrupted

DEBUG_HINT = "a bug in the plugin; DMAE_DEBUG=1 shows its traceback"


class PluginFailure(UserError):
    """A call into a plugin failed; the message already names the plugin."""


def label(entry: registry.PluginEntry) -> str:
    """`dataset 'idx' from acme-dmae-plugins`: the plugin, for the start of a message."""
    return f"{entry.kind} '{entry.name}' from {entry.distribution}"


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a plugin's message may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def contained(
    entry: registry.PluginEntry,
    options: Mapping[str, Any] | None = None,
    rejects: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Run plugin code; what it raises becomes a `PluginFailure` naming `entry`. Exceptions of
    the types in `rejects` mean the plugin refused `options`."""
    try:
        yield
    except (PluginFailure, Interrupted):
        raise  # already named (a nested boundary), or the user stopping the run
    except rejects as exc:
        why = f"rejected its options {dict(options or {})}: {one_line(exc)}"
        raise PluginFailure(f"{label(entry)} {why}") from exc
    except (UserError, ValueError) as exc:  # PluginError is both
        raise PluginFailure(f"{label(entry)}: {one_line(exc)}") from exc
    except Exception as exc:  # a plugin's bug must not take dmae down with a foreign traceback
        raise PluginFailure(
            f"{label(entry)} failed: {type(exc).__name__}: {one_line(exc)} ({DEBUG_HINT})"
        ) from exc


def check_binds(
    entry: registry.PluginEntry, factory: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    """One line when the factory's signature cannot take these arguments, before calling it."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as exc:
        raise PluginFailure(f"{label(entry)} rejected its options {dict(kwargs)}: {exc}") from exc
    except ValueError:  # no signature to read (a builtin): the call itself will tell
        pass


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | None,
    image_size: int,
    augment: bool,
    options: Mapping[str, Any],
) -> Any:
    """The dataset plugin `name` built for `split`, its `DatasetInfo` and first item checked."""
    entry = registry.datasets.entry(name)
    factory = registry.datasets.get(name)
    kwargs = dict(root=root, image_size=image_size, augment=augment, **options)
    check_binds(entry, factory, (split,), kwargs)
    with contained(entry):
        dataset = factory(split, **kwargs)
    check_dataset(entry, dataset, split)
    return dataset


def check_dataset(entry: registry.PluginEntry, dataset: Any, split: str) -> None:
    """One line naming the plugin when `dataset` is empty or its info or first item is wrong."""
    problems = info_problems(dataset)
    if not problems:
        with contained(entry):
            size = len(dataset) if hasattr(dataset, "__len__") else None
            item = first_item(dataset) if size != 0 else None
        if size == 0 or item is None:
            problems = [f"split '{split}' is empty"]
        else:
            problems = item_problems(dataset.info, item)
    if problems:
        raise PluginFailure(f"{label(entry)}: {'; '.join(problems)}")


def build_backbone(name: str, **arguments: Any) -> nn.Module:
    """The backbone plugin `name` called with `arguments` (img_size, patch_size, in_chans and
    the overrides); timm's ViT asserts on shapes it cannot build, so those are refused options."""
    entry = registry.backbones.entry(name)
    factory = registry.backbones.get(name)
    check_binds(entry, factory, (), arguments)
    with contained(entry, arguments, rejects=(TypeError, AssertionError)):
        module = factory(**arguments)
    missing = [part for part in ("patch_embed", "blocks") if not hasattr(module, part)]
    if not isinstance(module, nn.Module) or missing:
        raise PluginFailure(
            f"{label(entry)} returned {type(module).__name__}, not a ViT module "
            f"(with patch_embed, cls_token, pos_embed, blocks and norm)"
        )
    return module
