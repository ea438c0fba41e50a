from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmae_cli import __version__
from dmae_cli.api import DatasetInfo
from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.classifier import build_classifier, load_classifier
from dmae_cli.models.dmae import DMAE, patchify, random_masking, unpatchify
from dmae_cli.models.spec import CLASSIFIER_FIELDS, SPEC_VERSION, ModelSpec
from dmae_cli.models.weights import filter_state_dict
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.pretrain import dmae_loss
from tests.conftest import save_classifier, tiny_classifier_meta


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


# -- the model's self-description ---------------------------------------------------------------
def digits_info() -> DatasetInfo:
    names = tuple(str(c) for c in range(10))
    return DatasetInfo(10, 16, 1, (0.3,), (0.4,), names, "train-hash")


def test_spec_of_a_finetune_run_is_the_meta_it_always_was(tiny_recipe) -> None:
    recipe = tiny_recipe()
    test_info = DatasetInfo(10, 16, 1, (0.3,), (0.4,), fingerprint="test-hash")
    spec = ModelSpec.for_finetune(recipe, digits_info(), test_info, 0.5, init="random")
    meta = spec.to_dict()
    assert meta == {
        "spec_version": SPEC_VERSION,
        "dmae_version": __version__,
        "stage": "finetune",
        "backbone": recipe.model.backbone,
        "backbone_options": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": recipe.model.image_size,
        "patch_size": recipe.model.patch_size,
        "input_size": 16,
        "channels": 1,
        "mean": [0.3],
        "std": [0.4],
        "num_classes": 10,
        "class_names": [str(c) for c in range(10)],
        "dataset": "digits",
        "data_fingerprint": "train-hash",
        "sigma": 0.5,
        "global_pool": "avg",
        "head_batchnorm": False,
        "linear_probe": False,
        "test_fingerprint": "test-hash",
        "init": "random",
    }
    assert ModelSpec.from_dict(meta) == spec
    torch.save({"meta": meta}, io := BytesIO())  # plain data: loadable with weights_only
    io.seek(0)
    assert torch.load(io, weights_only=True)["meta"] == meta


def test_spec_of_a_pretrain_run_round_trips(tiny_recipe) -> None:
    recipe = tiny_recipe()
    spec = ModelSpec.for_pretrain(recipe, digits_info())
    meta = spec.to_dict()
    assert meta["stage"] == "pretrain" and meta["norm_pix_loss"] is recipe.pretrain.norm_pix_loss
    assert meta["decoder"] == {"embed_dim": 32, "depth": 1, "num_heads": 2}
    assert "sigma" not in meta and "global_pool" not in meta
    assert ModelSpec.from_dict(meta) == spec


def test_a_meta_without_a_version_reads_as_version_0() -> None:
    spec = ModelSpec.from_dict(tiny_classifier_meta())
    assert spec.spec_version == 0 and spec.channels == 1 and spec.mean == (spec.mean[0],)
    assert spec.backbone_options == {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backbone", 7),
        ("backbone", ""),
        ("backbone_options", 5),
        ("backbone_options", {"embed_dim": 10**9}),
        ("backbone_options", {"act_layer": object()}),
        ("image_size", 65536),
        ("image_size", "16"),
        ("image_size", True),
        ("image_size", 16.0),
        ("patch_size", 0),
        ("patch_size", 32),  # larger than the 16-pixel image
        ("input_size", -1),
        ("channels", 0),
        ("channels", 10**6),
        ("mean", "abc"),
        ("mean", [0.1, 0.2, 0.3]),  # three values for one channel
        ("mean", [float("nan")]),
        ("std", [0.0]),
        ("std", [-0.4]),
        ("num_classes", 0),
        ("num_classes", 10**9),
        ("class_names", "0123456789"),
        ("dataset", 3),
        ("sigma", -0.5),
        ("sigma", "0.5"),
        ("global_pool", "bogus"),
        ("head_batchnorm", "yes"),
        ("decoder", {"embed_dim": 32}),
        ("stage", ["finetune"]),
        ("spec_version", "1"),
    ],
)
def test_a_bad_meta_field_is_one_line_naming_it(field: str, value: object) -> None:
    with pytest.raises(UserError) as info:
        ModelSpec.from_dict({**tiny_classifier_meta(), field: value}, "x.pth")
    message = str(info.value)
    assert message.startswith(f"x.pth: checkpoint field meta.{field}: expected ")
    assert "\n" not in message


