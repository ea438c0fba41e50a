"""Fine-tuning: evaluation, layer decay, weight import, a real short run and the CLI (the
objective: test_objective.py).

Models are tiny (width <= 64, depth <= 2) and runs last a few epochs on digits, so the file
takes seconds on two CPU cores.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.config.recipe import FinetuneConfig
from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.classifier import build_classifier, load_classifier
from dmae_cli.models.dmae import DMAE
from dmae_cli.models.weights import load_encoder, resize_pos_embed
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.augment import (
    ConfigIgnoredWarning,
    TimmTrainTransform,
    apply_timm_augmentation,
)
from dmae_cli.training.finetune import evaluate, run_finetune
from dmae_cli.training.param_groups import layer_decay_groups
from tests.conftest import one_line_error

runner = CliRunner()


def meta(**overrides: Any) -> dict[str, Any]:
    """A classifier self-description for a tiny 1-channel model (8x8 pixels in, 16x16 model)."""
    return {
        "backbone": "vit_tiny",
        "backbone_options": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": 16,
        "patch_size": 4,
        "input_size": 8,
        "channels": 1,
        "mean": [0.5],
        "std": [0.25],
        "num_classes": 10,
        **overrides,
    }


def tiny_dmae(width: int = 32, image_size: int = 16) -> DMAE:
    encoder = build_backbone(
        "vit_tiny",
        img_size=image_size,
        patch_size=4,
        in_chans=1,
        embed_dim=width,
        depth=2,
        num_heads=2,
    )
    adapter = InputAdapter(8, image_size, [0.5], [0.25])
    return DMAE(encoder, adapter, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


# -- evaluation ----------------------------------------------------------------------------
def test_evaluation_noise_is_fixed_by_the_seed() -> None:
    torch.manual_seed(0)
    model = build_classifier(meta()).eval()
    data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    first = evaluate(model, data, 0.5, seed=3, copies=2)
    assert evaluate(model, data, 0.5, seed=3, copies=2) == first
    assert set(first) == {"acc_clean", "acc_noisy"} and 0 <= first["acc_noisy"] <= 1


# -- optimisation ----------------------------------------------------------------------------
def test_layer_decay_groups_scale_by_depth() -> None:
    model = build_classifier(meta())
    cfg = FinetuneConfig(layer_decay=0.5, weight_decay=0.05)
    groups = layer_decay_groups(model, cfg)
    names = {id(p): n for n, p in model.vit.named_parameters()}
    scale, decay = {}, {}
    for group in groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
            decay[names[id(p)]] = group["weight_decay"]
    assert set(scale) == set(names.values())  # every parameter in exactly one group
    # depth 2: stem 0.5^3, block 0 0.5^2, block 1 0.5, head and fc_norm 1 (as MAE's lrd).
    assert scale["cls_token"] == scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.125
    assert scale["blocks.0.attn.qkv.weight"] == 0.25
    assert scale["blocks.1.mlp.fc2.weight"] == 0.5
    assert scale["fc_norm.weight"] == scale["head.weight"] == 1.0
    assert groups[0]["lr_scale"] == 1.0  # the logged lr is the peak lr
    # No decay on biases, norms, position embedding and cls token.
    assert decay["head.weight"] == decay["blocks.0.attn.qkv.weight"] == 0.05
    for name in ("head.bias", "blocks.0.norm1.weight", "pos_embed", "cls_token"):
        assert decay[name] == 0.0


# -- weights ---------------------------------------------------------------------------------
def test_pos_embed_interpolation_keeps_cls_and_resamples_the_grid() -> None:
    grid = torch.linspace(0, 1, 4).view(1, 4, 1, 1).expand(1, 4, 4, 3)  # varies along rows
    pos = torch.cat([torch.full((1, 1, 3), 7.0), grid.reshape(1, 16, 3)], dim=1)
    out = resize_pos_embed(pos, (8, 8), num_prefix_tokens=1)
    assert out.shape == (1, 65, 3)
    assert torch.equal(out[:, :1], pos[:, :1])
    rows = out[0, 1:, 0].view(8, 8)
    assert torch.allclose(rows, rows[:, :1].expand(8, 8))  # constant along columns
    assert (rows[1:, 0] >= rows[:-1, 0] - 1e-6).all()  # still increasing down the rows
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(pos[:, :-1], (8, 8), num_prefix_tokens=1)


def test_official_layout_loads_with_no_missing_encoder_keys(tmp_path: Path) -> None:
    dmae = tiny_dmae()
    path = tmp_path / "dmae-official.pth"
    official = dmae.official_state_dict()
    assert "cls_token" in official and "decoder_embed.weight" in official
    torch.save({"model": official, "epoch": 3}, path)
    model = build_classifier(meta())
    report = load_encoder(model.vit, path)
    # As MAE: fc_norm and head are new, the encoder's final norm is unused by global pooling.
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]
    assert report.skipped_decoder > 0 and report.resampled is None
    own = model.vit.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "pos_embed"):
        assert torch.equal(own[key], official[key])
    assert model.vit.head.weight.abs().max() < 1e-3  # MAE's tiny head initialisation


def test_our_pretrain_run_timm_and_safetensors_load_the_same(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    dmae = tiny_dmae()
    torch.save({"model": dmae.state_dict(), "meta": {"stage": "pretrain"}}, tmp_path / "ours.pth")
    encoder = {k: v.contiguous() for k, v in dmae.encoder.state_dict().items()}
    torch.save(encoder, tmp_path / "timm.pth")  # a bare timm ViT state dict
    save_file(encoder, str(tmp_path / "enc.safetensors"))
    loaded = []
    for name in ("ours.pth", "timm.pth", "enc.safetensors"):
        model = build_classifier(meta())
        report = load_encoder(model.vit, tmp_path / name)
        assert "blocks.0.attn.qkv.weight" not in report.missing
        loaded.append(model.vit.blocks[0].attn.qkv.weight.detach().clone())
    assert torch.equal(loaded[0], loaded[1]) and torch.equal(loaded[1], loaded[2])


def test_pos_embed_is_resampled_for_another_grid(tmp_path: Path) -> None:
    torch.save({"model": tiny_dmae(image_size=16).official_state_dict()}, tmp_path / "a.pth")
    model = build_classifier(meta(image_size=32))  # 8x8 patch grid instead of 4x4
    report = load_encoder(model.vit, tmp_path / "a.pth")
    assert report.resampled == ((4, 4), (8, 8))
    assert "pos_embed" not in report.missing


def test_another_width_fails_with_one_clear_line(tmp_path: Path) -> None:
    torch.save({"model": tiny_dmae(width=64).official_state_dict()}, tmp_path / "wide.pth")
    model = build_classifier(meta())
    with pytest.raises(UserError, match="width 64, the model 32") as info:
        load_encoder(model.vit, tmp_path / "wide.pth")
    assert "\n" not in str(info.value)


def test_load_classifier_rejects_a_pretraining_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "pre.pth"
    checkpoint.save_checkpoint(path, {"model": {}, "meta": {"stage": "pretrain"}})
    with pytest.raises(UserError, match="a pretrain checkpoint; expected a classifier"):
        load_classifier(path)


def test_random_augmentation_on_small_images_warns(tiny_recipe) -> None:
    cfg = FinetuneConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    recipe = tiny_recipe()
    from dmae_cli.data.loading import load_dataset

    dataset = load_dataset(recipe, "train", augment=True)
    before = dataset.transform
    with pytest.warns(ConfigIgnoredWarning, match="auto_augment"):
        apply_timm_augmentation(dataset, cfg, dataset.info)
    assert dataset.transform is before


# -- a real run ------------------------------------------------------------------------------
FAST = [
    "data.options={max_shift: 0}",  # no translation: a random-init ViT learns faster
    "finetune.batch_size=32",
    "finetune.blr=2.0e-2",
    "finetune.warmup_epochs=0",
    "finetune.layer_decay=1.0",
    "finetune.drop_path=0.0",
    "finetune.eval_every=1",
]


def test_short_finetune_improves_accuracy_writes_and_resumes(tiny_recipe) -> None:
    recipe = tiny_recipe(*FAST, "finetune.epochs=4", "finetune.sigma=[0.25]", "finetune.init=none")
    (run,) = run_finetune(recipe, stop_after=3)
    accs = [h["acc_noisy"] for h in run.history]
    assert accs[-1] > accs[0] + 0.05 and accs[-1] > 0.25, accs  # rises, well above chance
    assert run.run_dir == recipe.stage_dir("finetune") / "sigma-0.25"
    for name in ("best.pth", "last.pth", "config.yaml", "metrics.jsonl"):
        assert (run.run_dir / name).is_file()
    model, spec = load_classifier(run.run_dir / "best.pth")
    assert spec.sigma == 0.25 and spec.stage == "finetune" and spec.init == "random"
    assert spec.data_fingerprint and spec.test_fingerprint
    assert not model.training
    # The certify engineer's contract: build from meta, load the weights, nothing else.
    state = checkpoint.load_checkpoint(run.run_dir / "best.pth")
    build_classifier(state["meta"]).load_state_dict(state["model"])
    # Running again resumes at epoch 3 and finishes the fourth.
    (again,) = run_finetune(recipe)
    assert [h["epoch"] for h in again.history] == [3]
    assert len((run.run_dir / "metrics.jsonl").read_text().splitlines()) == 4


def test_linear_probe_trains_only_the_head(tiny_recipe, tmp_path: Path) -> None:
    dmae = tiny_dmae()
    torch.save({"model": dmae.official_state_dict()}, tmp_path / "enc.pth")
    recipe = tiny_recipe(
        "finetune.linear_probe=true",
        f"finetune.init={tmp_path / 'enc.pth'}",
        "finetune.probe.epochs=1",
        "finetune.probe.batch_size=64",
        "finetune.probe.warmup_epochs=0",
        "finetune.sigma=[0.5]",
        "finetune.mixup=0.8",  # MAE's probe has no mixup: ignored, with a warning
    )
    with pytest.warns(ConfigIgnoredWarning, match="finetune.mixup ignored in linear probing"):
        (run,) = run_finetune(recipe)
    assert run.run_dir == recipe.stage_dir("linprobe") / "sigma-0.5"
    model, spec = load_classifier(run.run_dir / "best.pth")
    assert spec.global_pool == "token" and spec.head_batchnorm
    assert isinstance(model.vit.head[0], torch.nn.BatchNorm1d) and not model.vit.head[0].affine
    # The frozen encoder is exactly the checkpoint's.
    official = dmae.official_state_dict()
    for key in ("blocks.0.attn.qkv.weight", "norm.weight", "cls_token"):
        assert torch.equal(model.vit.state_dict()[key], official[key])


# -- the command line ------------------------------------------------------------------------
def test_cli_without_a_pretraining_run_says_what_to_do(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["finetune", "recipes/digits.yaml", "--set", f"runs_dir={tmp_path}"]
    )
    line = one_line_error(result)
    assert "dmae pretrain" in line and "--init none" in line


def test_cli_missing_init_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    args = ["finetune", "recipes/digits.yaml", "--init", str(missing), "--out", str(tmp_path)]
    assert str(missing) in one_line_error(runner.invoke(app, args))


def test_cli_bad_sigma_is_one_line(tmp_path: Path) -> None:
    args = ["finetune", "recipes/digits.yaml", "--sigma", "-1", "--out", str(tmp_path)]
    assert "finetune.sigma" in one_line_error(runner.invoke(app, args))


def test_cli_wrong_width_checkpoint_is_one_line(tmp_path: Path) -> None:
    torch.save({"model": tiny_dmae(width=64).official_state_dict()}, tmp_path / "wide.pth")
    args = ["finetune", "recipes/digits.yaml", "--init", str(tmp_path / "wide.pth")]
    args += ["--out", str(tmp_path / "out"), "--sigma", "0.5"]
    assert "width 64" in one_line_error(runner.invoke(app, args))


def test_cli_help_has_examples() -> None:
    result = runner.invoke(app, ["finetune", "--help"])
    assert result.exit_code == 0
    for text in ("Examples", "--sigma", "--init", "--linear-probe", "--out", "--set"):
        assert text in result.output


def test_random_augmentation_replaces_the_transform_of_large_images(tiny_recipe) -> None:
    from dmae_cli.data.loading import load_dataset

    recipe = tiny_recipe("data.image_size=64")
    dataset = load_dataset(recipe, "train", augment=True)
    cfg = FinetuneConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=1.0)
    apply_timm_augmentation(dataset, cfg, dataset.info)
    assert isinstance(dataset.transform, TimmTrainTransform)
    torch.manual_seed(0)
    random.seed(0)  # timm's RandAugment draws from Python's random module
    image, _ = dataset[0]
    assert image.shape == (1, 64, 64)
    # Pixel space again, except the erased box: filled with N(0, 1) in normalised space.
    inside = ((image >= 0) & (image <= 1)).float().mean().item()
    assert inside > 0.5 and (image.min() < 0 or image.max() > 1)
