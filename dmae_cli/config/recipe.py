"""Recipes: YAML files turned into typed, frozen, validated config objects.

Precedence is defaults < recipe file < `--set a.b=c` overrides. Values of `--set` are parsed
with YAML's scalar rules (`--set finetune.sigma=[0.25,0.5]` is a list). Every mistake (bad YAML,
unknown key, wrong type, out-of-range value) raises `RecipeError` naming the file, the key path
and what was expected. The resolved recipe is written next to every run's outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dmae_cli.runtime.errors import UserError


class RecipeError(UserError):
    """A recipe (or an override) that cannot become a valid config."""


# -- constraints, attached to fields as metadata -----------------------------------------------
Check = Callable[[Any], bool]


def _check(test: Check, expected: str) -> dict[str, Any]:
    return {"check": test, "expected": expected}


def positive() -> dict[str, Any]:
    return _check(lambda v: v > 0, "a number > 0")


def non_negative() -> dict[str, Any]:
    return _check(lambda v: v >= 0, "a number >= 0")


def all_positive() -> dict[str, Any]:
    return _check(lambda v: len(v) > 0 and all(x > 0 for x in v), "one or more numbers > 0")


def all_non_negative() -> dict[str, Any]:
    return _check(lambda v: len(v) > 0 and all(x >= 0 for x in v), "one or more numbers >= 0")


def half_open(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo <= v < hi, f"a number in [{lo}, {hi})")


def open_interval(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo < v < hi, f"a number in ({lo}, {hi})")


def closed(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo <= v <= hi, f"a number in [{lo}, {hi}]")


def batch_size_setting() -> dict[str, Any]:
    """An integer >= 1, or auto (0 also): the field is typed Any, so its type is checked here."""
    return _check(
        lambda v: v == "auto" or (type(v) is int and v >= 0),
        "an integer >= 1, or auto (0 also means auto)",
    )


def parallel_setting() -> dict[str, Any]:
    """An integer >= 1, or auto: the field is typed Any, so its type is checked here."""
    return _check(lambda v: v == "auto" or (type(v) is int and v >= 1), "an integer >= 1, or auto")


def optional(meta: dict[str, Any]) -> dict[str, Any]:
    return _check(lambda v: v is None or meta["check"](v), f"null or {meta['expected']}")


# -- the config objects -------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # a name in the `dmae.datasets` registry
    root: str | None = None  # local path of the data; never downloaded
    image_size: int = field(default=16, metadata=positive())  # native side: noise is added here
    options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset plugin
    num_workers: int = field(default=0, metadata=non_negative())
    pin_memory: bool = False
    persistent_workers: bool = False


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vit_tiny"  # a name in the `dmae.backbones` registry
    image_size: int = field(default=16, metadata=positive())  # model input; resized if it differs
    patch_size: int = field(default=4, metadata=positive())
    options: dict[str, Any] = field(default_factory=dict)  # overrides for the backbone factory


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings shared by pre-training and fine-tuning."""

    epochs: int = field(default=100, metadata=positive())
    batch_size: int = field(default=64, metadata=positive())  # per device
    accum_iter: int = field(default=1, metadata=positive())
    blr: float = field(default=1.5e-4, metadata=positive())  # lr = blr * effective batch / 256
    lr: float | None = field(default=None, metadata=optional(positive()))  # absolute, wins over blr
    min_lr: float = field(default=0.0, metadata=non_negative())
    warmup_epochs: float = field(default=40.0, metadata=non_negative())
    weight_decay: float = field(default=0.05, metadata=non_negative())
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = field(default=None, metadata=optional(positive()))
    save_every: int = field(default=20, metadata=positive())  # epochs between kept checkpoints


@dataclass(frozen=True)
class PretrainConfig(OptimConfig):
    sigma: float = field(default=0.25, metadata=positive())
    mask_ratio: float = field(default=0.75, metadata=half_open(0.0, 1.0))
    norm_pix_loss: bool = True
    decoder_embed_dim: int = field(default=512, metadata=positive())
    decoder_depth: int = field(default=8, metadata=positive())
    decoder_num_heads: int = field(default=16, metadata=positive())
    init: str | None = None  # a DMAE/MAE checkpoint to continue from (e.g. CIFAR-10 after ImageNet)
    reconstructions: int = field(default=8, metadata=non_negative())  # rows in reconstructions.png


@dataclass(frozen=True)
class ProbeConfig(OptimConfig):
    """Linear probing (`--linear-probe`, MAE's recipe): LARS on the head of a frozen encoder."""

    epochs: int = field(default=90, metadata=positive())
    batch_size: int = field(default=512, metadata=positive())
    blr: float = field(default=0.1, metadata=positive())
    min_lr: float = field(default=0.0, metadata=non_negative())
    warmup_epochs: float = field(default=10.0, metadata=non_negative())
    weight_decay: float = field(default=0.0, metadata=non_negative())
    momentum: float = field(default=0.9, metadata=half_open(0.0, 1.0))  # LARS momentum


