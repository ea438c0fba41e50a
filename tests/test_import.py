"""Weights made elsewhere come in: the official DMAE/MAE checkpoints as their training scripts
save them (pre-training and fine-tuned, with or without args, optimizer and scaler), timm state
dicts and safetensors files; and `dmae import` makes a foreign classifier one that
`dmae certify --checkpoint` reads, with the same logits.

Every file is built here with the official key names and dtypes (nothing is downloaded).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.models.classifier import build_classifier, load_classifier
from dmae_cli.models.foreign import Foreign, load_foreign
from dmae_cli.models.weights import load_encoder, load_pretrained_into
from tests.conftest import one_line_error, save_classifier
from tests.test_models import tiny_dmae

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEAN, STD = (0.3,), (0.4,)


def official_vit(**options: Any) -> VisionTransformer:
    """A fine-tuned classifier as the official code builds it: timm's ViT, global average
    pooling with fc_norm, LayerNorm eps 1e-6 (tiny: width 32, depth 2, 1 channel, 16 pixels)."""
    torch.manual_seed(0)
    kwargs: dict[str, Any] = dict(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
        num_heads=2, mlp_ratio=4.0, qkv_bias=True, global_pool="avg",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )  # fmt: skip
    vit = VisionTransformer(**(kwargs | options))
    for p in vit.parameters():  # weights that are not the initial ones (a zero head, ...)
        p.data.normal_(0, 0.2)
    return vit.eval()


def save_in_form(
    directory: Path, weights: dict[str, torch.Tensor], form: str, extras: bool = True
) -> Path:
    """`weights` saved as a fine-tuned classifier comes: .safetensors, a timm state dict, or
    the official training script's checkpoint (any other form; `extras`: its optimizer etc.)."""
    path = directory / ("ft.safetensors" if form == "safetensors" else "ft.pth")
    if form == "safetensors":
        save_file(weights, str(path))
    elif form == "timm":
        torch.save(weights, path)
    else:
        official_save(path, weights, extras=extras)
    return path


def official_save(path: Path, model: dict[str, torch.Tensor], extras: bool = True) -> Path:
    """`util/misc.save_model` of the official code: model, optimizer, epoch, scaler, args."""
    state: dict[str, Any] = {"model": model}
    if extras:
        params = [nn.Parameter(v.clone()) for v in model.values()]
        optimizer = torch.optim.AdamW(params, betas=(0.9, 0.95))
        sum(p.sum() for p in params).backward()
        optimizer.step()
        state |= {
            "optimizer": optimizer.state_dict(),
            "epoch": 99,
            "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "args": argparse.Namespace(model="vit_base_patch16", blr=5e-4, nb_classes=10),
        }
    torch.save(state, path)
    return path


# -- the official checkpoints in every use ------------------------------------------------------
@pytest.mark.parametrize("extras", [True, False], ids=["with-args-optimizer", "model-only"])
def test_official_pretraining_checkpoints_continue_and_fine_tune(
    tmp_path: Path, extras: bool
) -> None:
    source = tiny_dmae()
    path = official_save(tmp_path / "dmae-pretrain.pth", source.official_state_dict(), extras)
    model = tiny_dmae()
    load_pretrained_into(model, path)  # pretrain.init
    assert torch.equal(model.decoder_embed.weight, source.decoder_embed.weight)
    vit = build_classifier({**classifier_meta(), "input_size": 8}).vit
    report = load_encoder(vit, path)  # finetune --init
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, source.encoder.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("form", ["official", "official-model-only", "timm", "safetensors"])
def test_a_fine_tuned_classifier_initialises_fine_tuning_in_every_form(
    tmp_path: Path, form: str
) -> None:
    weights = official_vit().state_dict()
    path = save_in_form(tmp_path, weights, form, extras=form == "official")
    vit = build_classifier(classifier_meta()).vit
    report = load_encoder(vit, path)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(vit.head.weight, weights["head.weight"])


# -- dmae import -------------------------------------------------------------------------------
def classifier_meta() -> dict[str, Any]:
    return {
        "backbone": "vit_tiny", "backbone_options": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": 16, "patch_size": 4, "input_size": 16, "channels": 1,
        "mean": list(MEAN), "std": list(STD), "num_classes": 10,
    }  # fmt: skip


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def import_args(source: Path, out: Path, *extra: object) -> list[object]:
    return [
        "import", source, "--out", out, "--sigma", 0.5, "--mean", "0.3", "--std", "0.4",
        "--backbone", "vit_tiny", "--option", "num_heads=2", *extra,
    ]  # fmt: skip


FORMS = {
    "official-global-pool": ({}, "official"),
    "timm-token-pool": ({"global_pool": "token"}, "timm"),
    "registers-safetensors": ({"reg_tokens": 4, "no_embed_class": True}, "safetensors"),
    "no-class-token": ({"class_token": False}, "timm"),
}


