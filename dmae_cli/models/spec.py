"""A model's self-description (`ModelSpec`), stored in every checkpoint so that a model can be
rebuilt without the recipe that trained it.

A checkpoint keeps it as plain data under its "meta" key (checkpoints are loaded with
`weights_only=True`, so no class of ours is pickled). It is written by `ModelSpec.to_dict` and
read by `ModelSpec.from_dict` only: reading checks every field's type and bounds before any
model is built, so a damaged or hostile checkpoint is one `UserError` line naming the field, not
a 65536-pixel model or a traceback from deep inside timm. Checkpoints written before the spec
had a version (no `spec_version`) read as version 0, which has the same fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeGuard

from dmae_cli import __version__
from dmae_cli.api import DatasetInfo
from dmae_cli.config.fields import MAX_NOISE_LEVELS
from dmae_cli.config.recipe import Recipe
from dmae_cli.models.normalise import init_file, model_statistics
from dmae_cli.runtime.errors import UserError

SPEC_VERSION = 1
MAX_SIDE = 16384  # pixels, for a model's input and the data's native images
MAX_CHANNELS = 1024
MAX_CLASSES = 1_000_000
MAX_OPTION_INT = 65536  # any integer backbone option (a width, a depth, a head count)
# Sizes taken together, so that a description cannot ask for an absurd allocation:
MAX_TOKENS = 1 << 16  # patches of the model's grid (256 x 256)
MAX_IMAGE_VALUES = 1 << 26  # channels x side x side of one image (about 64M, 256 MB)
MAX_PARAMETERS = 3 * 10**10  # a ViT's weights as its options give them (ViT-22B: 2.2e10)
GLOBAL_POOLS = ("", "avg", "avgmax", "max", "token", "map")  # what timm's ViT accepts
# What any model needs; a classifier to certify also needs its sigma.
BUILD_FIELDS = (
    "backbone",
    "image_size",
    "patch_size",
    "input_size",
    "channels",
    "mean",
    "std",
    "num_classes",
)
CLASSIFIER_FIELDS = (*BUILD_FIELDS, "sigma")


@dataclass(frozen=True)
class DecoderSpec:
    """The DMAE decoder of a pre-training checkpoint."""

    embed_dim: int
    depth: int
    num_heads: int


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint's model is: the backbone and its shapes, the data it expects, and
    how it was trained. Optional fields are None when a checkpoint does not record them."""

    backbone: str
    image_size: int  # the model's input side; images are resized to it by the adapter
    patch_size: int
    input_size: int  # the data's native side, where noise is added
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    dataset: str | None = None
    data_fingerprint: str | None = None
    stage: str | None = None  # "pretrain", "finetune" or "denoiser"
    dmae_version: str | None = None
    spec_version: int = SPEC_VERSION
    # pre-training
    decoder: DecoderSpec | None = None
    norm_pix_loss: bool | None = None
    noise_levels: tuple[float, ...] | None = None  # the sigmas it was trained to remove
    # a denoiser tuned for a classifier (`dmae finetune --denoiser-for`): that file's sha256
    tuned_for: str | None = None
    # fine-tuning
    sigma: float | None = None
    global_pool: str | None = None  # None: "avg"
    head_batchnorm: bool | None = None
    linear_probe: bool | None = None
    test_fingerprint: str | None = None
    init: str | None = None  # where the fine-tuned weights started from

    # -- written ---------------------------------------------------------------------------
    @classmethod
    def for_pretrain(cls, recipe: Recipe, info: DatasetInfo) -> ModelSpec:
        """The DMAE that `recipe` pre-trains on data described by `info`."""
        p = recipe.pretrain
        decoder = DecoderSpec(p.decoder_embed_dim, p.decoder_depth, p.decoder_num_heads)
        trained = {"decoder": decoder, "norm_pix_loss": p.norm_pix_loss, "noise_levels": p.sigmas}
        return cls._from_recipe(recipe, info, stage="pretrain", **trained)

    @classmethod
    def for_finetune(
        cls, recipe: Recipe, info: DatasetInfo, test_info: DatasetInfo, sigma: float, init: str
    ) -> ModelSpec:
        """The classifier that `recipe` fine-tunes (or linearly probes) at `sigma`."""
        probe = recipe.finetune.linear_probe
        return cls._from_recipe(
            recipe,
            info,
            stage="finetune",
            sigma=float(sigma),
            global_pool="token" if probe else "avg",
            head_batchnorm=probe,
            linear_probe=probe,
            test_fingerprint=test_info.fingerprint,
            init=init,
        )

    @classmethod
    def _from_recipe(cls, recipe: Recipe, info: DatasetInfo, **stage: Any) -> ModelSpec:
        m = recipe.model
        init = stage.get("init") if stage["stage"] == "finetune" else recipe.pretrain.init
        mean, std = model_statistics(m.normalize, info, init_file(init))  # model.normalize
        return cls(
            dmae_version=__version__,
            backbone=m.backbone,
            backbone_options=dict(m.options),
            image_size=m.image_size,
            patch_size=m.patch_size,
            input_size=info.image_size,
            channels=info.channels,
            mean=mean,
            std=std,
            num_classes=info.num_classes,
            class_names=tuple(info.class_names),
            dataset=recipe.data.dataset,
            data_fingerprint=info.fingerprint,
            **stage,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint's "meta": lists, not tuples; unset fields left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, DecoderSpec):
                value = asdict(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    # -- read ------------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        meta: object,
        source: str = "model meta",
        *,
        require: Sequence[str] = BUILD_FIELDS,
        what: str = "checkpoint",
    ) -> ModelSpec:
        """A checkpoint's "meta", every field checked: one `UserError` line naming the first
        field that is missing, of the wrong type or out of bounds. Unknown keys are ignored."""
        if not isinstance(meta, Mapping):
            raise UserError(f"{source}: {what} meta is {type(meta).__name__}, not a mapping")
        absent = [name for name in require if meta.get(name) is None]
        if absent:
            raise UserError(f"{source}: {what} lacks {', '.join(absent)} in its meta")
        values: dict[str, Any] = {"spec_version": 0}  # written before the spec had a version
        for name, read in READERS.items():
            if meta.get(name) is not None:
                values[name] = read(meta[name], values, _Field(source, name, meta[name]))
        _check_sizes(values, meta, source)
        return cls(**values)


# -- reading one field ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Field:
    """A field being read, for the error line."""

    source: str
    name: str
    value: object

    def fail(self, expected: str) -> UserError:
        shown = repr(self.value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(
            f"{self.source}: checkpoint field meta.{self.name}: expected {expected}, got {shown}"
        )


Reader = Callable[[object, dict[str, Any], _Field], Any]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(low: int, high: int) -> Reader:
    def read(value: object, _: dict[str, Any], f: _Field) -> int:
        if not _is_int(value) or not low <= value <= high:
            raise f.fail(f"an integer from {low} to {high}")
        return int(value)

    return read


def _patch_size(value: object, seen: dict[str, Any], f: _Field) -> int:
    return _int(1, seen.get("image_size", MAX_SIDE))(value, seen, f)


def _text(value: object, _: dict[str, Any], f: _Field) -> str:
    if not isinstance(value, str):
        raise f.fail("a string")
    return value


def _name(value: object, _: dict[str, Any], f: _Field) -> str:
    if not isinstance(value, str) or not value.strip():
        raise f.fail("a non-empty name")
    return value


def _flag(value: object, _: dict[str, Any], f: _Field) -> bool:
    if not isinstance(value, bool):
        raise f.fail("true or false")
    return value


def _per_channel(positive: bool) -> Reader:
    def read(value: object, seen: dict[str, Any], f: _Field) -> tuple[float, ...]:
        kind = "positive numbers" if positive else "numbers"
        if not isinstance(value, (list, tuple)):
            raise f.fail(f"a list of finite {kind}")
        numbers = [float(v) for v in value if _is_number(v)]
        if len(numbers) != len(value) or (positive and not all(v > 0 for v in numbers)):
            raise f.fail(f"a list of finite {kind}")
        channels = seen.get("channels")
        if channels is not None and len(numbers) != channels:
            raise f.fail(f"{channels} value{'s' if channels != 1 else ''} (one per channel)")
        return tuple(numbers)

    return read


def _names(value: object, _: dict[str, Any], f: _Field) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise f.fail("a list of class names")
    return tuple(value)


def _options(value: object, _: dict[str, Any], f: _Field) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise f.fail("a mapping of backbone arguments")
    if not all(_plain_option(v) for v in value.values()):
        raise f.fail(f"plain values (numbers up to {MAX_OPTION_INT}, strings, lists)")
    return dict(value)


def _plain_option(value: object) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    if _is_int(value):
        return abs(value) <= MAX_OPTION_INT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain_option(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain_option(v) for k, v in value.items())
    return False


def _sigma(value: object, _: dict[str, Any], f: _Field) -> float:
    if not _is_number(value) or value < 0:
        raise f.fail("a finite number >= 0")
    return float(value)


def _noise_levels(value: object, _: dict[str, Any], f: _Field) -> tuple[float, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_NOISE_LEVELS:
        raise f.fail(f"a list of 1 to {MAX_NOISE_LEVELS} finite numbers >= 0")
    return tuple(_sigma(v, _, f) for v in value)


def _pool(value: object, _: dict[str, Any], f: _Field) -> str:
    if not isinstance(value, str) or value not in GLOBAL_POOLS:
        raise f.fail(f"one of {', '.join(repr(p) for p in GLOBAL_POOLS)}")
    return value


def _decoder(value: object, _: dict[str, Any], f: _Field) -> DecoderSpec:
    keys = ("embed_dim", "depth", "num_heads")
    if not isinstance(value, Mapping) or not all(
        _is_int(value.get(k)) and 1 <= value[k] <= MAX_OPTION_INT for k in keys
    ):
        raise f.fail(f"a mapping of {', '.join(keys)} (integers from 1 to {MAX_OPTION_INT})")
    return DecoderSpec(*(int(value[k]) for k in keys))


def _version(value: object, _: dict[str, Any], f: _Field) -> int:
    if not _is_int(value) or value < 0:
        raise f.fail("a version number")
    if value > SPEC_VERSION:
        raise f.fail(f"a spec version up to {SPEC_VERSION}: written by a newer dmae; upgrade dmae")
    return int(value)


# In reading order: a field's bounds may depend on those read before it.
READERS: dict[str, Reader] = {
    "spec_version": _version,
    "dmae_version": _text,
    "stage": _text,
    "backbone": _name,
    "backbone_options": _options,
    "image_size": _int(1, MAX_SIDE),
    "patch_size": _patch_size,
    "input_size": _int(1, MAX_SIDE),
    "channels": _int(1, MAX_CHANNELS),
    "mean": _per_channel(positive=False),
    "std": _per_channel(positive=True),
    "num_classes": _int(1, MAX_CLASSES),
    "class_names": _names,
    "dataset": _text,
    "data_fingerprint": _text,
    "decoder": _decoder,
    "norm_pix_loss": _flag,
    "noise_levels": _noise_levels,
    "tuned_for": _text,
    "sigma": _sigma,
    "global_pool": _pool,
    "head_batchnorm": _flag,
    "linear_probe": _flag,
    "test_fingerprint": _text,
    "init": _text,
}


def _check_sizes(values: dict[str, Any], meta: Mapping[str, Any], source: str) -> None:
    """Fields each within bounds can still describe an absurd model together: a 16384-pixel
    input in 1-pixel patches, 1024 channels of 16384 x 16384 pixels, a 65536-wide, 65536-deep
    ViT. Refused before anything is allocated."""

    def fail(name: str, expected: str) -> UserError:
        return _Field(source, name, meta.get(name)).fail(expected)

    channels = values.get("channels", 1)
    for name in ("image_size", "input_size"):
        side = values.get(name)
        if side is not None and channels * side * side > MAX_IMAGE_VALUES:
            raise fail(name, f"images of at most {MAX_IMAGE_VALUES} values ({channels} channels)")
    side, patch = values.get("image_size"), values.get("patch_size")
    tokens = (side // patch) ** 2 if side is not None and patch is not None else 1
    if tokens > MAX_TOKENS:
        raise fail("patch_size", f"at most {MAX_TOKENS} patches, not {tokens}")
    if _parameters(values, tokens) > MAX_PARAMETERS:
        raise fail("backbone_options", f"a model of at most {MAX_PARAMETERS:.0e} parameters")


def _parameters(values: dict[str, Any], tokens: int) -> float:
    """A lower bound of a ViT's size from the options that describe one (absent ones: 1)."""
    options = values.get("backbone_options", {})

    def option(name: str, default: float) -> float:
        value = options.get(name)
        return max(float(value), 0.0) if _is_number(value) else default

    width, depth, mlp = option("embed_dim", 1), option("depth", 1), option("mlp_ratio", 4)
    patch, channels = values.get("patch_size", 1), values.get("channels", 1)
    encoder = depth * (4 + 2 * mlp) * width * width
    edges = (tokens + values.get("num_classes", 1) + channels * patch * patch) * width
    decoder = values.get("decoder")
    if decoder is not None:
        encoder += decoder.depth * 12 * decoder.embed_dim * decoder.embed_dim
    return encoder + edges


def recorded(meta: object, name: str) -> Any:
    """One field of a checkpoint's meta if it is there and valid, else None: for choices made
    before the whole description is read (which recipe to certify with, which stage it is)."""
    if not isinstance(meta, Mapping) or meta.get(name) is None or name not in READERS:
        return None
    try:
        return READERS[name](meta[name], {}, _Field("", name, meta[name]))
    except UserError:
        return None
