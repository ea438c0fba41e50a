"""Which mean and std a model normalises its inputs with (`model.normalize`), and a warning
when they are not those its starting weights were trained under.

Weights learn the statistics of their inputs: timm's augreg ViTs were trained on inputs
normalised with 0.5, the official DMAE/MAE ones with ImageNet's mean and std, a dmae run with
its data set's (recorded in its checkpoint's `ModelSpec`). Fine-tuning or continuing to
pre-train them under other statistics shifts every input, silently. The recipe chooses:
  data        the data set's statistics (the default);
  checkpoint  those the init checkpoint records (a dmae checkpoint; official and timm files
              record none: choose imagenet or inception for them);
  imagenet    ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), as the official code;
  inception   0.5 / 0.5, as timm's augreg and inception-style ViTs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

from dmae_cli.api import DatasetInfo
from dmae_cli.runtime import checkpoint, ui
from dmae_cli.runtime.errors import UserError

Stats = tuple[tuple[float, ...], tuple[float, ...]]
NAMED: dict[str, Stats] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def recorded_statistics(path: str | Path) -> Stats | None:
    """The mean and std a dmae checkpoint's model normalised with; None for a file that does
    not record them (an official DMAE/MAE or timm checkpoint)."""
    path = Path(path)
    stat = path.stat()
    return _recorded(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)  # each sigma's classifier asks; a ViT-B file is 400 MB
def _recorded(path: str, mtime_ns: int, size: int) -> Stats | None:
    meta = checkpoint.load_checkpoint(path).get("meta")
    if not isinstance(meta, dict):
        return None
    mean, std = _numbers(meta.get("mean")), _numbers(meta.get("std"))
    if mean is None or std is None or len(mean) != len(std) or min(std) <= 0:
        return None  # a damaged description is refused where the model is rebuilt from it
    return mean, std


def model_statistics(choice: str, info: DatasetInfo, init: str | Path | None) -> Stats:
    """The statistics `model.normalize: choice` gives a model of data `info` whose weights
    start from the checkpoint `init` (None: random). When they are not the ones the checkpoint
    records, or it records none, one line says so once its weights have loaded (`announce`):
    a checkpoint that fails to load gets its one error line alone."""
    own = recorded_statistics(init) if init is not None else None
    if choice == "data":
        chosen = (tuple(info.mean), tuple(info.std))
    elif choice == "checkpoint":
        if own is None:
            what = f"{init} records no input statistics" if init else "there is no init checkpoint"
            raise UserError(
                f"model.normalize: checkpoint, but {what} (only dmae checkpoints record them); "
                f"choose model.normalize: imagenet (official DMAE/MAE weights), inception "
                f"(timm's augreg ViTs, 0.5) or data"
            )
        chosen = own
    else:
        chosen = NAMED[choice]
    if len(chosen[0]) != info.channels:
        raise UserError(
            f"model.normalize: {choice} gives {len(chosen[0])} channel statistics, the data "
            f"has {info.channels} channels"
        )
    if own is not None and not _same(own, chosen):
        _later(
            init,
            f"warning: {init} was trained on inputs normalised with mean {_show(own[0])}, std "
            f"{_show(own[1])}; this model normalises with {_show(chosen[0])}, "
            f"{_show(chosen[1])} (model.normalize: {choice}; 'checkpoint' keeps the checkpoint's)",
        )
    elif own is None and init is not None and choice == "data":
        _later(
            init,
            f"note: {init} records no input statistics; the model normalises with the data "
            f"set's, mean {_show(chosen[0])}, std {_show(chosen[1])}: weights trained under "
            f"others want model.normalize: imagenet (official DMAE/MAE) or inception (timm's "
            f"augreg ViTs, 0.5)",
        )
    return chosen


_SAID: set[str] = set()  # every sigma's classifier asks again: one line per run is enough
_PENDING: dict[str, str] = {}  # checkpoint -> what to say once its weights have loaded


def _later(init: str | Path, line: str) -> None:
    _PENDING[str(Path(init).resolve())] = line


def announce(init: str | Path) -> None:
    """Say what `model_statistics` found about the checkpoint `init`, now that it loaded."""
    line = _PENDING.pop(str(Path(init).resolve()), None)
    if line is not None and line not in _SAID:
        _SAID.add(line)
        ui.info(line)


def _numbers(value: object) -> tuple[float, ...] | None:
    if not isinstance(value, list | tuple) or not value:
        return None
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    numbers = tuple(float(v) for v in value) if ok else ()
    return numbers if numbers and all(math.isfinite(v) for v in numbers) else None


def init_file(label: str | None) -> Path | None:
    """The checkpoint file behind a recipe's init value (a file, or a pretraining run
    directory's last.pth); None when there is none to read (random, or not there yet)."""
    if label is None or label.strip().lower() in ("none", "random"):
        return None
    path = Path(label).expanduser()
    path = path / "last.pth" if path.is_dir() else path
    return path if path.is_file() else None


def _same(a: Stats, b: Stats) -> bool:
    return all(
        len(x) == len(y)
        and all(math.isclose(u, v, abs_tol=1e-4) for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def _show(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
