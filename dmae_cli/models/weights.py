"""Encoder weights into a classifier: from our runs, official DMAE/MAE files, timm and safetensors.

Every source is first brought to the key layout of a timm `VisionTransformer` (PAPER.md §5):
our DMAE checkpoints keep the encoder under `encoder.`, our classifiers under `vit.`, the
official pre-training files and timm state dicts use the timm names directly. Decoder tensors
(`decoder_*`, `mask_token`) are dropped: fine-tuning keeps only the encoder. Position embeddings
are resampled when the patch grid differs; a head of another class count is dropped and trained
anew, as MAE does. Anything that cannot fit the model (another width, depth, patch size or
number of channels) is one `UserError` line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from dmae_cli.runtime import checkpoint, ui
from dmae_cli.runtime.errors import UserError

DECODER_PREFIXES = ("decoder_", "mask_token")
HEAD_KEYS = ("head.weight", "head.bias")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LoadReport:
    """What `load_encoder` did, for the log line and for tests."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_decoder: int = 0
    dropped_head: bool = False
    resampled: tuple[tuple[int, int], tuple[int, int]] | None = None  # old grid, new grid

    def summary(self, source: str) -> str:
        parts = [f"loaded {self.loaded} tensors from {source}"]
        if self.resampled is not None:
            (oh, ow), (nh, nw) = self.resampled
            parts.append(f"pos_embed resampled {oh}x{ow} -> {nh}x{nw}")
        if self.skipped_decoder:
            parts.append(f"skipped {self.skipped_decoder} decoder tensors")
        if self.dropped_head:
            parts.append("head dropped (other class count)")
        if self.missing:
            parts.append(f"missing (trained from scratch): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        return "; ".join(parts)


def vit_state_dict(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """A checkpoint's weights in timm ViT layout, and how many decoder tensors were dropped.

    Accepts `{'model': sd}` (ours, official), `{'state_dict': sd}`, `{'module': sd}` or a bare
    state dict, with or without a DDP `module.` prefix.
    """
    for key in ("model", "state_dict", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    weights = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    for prefix in ("encoder.", "vit."):  # our DMAE and our Classifier
        if any(k.startswith(prefix) for k in weights):
            weights = {
                k.removeprefix(prefix): v
                for k, v in weights.items()
                if k.startswith(prefix) or k.startswith(DECODER_PREFIXES)
            }
    decoder = [k for k in weights if k.startswith(DECODER_PREFIXES)]
    for k in decoder:
        del weights[k]
    return weights, len(decoder)


def resize_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Position embeddings (1, prefix + h*w, D) of a square grid resampled to `grid` (bicubic).

    The prefix (cls) slots are kept as they are; only the patch grid is interpolated.
    """
    patches = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} position embeddings do not form a square grid")
    return resample_abs_pos_embed(
        pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=num_prefix_tokens
    )


def _width(weights: dict[str, torch.Tensor]) -> int | None:
    for key in ("cls_token", "pos_embed"):
        if key in weights:
            return int(weights[key].shape[-1])
    if "patch_embed.proj.weight" in weights:
        return int(weights["patch_embed.proj.weight"].shape[0])
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


def load_encoder(vit: nn.Module, path: str | Path) -> LoadReport:
    """Initialise a timm ViT (a `Classifier.vit`) from the checkpoint at `path`; logs a summary."""
    source = str(path)
    weights, skipped = vit_state_dict(checkpoint.load_checkpoint(path))
    report = LoadReport(loaded=0, skipped_decoder=skipped)
    own = vit.state_dict()
    pos = weights.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = int(getattr(vit, "num_prefix_tokens", 1))
        try:
            weights["pos_embed"] = resize_pos_embed(pos, tuple(vit.patch_embed.grid_size), prefix)
        except ValueError as exc:
            raise UserError(f"{source}: cannot use its pos_embed: {exc}") from exc
        old = math.isqrt(pos.shape[1] - prefix)
        report.resampled = ((old, old), tuple(vit.patch_embed.grid_size))
    heads = [k for k in HEAD_KEYS if k in weights and k in own]
    if any(weights[k].shape != own[k].shape for k in heads):
        for k in heads:
            del weights[k]
        report.dropped_head = True
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
    return report
