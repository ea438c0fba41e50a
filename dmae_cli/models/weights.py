"""Checkpoint weights into a model, whatever layout they come in: one path, `filter_state_dict`.

The layouts read:
  - dmae's own checkpoints: a DMAE keeps its ViT encoder under `encoder.` and the decoder at the
    top level under MAE's names; a fine-tuned `Classifier` keeps its ViT under `vit.` and the
    input adapter's buffers under `adapter.`;
  - official DMAE/MAE pre-training checkpoints, `{'model': state_dict, ...}`: the encoder under
    timm's `VisionTransformer` names, the decoder as `decoder_*` and `mask_token`;
  - official fine-tuned classifiers and timm state dicts: timm's names (`fc_norm.*`, `head.*`);
  - `.safetensors` files of any of these (`checkpoint.load_checkpoint` reads them).
Wrappers (`{'model': sd}`, `{'state_dict': sd}`, `{'module': sd}`) and a DDP `module.` prefix
are removed first; entries that are not tensors are ignored.

`filter_state_dict(state, model)` brings a checkpoint to `model`'s own layout, as timm's
`checkpoint_filter_fn` does for timm's models. The model is recognised by its own keys:
  - a bare timm ViT (a classifier's `vit`, initialised for fine-tuning) takes the encoder of any
    layout: decoder tensors are skipped, position embeddings are resampled (bicubic) when the
    patch grid differs and moved to the model's prefix tokens (cls, registers, none) when those
    differ (`positions.convert_pos_embed`), and a head of another class count is dropped and
    trained anew, as MAE does;
  - a DMAE (pre-training from a checkpoint) takes its own layout and the official one, without
    the adapter's statistics (those of the data); its fixed position tables are the
    checkpoint's when their shapes agree (the weights were trained with them), else the
    model's own sin-cos tables;
  - a `Classifier` (certifying) takes its own layout as it is: it must fit exactly.
The loaders then check the fit: anything that cannot fit the model (another width, depth, patch
size or number of channels) is one `UserError` line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.models import normalise
from dmae_cli.models.positions import (
    Prefix,
    convert_pos_embed,
    prefix_in,
    prefix_of,
    resize_pos_embed,  # noqa: F401  (callers import it from here)
)
from dmae_cli.runtime import checkpoint, ui
from dmae_cli.runtime.errors import UserError

DECODER_PREFIXES = ("decoder_", "mask_token")
HEAD_KEYS = ("head.weight", "head.bias")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# -- one path from any layout to the model's -------------------------------------------------
@dataclass(frozen=True)
class Target:
    """How one kind of model reads checkpoints."""

    prefix: str  # where the model keeps its timm ViT's keys
    reads: tuple[str, ...]  # the prefixes of dmae checkpoints whose ViT it takes
    initialise: bool  # a bare ViT: decoder and other tensors skipped, pos_embed and head fitted
    recompute: bool  # leave out what the model computes: position embeddings, adapter buffers


VIT = Target("", ("encoder.", "vit."), initialise=True, recompute=False)
DMAE_TARGET = Target("encoder.", ("encoder.",), initialise=False, recompute=True)
CLASSIFIER_TARGET = Target("vit.", ("vit.",), initialise=False, recompute=False)


def target_of(model: nn.Module) -> Target:
    """A DMAE, a `Classifier` or a bare timm ViT, by the model's own keys."""
    keys = list(model.state_dict())
    for target in (DMAE_TARGET, CLASSIFIER_TARGET):
        if any(k.startswith(target.prefix) for k in keys):
            return target
    return VIT


@dataclass
class Filtered:
    """A checkpoint's tensors in a model's layout, and what was changed on the way."""

    weights: dict[str, torch.Tensor]
    skipped_decoder: int = 0
    dropped_head: bool = False
    resampled: tuple[tuple[int, int], tuple[int, int]] | None = None  # old grid, new grid
    prefix: tuple[Prefix, Prefix] | None = None  # the checkpoint's prefix tokens, the model's