@dataclass(frozen=True)
class FinetuneConfig(OptimConfig):
    sigma: tuple[float, ...] = field(default=(0.25,), metadata=all_positive())
    blr: float = field(default=5e-4, metadata=positive())
    min_lr: float = field(default=1e-6, metadata=non_negative())
    warmup_epochs: float = field(default=5.0, metadata=non_negative())
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = field(default=0.65, metadata=closed(0.0, 1.0))
    drop_path: float = field(default=0.1, metadata=half_open(0.0, 1.0))
    consistency: bool = True  # Jeong & Shin 2020; off means plain Gaussian augmentation ("RS")
    num_noise: int = field(default=2, metadata=positive())  # m noisy copies per image
    lbd: float | None = field(default=None, metadata=optional(non_negative()))  # None: by sigma
    eta: float | None = field(default=None, metadata=optional(non_negative()))  # None: by sigma
    label_smoothing: float = field(default=0.0, metadata=half_open(0.0, 1.0))
    mixup: float = field(default=0.0, metadata=non_negative())
    cutmix: float = field(default=0.0, metadata=non_negative())
    auto_augment: str | None = None  # timm RandAugment string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = field(default=0.0, metadata=closed(0.0, 1.0))  # random erasing
    # A checkpoint path (ours, official DMAE/MAE, timm, safetensors); null: this recipe's
    # pretraining run (runs/<name>/pretrain/last.pth); "none": random initialisation.
    init: str | None = None
    linear_probe: bool = False  # frozen encoder; trains with `probe` instead of the above
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval_every: int = field(default=1, metadata=positive())  # epochs between evaluations
    eval_noise_copies: int = field(default=1, metadata=positive())  # noise draws per test image


@dataclass(frozen=True)
class CertifyConfig:
    sigma: tuple[float, ...] = field(default=(0.25,), metadata=all_positive())
    certifier: str = "cohen"  # a name in the `dmae.certifiers` registry
    options: dict[str, Any] = field(default_factory=dict)  # passed to the certifier factory
    checkpoint: str | None = None  # None: runs/<name>/finetune/sigma-<s>/best.pth (or last.pth)
    n0: int = field(default=100, metadata=positive())  # selection samples
    n: int = field(default=100_000, metadata=positive())  # estimation samples (the budget)
    alpha: float = field(default=0.001, metadata=open_interval(0.0, 1.0))
    # Noisy copies drawn and classified per batch: an integer >= 1, or auto (also 0): on CUDA
    # the largest power of two that fits in free memory, up to 4096; on CPU 256.
    batch_size: Any = field(default=1000, metadata=batch_size_setting())
    split: str = "test"
    start: int = field(default=0, metadata=non_negative())  # first example index
    end: int | None = field(default=None, metadata=optional(positive()))  # exclusive; None: all
    interval: int = field(default=1, metadata=positive())  # every k-th example (paper: 50)
    max_examples: int | None = field(default=None, metadata=optional(positive()))
    skip_wrong: bool = False  # the official evaluation's shortcut
    radii: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0),
        metadata=all_non_negative(),
    )
    compile: bool = False  # torch.compile the classifier (needs a C++ compiler, or Triton on CUDA)
    # Examples certified side by side, their draws packed into shared forward passes (a
    # sequential certifier's small looks fill a batch together); rows are written per group.
    together: int = field(default=8, metadata=positive())
    # Forward passes run at once, on a CPU only, each on one core: auto is one per core torch
    # uses there (a small model runs 1.4-1.9x faster so than as one pass spread over every
    # core), 1 on CUDA and with compile.
    parallel: Any = field(default="auto", metadata=parallel_setting())


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    # auto: bf16 autocast on CUDA; on a CPU fp32 for training, and for certification bf16 when the
    # CPU has native bf16 (AVX512-BF16 or AMX), else fp32 (see dmae_cli/precision.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.runs_dir) / self.name / stage


def sigma_name(sigma: float) -> str:
    """The directory/file stem for one noise level: 0.25 -> 'sigma-0.25', 1 -> 'sigma-1.0'."""
    return f"sigma-{float(sigma)!r}"


# -- loading ------------------------------------------------------------------------------------
def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or start from defaults when `path` is None) and apply `--set` items."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item, source)
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    return _build(Recipe, raw, source, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top level")
    return data


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. pretrain.epochs=10")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"--set {item!r}: the value is not valid YAML") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, source: str, path: str) -> Any:
    """Turn a mapping into dataclass `cls`, checking keys, types and ranges on the way."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {path or 'top level'}: expected a mapping, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if not isinstance(key, str) or key not in fields:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = (
                f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            )
            raise RecipeError(f"{source}: unknown key '{where}'{hint}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key_path = f"{path}.{name}" if path else name
        value = _convert(hints[name], value, source, key_path)
        meta = fields[name].metadata
        if "check" in meta and value is not None and not meta["check"](value):
            raise RecipeError(
                f"{source}: {key_path}: expected {meta['expected']}, got {_show(value)}"
            )
        if "check" in meta and value is None and not meta["check"](value):
            raise RecipeError(f"{source}: {key_path}: expected {meta['expected']}, got null")
        values[name] = value
    return cls(**values)


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> RecipeError:
        return RecipeError(f"{source}: {path}: expected {expected}, got {_show(value)}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, source, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, source, path)
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(map(str, args)))
        return value
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(
            _convert(a, v, source, f"{path}[{i}]")
            for i, (a, v) in enumerate(zip(args, items, strict=True))
        )
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_like_number(value):
            # YAML 1.1 reads 4e-3 as a string; only 4.0e-3 is a float.
            raise fail("a number (in YAML write exponents with a decimal point, e.g. 4.0e-3)")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        if not math.isfinite(value):  # .nan or .inf would only fail later, deep in training
            raise fail("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if tp is Any:
        return value
    raise TypeError(
        f"recipe field {path} has an unsupported type {tp!r}"
    )  # our bug, not the user's


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- saving -------------------------------------------------------------------------------------
def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain, YAML-safe dict of the resolved recipe (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
