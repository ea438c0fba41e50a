"""Position embeddings: MAE's fixed 2-D sin-cos table, and a checkpoint's table fitted to a ViT
with another patch grid or other prefix tokens.

The fixed table is MAE's (and so DMAE's): for a D-wide model, the first D/2 channels encode a
patch's column, the last D/2 its row, each half as [sin | cos] of the coordinate times the
frequencies 1/10000^(2i/(D/2)), i = 0 .. D/4 - 1; patches in row-major order. timm's own 2-D
sin-cos table orders the channels differently, so weights trained under one are wrong under
the other.

A timm ViT may put prefix tokens before its patches: a class token, register tokens
(`reg_tokens`), or none (`class_token=False`). Its position table has a row per prefix token,
or none of them (`no_embed_class=True`: positions only for patches). `Prefix` describes that
for a model or a checkpoint, and `convert_pos_embed` moves a checkpoint's table from its
layout to a model's, keeping what each token was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed


def sincos_table(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table for a (rows, cols) patch grid: shape (rows*cols, dim)."""
    if dim % 4:
        raise ValueError(
            f"a 2-D sin-cos position embedding needs a width divisible by 4, not {dim}"
        )
    quarter = dim // 4
    # float64 as the reference table is computed, then float32 as the model holds it
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )

    def encode(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix_rows: int = 1) -> torch.Tensor:
    """The fixed table with `prefix_rows` zero rows first (a cls token carries no position):
    shape (1, prefix_rows + rows*cols, dim)."""
    table = sincos_table(grid, dim)
    return torch.cat([torch.zeros(prefix_rows, dim), table], dim=0).unsqueeze(0)


# -- prefix tokens ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prefix:
    """The tokens a ViT puts before its patches, and whether its position table has their rows."""

    cls: bool
    registers: int
    embedded: bool  # rows for the prefix tokens in pos_embed (timm's no_embed_class=False)

    @property
    def tokens(self) -> int:
        return int(self.cls) + self.registers

    @property
    def rows(self) -> int:
        return self.tokens if self.embedded else 0

    def describe(self) -> str:
        parts = (["cls"] if self.cls else []) + (
            [f"{self.registers} register{'s' if self.registers != 1 else ''}"]
            if self.registers
            else []
        )
        where = "" if self.embedded or not self.tokens else " (no position rows)"
        return (" + ".join(parts) or "no prefix tokens") + where


def prefix_of(vit: nn.Module) -> Prefix:
    """A timm ViT's prefix tokens (and any module exposing `cls_token` / `reg_token` alike)."""
    registers = getattr(vit, "reg_token", None)
    return Prefix(
        cls=getattr(vit, "cls_token", None) is not None,
        registers=int(registers.shape[1]) if torch.is_tensor(registers) else 0,
        embedded=not getattr(vit, "no_embed_class", False),
    )


def prefix_in(weights: dict[str, torch.Tensor], rows: int) -> Prefix | None:
    """A checkpoint's prefix tokens, from its tokens and the `rows` of its position table: the
    table has a row per prefix token (timm's default) when the rest is a square grid, else none
    when the whole table is one. None when neither reading gives a square grid."""
    registers = weights.get("reg_token")
    count = int(registers.shape[1]) if torch.is_tensor(registers) and registers.dim() == 3 else 0
    cls = "cls_token" in weights
    for embedded in (True, False):
        prefix = Prefix(cls, count, embedded)
        patches = rows - prefix.rows
        if patches > 0 and math.isqrt(patches) ** 2 == patches:
            return prefix
    return None


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


def convert_pos_embed(
    weights: dict[str, Any], source: Prefix, target: Prefix, grid: tuple[int, int]
) -> None:
    """Move `weights["pos_embed"]` (laid out for `source`) to `target`'s layout and `grid`, in
    place. The patch rows are resampled when the grid differs. A prefix token keeps its
    position row when both layouts have one; the row is added into the token itself when the
    target has no prefix rows (the token's input is the same), and is zero for a token the
    source did not embed. Registers of another count are dropped: the model trains its own."""
    pos = weights["pos_embed"]
    patches = resize_pos_embed(pos[:, source.rows :], grid, 0)
    width = pos.shape[-1]
    rows = {
        "cls_token": _rows(pos, source, 0, 1) if source.cls else None,
        "reg_token": _rows(pos, source, int(source.cls), source.registers)
        if source.registers
        else None,
    }
    if source.registers != target.registers:
        weights.pop("reg_token", None)
        rows["reg_token"] = None
    if not target.cls:
        rows["cls_token"] = None
    if target.embedded:
        head = [
            rows[name] if rows[name] is not None else pos.new_zeros(1, count, width)
            for name, count in (("cls_token", int(target.cls)), ("reg_token", target.registers))
            if count
        ]
        weights["pos_embed"] = torch.cat([*head, patches], dim=1)
        return
    for name, row in rows.items():
        if row is not None and name in weights:
            weights[name] = weights[name] + row
    weights["pos_embed"] = patches


def _rows(pos: torch.Tensor, source: Prefix, start: int, count: int) -> torch.Tensor | None:
    """The source's position rows of `count` prefix tokens from `start`, or None when its table
    has no prefix rows."""
    return pos[:, start : start + count] if source.embedded else None
