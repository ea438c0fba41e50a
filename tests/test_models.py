from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmae_cli.models.vit import (
    DMAE,
    InputAdapter,
    build_backbone,
    patchify,
    random_masking,
    unpatchify,
)
from dmae_cli.training.pretrain import dmae_loss


def tiny_dmae(input_size: int = 8, model_size: int = 16, norm_pix_loss: bool = False) -> DMAE:
    encoder = build_backbone(
        "vit_tiny",
        img_size=model_size,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    adapter = InputAdapter(input_size, model_size, mean=[0.3], std=[0.4])
    return DMAE(
        encoder,
        adapter,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix_loss,
    )


@pytest.mark.parametrize(("length", "ratio"), [(16, 0.75), (64, 0.75), (49, 0.5), (10, 0.0)])
def test_masking_keeps_the_right_count_and_restores_order(length: int, ratio: float) -> None:
    x = torch.arange(3 * length, dtype=torch.float32).reshape(3, length, 1).expand(-1, -1, 4)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert kept.shape == (3, keep, 4)
    assert torch.equal(mask.sum(1), torch.full((3,), float(length - keep)))
    # Kept tokens are exactly the unmasked positions; ids_restore undoes the shuffle.
    for b in range(3):
        assert torch.equal(kept[b, :, 0].sort().values, x[b, mask[b] == 0, 0])
    padded = torch.cat([kept, torch.full((3, length - keep, 4), -1.0)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 4))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.all(restored[mask == 1] == -1)


def test_masking_is_per_sample() -> None:
    _, mask, _ = random_masking(torch.zeros(8, 64, 2), 0.75, torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_patchify_round_trip_and_order() -> None:
    images = torch.rand(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    assert torch.equal(unpatchify(patches, 4, 3), images)
    # MAE's order: patch row-major, inside a patch pixel row-major with channels last.
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 4])


def test_adapter_resizes_then_normalises() -> None:
    adapter = InputAdapter(8, 16, mean=[0.3], std=[0.4])
    x = torch.rand(2, 1, 8, 8)
    expected = (F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False) - 0.3) / 0.4
    assert torch.allclose(adapter(x), expected)
    same = InputAdapter(16, 16, mean=[0.3], std=[0.4])
    y = torch.rand(2, 1, 16, 16)
    assert torch.allclose(same(y), (y - 0.3) / 0.4)


def test_noise_is_added_in_pixel_space_at_native_resolution() -> None:
    torch.manual_seed(0)
    model = tiny_dmae(input_size=8, model_size=16)
    seen: list[torch.Tensor] = []
    model.adapter.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    clean = torch.rand(64, 1, 8, 8)
    dmae_loss(model, (clean, None), sigma=0.5, mask_ratio=0.75)
    noisy, target_input = seen  # the encoder's input first, then the clean target
    assert noisy.shape == clean.shape == target_input.shape  # before the 8 -> 16 resize
    assert torch.equal(target_input, clean)
    assert abs((noisy - clean).std().item() - 0.5) < 0.02  # sigma in [0, 1] pixel units


def test_loss_covers_all_patches() -> None:
    model = tiny_dmae(input_size=16, model_size=16)
    clean = torch.rand(2, 1, 16, 16)
    target = model.target(clean)
    mask = torch.zeros(2, 16)
    mask[:, 4:] = 1  # 12 masked, 4 visible patches
    pred = target.clone()
    pred[mask == 0] += 1.0  # wrong only on visible patches
    loss = model.forward_loss(clean, pred)
    # MAE would average over masked patches only and report 0; DMAE averages over all 16.
    assert loss.item() == pytest.approx(4 / 16)


def test_norm_pix_target_is_standardised_per_patch() -> None:
    model = tiny_dmae(input_size=16, model_size=16, norm_pix_loss=True)
    target = model.target(torch.rand(2, 1, 16, 16))
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-3)


def test_forward_shapes_and_fixed_position_embeddings() -> None:
    model = tiny_dmae()
    loss, pred, mask = model(torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8), 0.75)
    assert pred.shape == (3, 16, 16) and mask.shape == (3, 16) and loss.ndim == 0
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.all(model.encoder.pos_embed[0, 0] == 0)  # the cls slot carries no position


def test_mae_initialisation() -> None:
    model = tiny_dmae()
    assert torch.all(model.decoder_embed.bias == 0)
    assert torch.all(model.encoder.blocks[0].norm1.weight == 1)
    assert 0.01 < model.mask_token.std().item() < 0.03


def test_official_layout_keys() -> None:
    keys = set(tiny_dmae().official_state_dict())
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
        "mask_token",
        "decoder_embed.weight",
        "decoder_pos_embed",
        "decoder_blocks.0.attn.qkv.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
    }
    assert expected <= keys
    assert not any(k.startswith(("encoder.", "adapter.")) for k in keys)