@pytest.mark.parametrize("case", list(FORMS))
def test_import_gives_the_source_models_logits(tmp_path: Path, case: str) -> None:
    options, form = FORMS[case]
    source = official_vit(**options)
    weights = source.state_dict()
    path = save_in_form(tmp_path, weights, form)
    result = cli(*import_args(path, tmp_path / "clf.pth", "--dataset", "digits"))
    assert result.exit_code == 0, result.output
    model, spec = load_classifier(tmp_path / "clf.pth")
    assert spec.sigma == 0.5 and spec.num_classes == 10 and spec.stage == "finetune"
    pixels = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        expected = source((pixels - MEAN[0]) / STD[0])
        assert torch.allclose(model(pixels), expected, atol=1e-5)


def test_an_imported_classifier_is_certified(tmp_path: Path) -> None:
    official_save(tmp_path / "ft.pth", official_vit().state_dict())
    made = cli(*import_args(tmp_path / "ft.pth", tmp_path / "clf.pth", "--dataset", "digits"))
    assert made.exit_code == 0, made.output
    result = cli(
        "certify", "--checkpoint", tmp_path / "clf.pth", "--sigma", 0.5, "--n0", 8, "--n", 16,
        "--max-examples", 2, "--out", tmp_path / "cert",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "cert" / "sigma-0.5.tsv").read_text().splitlines()
    assert sum(not r.startswith(("#", "idx")) for r in rows) == 2


def test_load_foreign_is_the_python_way(tmp_path: Path) -> None:
    torch.save(official_vit().state_dict(), tmp_path / "ft.pth")
    given = Foreign(sigma=0.25, mean=MEAN, std=STD, backbone="vit_tiny", options={"num_heads": 2})
    model, spec = load_foreign(tmp_path / "ft.pth", given)
    assert spec.global_pool == "avg" and spec.backbone_options["embed_dim"] == 32
    assert not model.training


MISTAKES = {
    "pretraining": ("pre", [], "a pre-training checkpoint (it has a decoder), not a classifier"),
    "no-mean": ("ft", ["--mean", None], "give --mean and --std"),
    "bad-mean": ("ft", ["--mean", "0.3,abc"], "--mean '0.3,abc': expected comma-separated"),
    "mean-per-channel": ("ft", ["--mean", "0.3,0.3,0.3"], "--mean: expected 1 value"),
    "sigma": ("ft", ["--sigma", "-1"], "--sigma: expected a finite number >= 0, got -1.0"),
    "image-size": ("ft", ["--image-size", "99999"], "--image-size: expected an integer from 1"),
    "out-is-a-folder": ("ft", ["--out", "folder"], "folder: Is a directory"),
    "classes": ("ft", ["--num-classes", 100], "its head has 10 classes, not 100"),
    "heads": ("ft", ["--option", None], "32 wide, backbone 'vit_tiny' 192"),
    "option": ("ft", ["--option", "heads"], "--option 'heads': expected KEY=VALUE"),
    "names": ("ft", ["--class-names", "names"], "3 class names for a head of 10 classes"),
    "ours": ("clf", [], "already a dmae classifier"),
    "same-file": ("ft", ["--out", "ft"], "is the file being imported"),
    "backbone": ("ft", ["--backbone", "vit_nano"], "vit_nano"),
    "missing": ("absent", [], "checkpoint not found"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_every_import_mistake_is_one_line(tmp_path: Path, case: str) -> None:
    name, change, says = MISTAKES[case]
    official_save(tmp_path / "ft", official_vit().state_dict())
    official_save(tmp_path / "pre", tiny_dmae().official_state_dict())
    save_classifier(tmp_path / "clf")
    (tmp_path / "names").write_text("a\nb\nc\n")
    (tmp_path / "folder").mkdir()
    args = import_args(tmp_path / name, tmp_path / "out.pth")
    if change:
        flag, value = change
        at = args.index(flag) if flag in args else len(args)
        del args[at : at + 2]
        if value is not None:
            args += [flag, tmp_path / value if value in ("ft", "names", "folder") else value]
    line = one_line_error(cli(*args))
    assert says in line
    assert not (tmp_path / "out.pth").exists()


def test_import_help_has_examples() -> None:
    result = runner.invoke(app, ["import", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    for text in ("Examples", "dmae import", "--mean", "dmae certify", "--checkpoint"):
        assert text in result.output


def test_a_checkpoint_named_by_a_short_relative_path_is_certified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dmae certify --checkpoint clf.pth` in the model's folder: the run-directory guess for a
    found model (runs/<name>/finetune/sigma-<s>/) ran even for a named one, IndexError: 3."""
    official_save(tmp_path / "ft.pth", official_vit().state_dict())
    made = cli(*import_args(tmp_path / "ft.pth", tmp_path / "clf.pth", "--dataset", "digits"))
    assert made.exit_code == 0, made.output
    monkeypatch.chdir(tmp_path)
    result = cli(
        "certify", "--checkpoint", "clf.pth", "--sigma", 0.5, "--n0", 8, "--n", 16,
        "--max-examples", 1, "--out", "cert",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cert" / "sigma-0.5.tsv").is_file()
