"""Position embeddings are MAE's table, everywhere dmae builds a fixed one, and a checkpoint's
own table survives continued pre-training and moves between prefix-token layouts.

The reference below is written from the method's description (docs/method.md): for a D-wide
model the first D/2 channels encode the patch's column, the last D/2 its row, each half as
[sin | cos] over the frequencies 1/10000^(2i/(D/2)); the cls row is zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed

from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.positions import Prefix, convert_pos_embed, prefix_in, sincos_table
from dmae_cli.models.weights import filter_state_dict, load_encoder, load_pretrained_into
from tests.test_models import tiny_dmae


def described_table(rows: int, cols: int, dim: int) -> torch.Tensor:
    """The table, one value at a time, as the description states it."""
    half, quarter = dim // 2, dim // 4
    table = torch.zeros(rows * cols, dim, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            for k in range(dim):
                coordinate, j = (c, k) if k < half else (r, k - half)
                i = j % quarter
                angle = coordinate / 10000 ** (2 * i / half)
                table[r * cols + c, k] = math.sin(angle) if j < quarter else math.cos(angle)
    return table


def test_the_table_is_the_described_one_on_a_grid_that_is_not_square() -> None:
    # 3 rows of 5 patches: a column and a row coordinate cannot be confused
    assert torch.allclose(sincos_table((3, 5), 32).double(), described_table(3, 5, 32), atol=1e-6)


def test_timms_own_table_is_not_it() -> None:
    """What dmae built before: weights trained under MAE's table read it wrongly."""
    timm_table = build_sincos2d_pos_embed([4, 4], dim=32).double()
    assert not torch.allclose(timm_table, described_table(4, 4, 32), atol=1e-3)


def test_dmae_builds_the_table_for_encoder_and_decoder() -> None:
    model = tiny_dmae()  # 4x4 grid, widths 32 and 32
    expected = described_table(4, 4, 32).float()
    for table in (model.encoder.pos_embed, model.decoder_pos_embed):
        assert torch.all(table[0, 0] == 0)  # the cls row
        assert torch.allclose(table[0, 1:], expected, atol=1e-6)


def test_a_width_not_divisible_by_4_is_one_line() -> None:
    from dmae_cli.models.adapter import InputAdapter
    from dmae_cli.models.dmae import DMAE
    from dmae_cli.runtime.errors import UserError

    encoder = build_backbone(
        "vit_tiny", img_size=16, patch_size=4, in_chans=1, embed_dim=30, depth=1, num_heads=2
    )
    with pytest.raises(UserError, match="divisible by 4: the encoder has 30"):
        DMAE(encoder, InputAdapter(16, 16, [0.5], [0.5]), decoder_embed_dim=32, decoder_depth=1)


def test_continued_pretraining_keeps_the_checkpoints_tables(tmp_path: Path) -> None:
    """pretrain.init (CIFAR-10 after ImageNet): the tables the weights were trained with."""
    source = tiny_dmae()
    official = source.official_state_dict()
    official["pos_embed"] = torch.randn_like(official["pos_embed"])  # a table of its own
    official["decoder_pos_embed"] = torch.randn_like(official["decoder_pos_embed"])
    torch.save({"model": official, "epoch": 3}, tmp_path / "official.pth")
    model = tiny_dmae()
    load_pretrained_into(model, tmp_path / "official.pth")
    assert torch.equal(model.encoder.pos_embed, official["pos_embed"])
    assert torch.equal(model.decoder_pos_embed, official["decoder_pos_embed"])
    assert not model.encoder.pos_embed.requires_grad  # still fixed


def test_a_table_of_another_grid_is_replaced_by_the_models_own(tmp_path: Path) -> None:
    torch.save({"model": tiny_dmae(model_size=32).official_state_dict()}, tmp_path / "big.pth")
    model = tiny_dmae()
    own = model.encoder.pos_embed.clone()
    load_pretrained_into(model, tmp_path / "big.pth")
    assert torch.equal(model.encoder.pos_embed, own)


# -- between prefix-token layouts ------------------------------------------------------------
def tiny_vit(**options: object) -> torch.nn.Module:
    return build_backbone(
        "vit_tiny", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
        **options,
    )  # fmt: skip


def test_the_prefix_of_a_checkpoint_is_read_from_its_tokens_and_rows() -> None:
    plain = tiny_vit().state_dict()
    assert prefix_in(plain, 17) == Prefix(cls=True, registers=0, embedded=True)
    assert prefix_in(plain, 16) == Prefix(cls=True, registers=0, embedded=False)
    registers = tiny_vit(reg_tokens=4).state_dict()
    assert prefix_in(registers, 21) == Prefix(cls=True, registers=4, embedded=True)
    assert prefix_in(plain, 7) is None


def test_moving_the_cls_row_into_the_token_keeps_the_function(tmp_path: Path) -> None:
    """A plain ViT's weights into one without prefix rows (no_embed_class): the same output."""
    torch.manual_seed(0)
    source = tiny_vit()
    torch.nn.init.normal_(source.pos_embed, std=0.5)  # a cls row that matters
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    target = tiny_vit(no_embed_class=True)
    report = load_encoder(target, tmp_path / "plain.pth")
    assert report.prefix is not None and report.resampled is None
    x = torch.rand(2, 1, 16, 16)
    source.eval(), target.eval()
    assert torch.allclose(source.forward_features(x), target.forward_features(x), atol=1e-5)


def test_registers_get_zero_rows_and_the_cls_keeps_its_own() -> None:
    plain = tiny_vit().state_dict()
    weights = dict(plain)
    target = Prefix(cls=True, registers=4, embedded=True)
    convert_pos_embed(weights, prefix_in(plain, 17), target, (4, 4))
    pos = weights["pos_embed"]
    assert pos.shape == (1, 21, 32)
    assert torch.equal(pos[:, :1], plain["pos_embed"][:, :1])
    assert torch.all(pos[:, 1:5] == 0)
    assert torch.equal(pos[:, 5:], plain["pos_embed"][:, 1:])


def test_fine_tuning_a_register_vit_from_a_plain_checkpoint(tmp_path: Path) -> None:
    """Used to blame the checkpoint: "12 position embeddings do not form a square grid"."""
    torch.save({"model": tiny_dmae().official_state_dict()}, tmp_path / "plain.pth")
    for options in ({"reg_tokens": 4}, {"reg_tokens": 4, "no_embed_class": True}):
        vit = tiny_vit(**options)
        report = load_encoder(vit, tmp_path / "plain.pth")
        assert (
            "pos_embed" not in report.missing and "blocks.0.attn.qkv.weight" not in report.missing
        )
        assert report.prefix is not None and "4 registers" in report.summary("x")
        assert "reg_token" in report.missing  # new registers, trained from timm's initialisation


def test_a_register_vit_reads_its_own_checkpoint_unchanged() -> None:
    vit = tiny_vit(reg_tokens=4)
    out = filter_state_dict({"model": vit.state_dict()}, tiny_vit(reg_tokens=4), "own")
    assert out.prefix is None and out.resampled is None
    assert torch.equal(out.weights["pos_embed"], vit.pos_embed)