def unwrap(state: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: under 'model', 'state_dict' or 'module', or the dict itself,
    without a DDP `module.` prefix."""
    if "model" in state and not isinstance(state["model"], dict):
        raise UserError(f"{source}: not a DMAE/MAE checkpoint (its 'model' is not a state dict)")
    for key in ("model", "state_dict", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    weights = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    problem = unusable_tensor(weights)
    if problem is not None:
        raise UserError(f"{source}: {problem}; a checkpoint holds dense real-valued weights")
    return weights


def unusable_tensor(weights: Mapping[str, Any]) -> str | None:
    """The first tensor no model can load (a meta or sparse tensor, complex numbers), in words;
    torch would stop on it with a multi-line report, or drop the imaginary parts."""
    for key, value in weights.items():
        if not torch.is_tensor(value):
            continue
        if value.is_meta:
            return f"tensor {key} is a meta tensor (a shape without values)"
        if value.layout != torch.strided:
            return f"tensor {key} is a {str(value.layout).removeprefix('torch.')} tensor"
        if value.is_complex():
            return f"tensor {key} holds complex numbers"
    return None


def roles(
    weights: Mapping[str, torch.Tensor], reads: Iterable[str]
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(role, name, tensor) in the checkpoint's order; role is "encoder" (name in timm's ViT
    layout), "decoder" (MAE's names) or "other" (e.g. the adapter of a dmae model)."""
    prefix = next((p for p in reads if any(k.startswith(p) for k in weights)), "")
    for key, value in weights.items():
        if prefix and key.startswith(prefix):
            name = key.removeprefix(prefix)
            yield ("decoder" if name.startswith(DECODER_PREFIXES) else "encoder"), name, value
        elif key.startswith(DECODER_PREFIXES):
            yield "decoder", key, value
        else:
            yield ("other" if prefix else "encoder"), key, value


def filter_state_dict(state: Mapping[str, Any], model: nn.Module, source: str) -> Filtered:
    """The tensors of checkpoint `state` in `model`'s layout (see the module's description)."""
    target = target_of(model)
    placed = list(roles(unwrap(state, source), target.reads))
    if target.initialise:
        encoder = {name: value for role, name, value in placed if role == "encoder"}
        out = Filtered(encoder, skipped_decoder=sum(role == "decoder" for role, _, _ in placed))
        _fit_pos_embed(out, model, source)
        _fit_head(out, model)
        return out
    weights = {
        (target.prefix + name if role == "encoder" else name): value for role, name, value in placed
    }
    if target.recompute:
        own = model.state_dict()
        weights = {k: v for k, v in weights.items() if not _recomputed(k, v, own)}
    return Filtered(weights)


def _recomputed(key: str, value: torch.Tensor, own: Mapping[str, torch.Tensor]) -> bool:
    """What a DMAE makes itself rather than takes: the adapter's buffers (the data's
    statistics), fixed position tables of another shape than its own, and register tokens of
    another count (new ones are trained)."""
    if key.startswith("adapter."):
        return True
    if key.endswith(("pos_embed", "reg_token")):
        return key not in own or tuple(value.shape) != tuple(own[key].shape)
    return False


def _fit_pos_embed(out: Filtered, vit: nn.Module, source: str) -> None:
    own = vit.state_dict()
    pos = out.weights.get("pos_embed")
    if pos is None or "pos_embed" not in own:
        return
    target = prefix_of(vit)
    grid = tuple(vit.patch_embed.grid_size)
    tokens = Prefix("cls_token" in out.weights, _registers(out.weights), True).tokens
    if not _resamplable(pos, own["pos_embed"], tokens, source):
        return  # another width: `_check_fits` names it, with the other tensors of that width
    found = prefix_in(out.weights, pos.shape[1])
    if found is None:
        raise UserError(
            f"{source}: cannot use its pos_embed of shape {tuple(pos.shape)}: its rows form no "
            f"square grid of patches, with or without a row for each of its {tokens} prefix "
            f"tokens"
        )
    old = math.isqrt(pos.shape[1] - found.rows)
    if found == target and (old, old) == grid:
        return
    convert_pos_embed(out.weights, found, target, grid)
    if (old, old) != grid:
        out.resampled = ((old, old), grid)
    if found != target:
        out.prefix = (found, target)


def _registers(weights: Mapping[str, torch.Tensor]) -> int:
    registers = weights.get("reg_token")
    return int(registers.shape[1]) if registers is not None and registers.dim() == 3 else 0


def _resamplable(pos: torch.Tensor, own: torch.Tensor, prefix: int, source: str) -> bool:
    """Only a (1, prefix + h*w, width) float tensor of the model's width is resampled; a tensor
    of another kind is one line before a resampling allocates from its shape."""
    expected = f"expected (1, {prefix} + a square number of patches, {own.shape[-1]}) floats"
    if pos.dim() != 3 or pos.shape[0] != 1 or not pos.is_floating_point():
        raise UserError(
            f"{source}: cannot use its pos_embed of shape {tuple(pos.shape)} and type "
            f"{str(pos.dtype).removeprefix('torch.')}: {expected}, as the model's "
            f"{tuple(own.shape)}"
        )
    if pos.shape[1] <= prefix:
        raise UserError(
            f"{source}: cannot use its pos_embed of shape {tuple(pos.shape)}: {expected}, as "
            f"the model's {tuple(own.shape)}"
        )
    return pos.shape[-1] == own.shape[-1]


def _fit_head(out: Filtered, vit: nn.Module) -> None:
    own = vit.state_dict()
    heads = [k for k in HEAD_KEYS if k in out.weights and k in own]
    if any(out.weights[k].shape != own[k].shape for k in heads):
        for k in heads:
            del out.weights[k]
        out.dropped_head = True


# -- initialising a ViT encoder ---------------------------------------------------------------
@dataclass
class LoadReport:
    """What `load_encoder` did, for the log line and for tests."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_decoder: int = 0
    dropped_head: bool = False
    resampled: tuple[tuple[int, int], tuple[int, int]] | None = None  # old grid, new grid
    prefix: tuple[Prefix, Prefix] | None = None  # the checkpoint's prefix tokens, the model's

    def summary(self, source: str) -> str:
        parts = [f"loaded {self.loaded} tensors from {source}"]
        if self.resampled is not None:
            (oh, ow), (nh, nw) = self.resampled
            parts.append(f"pos_embed resampled {oh}x{ow} -> {nh}x{nw}")
        if self.prefix is not None:
            old, new = self.prefix
            parts.append(f"prefix tokens {old.describe()} -> {new.describe()}")
        if self.skipped_decoder:
            parts.append(f"skipped {self.skipped_decoder} decoder tensors")
        if self.dropped_head:
            parts.append("head dropped (other class count)")
        if self.missing:
            parts.append(f"missing (trained from scratch): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        return "; ".join(parts)


def _width(weights: dict[str, torch.Tensor]) -> int | None:
    for key in ("cls_token", "pos_embed"):
        if key in weights and weights[key].dim() > 0:
            return int(weights[key].shape[-1])
    proj = weights.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() > 0:
        return int(proj.shape[0])
    return None


def _depth(keys: Any) -> int:
    return len({int(m.group(1)) for k in keys if (m := _BLOCK.match(k))})


def _check_fits(weights: dict[str, torch.Tensor], vit: nn.Module, source: str) -> None:
    """One clear line when the checkpoint's architecture is not the model's."""
    own = vit.state_dict()
    choose = "choose a recipe whose model matches the checkpoint (model.backbone/model.options)"
    width, own_width = _width(weights), _width(own)
    if width is not None and own_width is not None and width != own_width:
        raise UserError(
            f"{source}: the checkpoint's encoder has width {width}, the model {own_width} "
            f"({checkpoint.state_mismatch(own, weights, partial=True)}); {choose}"
        )
    depth, own_depth = _depth(weights), _depth(own)
    if depth and depth != own_depth:
        raise UserError(
            f"{source}: the checkpoint's encoder has {depth} blocks, the model {own_depth}; "
            f"{choose}"
        )
    reshaped = {k: v for k, v in weights.items() if k in own and own[k].shape != v.shape}
    if reshaped:
        raise UserError(
            f"{source}: {checkpoint.state_mismatch(own, reshaped, partial=True)}; the patch "
            f"size or the number of channels differs from the recipe's model"
        )


# -- the loaders -----------------------------------------------------------------------------
def load_encoder(vit: nn.Module, path: str | Path) -> LoadReport:
    """Initialise a bare timm ViT (a `Classifier.vit`) from the checkpoint at `path`; logs a
    summary."""
    source = str(path)
    filtered = filter_state_dict(checkpoint.load_checkpoint(path), vit, source)
    weights = filtered.weights
    report = LoadReport(
        loaded=0,
        skipped_decoder=filtered.skipped_decoder,
        dropped_head=filtered.dropped_head,
        resampled=filtered.resampled,
        prefix=filtered.prefix,
    )
    _check_fits(weights, vit, source)
    result = vit.load_state_dict(weights, strict=False)
    report.loaded = len(weights) - len(result.unexpected_keys)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    if report.loaded == 0:
        raise UserError(f"{source}: no tensor of the checkpoint matches a ViT encoder")
    if "head.weight" in report.missing:
        # MAE's head initialisation for fine-tuning: tiny weights, so training starts from a
        # near-uniform prediction instead of a random projection of the pretrained features.
        head = vit.get_classifier()
        nn.init.trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
    ui.info(report.summary(source))
    normalise.announce(path)  # the statistics it was trained under, if not the model's
    return report


def load_pretrained_into(model: nn.Module, path: str | Path) -> None:
    """Start a DMAE from a DMAE/MAE pre-training checkpoint (ours or the official layout)."""
    weights = filter_state_dict(checkpoint.load_checkpoint(path), model, str(path)).weights
    own = model.state_dict()
    reshaped = {k: v for k, v in weights.items() if k in own and own[k].shape != v.shape}
    if reshaped:
        raise UserError(
            f"{path}: checkpoint does not match the recipe's model "
            f"({checkpoint.state_mismatch(own, reshaped, partial=True)})"
        )
    result = model.load_state_dict(weights, strict=False)
    if len(weights) == len(result.unexpected_keys):
        raise UserError(
            f"{path}: no tensor of the checkpoint matches the DMAE model; pretrain.init takes a "
            f"DMAE/MAE pre-training checkpoint (ours or the official layout)"
        )
    missing = [k for k in result.missing_keys if not k.endswith(("pos_embed", "reg_token"))]
    ui.info(
        f"loaded {len(weights) - len(result.unexpected_keys)} tensors from {path}"
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + (f"; unexpected: {', '.join(result.unexpected_keys)}" if result.unexpected_keys else "")
    )
    normalise.announce(path)