def test_a_meta_of_a_newer_dmae_is_refused() -> None:
    meta = {**tiny_classifier_meta(), "spec_version": SPEC_VERSION + 1}
    with pytest.raises(UserError, match="meta.spec_version: expected .*newer dmae"):
        ModelSpec.from_dict(meta, "x.pth")


def test_a_meta_lacking_fields_names_them() -> None:
    meta = {k: v for k, v in tiny_classifier_meta().items() if k not in ("mean", "sigma")}
    with pytest.raises(UserError, match="x.pth: checkpoint lacks mean in its meta"):
        ModelSpec.from_dict(meta, "x.pth")
    with pytest.raises(UserError, match="x.pth: classifier checkpoint lacks mean, sigma"):
        ModelSpec.from_dict(meta, "x.pth", require=CLASSIFIER_FIELDS, what="classifier checkpoint")


def test_load_classifier_checks_the_meta_before_building(tmp_path: Path) -> None:
    path = save_classifier(tmp_path / "c.pth")
    state = checkpoint.load_checkpoint(path)
    state["meta"]["image_size"] = 65536
    checkpoint.save_checkpoint(path, state)
    with pytest.raises(UserError, match="c.pth: checkpoint field meta.image_size"):
        load_classifier(path)


def test_a_classifier_without_a_version_loads(tmp_path: Path) -> None:
    path = save_classifier(tmp_path / "c.pth")
    assert "spec_version" not in checkpoint.load_checkpoint(path)["meta"]
    model, spec = load_classifier(path)
    assert spec.sigma == 0.5 and spec.num_classes == 10 and not model.training


# -- one path for every layout ----------------------------------------------------------------
def test_filter_keeps_a_classifier_checkpoint_as_it_is(tmp_path: Path) -> None:
    path = save_classifier(tmp_path / "c.pth")
    state = checkpoint.load_checkpoint(path)
    model = build_classifier(tiny_classifier_meta())
    weights = filter_state_dict(state, model, "c.pth").weights
    assert list(weights) == list(state["model"])
    assert all(weights[k] is state["model"][k] for k in weights)


def test_filter_for_a_dmae_reads_ours_and_the_official_layout_alike() -> None:
    source = tiny_dmae()
    target = tiny_dmae()
    ours = filter_state_dict({"model": source.state_dict()}, target, "ours").weights
    official = filter_state_dict({"model": source.official_state_dict()}, target, "off").weights
    ddp = {f"module.{k}": v for k, v in source.official_state_dict().items()}
    wrapped = filter_state_dict({"state_dict": ddp}, target, "ddp").weights
    assert ours.keys() == official.keys() == wrapped.keys()
    assert "encoder.blocks.0.attn.qkv.weight" in ours and "decoder_embed.weight" in ours
    # The data's statistics are the model's own; the position tables are the checkpoint's
    # when their shapes agree (its weights were trained with them), else the model's.
    assert not any(k.startswith("adapter.") for k in ours)
    assert torch.equal(ours["encoder.pos_embed"], source.encoder.pos_embed)
    assert torch.equal(official["decoder_pos_embed"], source.decoder_pos_embed)
    other_grid = filter_state_dict({"model": tiny_dmae(model_size=32).state_dict()}, target, "g")
    assert not any(k.endswith("pos_embed") for k in other_grid.weights)


def test_filter_for_a_vit_resamples_and_skips_the_decoder() -> None:
    big = tiny_dmae(model_size=32)  # an 8x8 patch grid
    vit = tiny_dmae(model_size=16).encoder  # a 4x4 one
    out = filter_state_dict({"model": big.official_state_dict()}, vit, "big")
    assert out.resampled == ((8, 8), (4, 4)) and out.skipped_decoder > 0
    assert out.weights["pos_embed"].shape == vit.pos_embed.shape
    assert not any(k.startswith(("decoder", "mask_token")) for k in out.weights)
