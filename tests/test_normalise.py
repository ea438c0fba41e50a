"""`model.normalize`: the statistics a model normalises with, and one line when they are not
those its starting weights were trained under (timm's augreg ViTs expect 0.5, the official
DMAE/MAE weights ImageNet's, a dmae checkpoint records its own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmae_cli.api import DatasetInfo
from dmae_cli.config.reading import RecipeError
from dmae_cli.models import normalise
from dmae_cli.models.spec import ModelSpec
from dmae_cli.runtime.errors import UserError
from tests.conftest import save_classifier

DIGITS = DatasetInfo(10, 16, 1, (0.3,), (0.4,), tuple("0123456789"), "hash")
RGB = DatasetInfo(10, 32, 3, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(normalise.ui, "info", lines.append)
    monkeypatch.setattr(normalise, "_SAID", set())
    monkeypatch.setattr(normalise, "_PENDING", {})
    return lines


def dmae_checkpoint(path: Path, mean: float, std: float) -> Path:
    """A dmae checkpoint (weights + description) trained on inputs normalised so."""
    save_classifier(path)
    state = torch.load(path, weights_only=True)
    state["meta"] |= {"mean": [mean], "std": [std]}
    torch.save(state, path)
    return path


def test_the_data_sets_statistics_warn_once_when_the_checkpoint_had_others(
    tmp_path: Path, said: list[str]
) -> None:
    init = dmae_checkpoint(tmp_path / "init.pth", 0.5, 0.5)
    assert normalise.model_statistics("data", DIGITS, init) == ((0.3,), (0.4,))
    assert said == []  # not before its weights have loaded: a failure is one line alone
    normalise.announce(init)
    normalise.model_statistics("data", DIGITS, init)  # every sigma's classifier asks again
    normalise.announce(init)
    assert len(said) == 1 and said[0].startswith("warning: ")
    assert "mean (0.5), std (0.5)" in said[0] and "model.normalize: data" in said[0]
    same = dmae_checkpoint(tmp_path / "same.pth", 0.3, 0.4)
    normalise.model_statistics("data", DIGITS, same)
    normalise.announce(same)
    assert len(said) == 1  # nothing to say


def test_checkpoint_keeps_the_checkpoints_statistics(tmp_path: Path, said: list[str]) -> None:
    init = dmae_checkpoint(tmp_path / "init.pth", 0.5, 0.25)
    assert normalise.model_statistics("checkpoint", DIGITS, init) == ((0.5,), (0.25,))
    assert said == []


def test_foreign_weights_record_nothing(tmp_path: Path, said: list[str]) -> None:
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, tmp_path / "timm.pth")
    with pytest.raises(UserError, match="timm.pth records no input statistics"):
        normalise.model_statistics("checkpoint", RGB, tmp_path / "timm.pth")
    with pytest.raises(UserError, match="there is no init checkpoint"):
        normalise.model_statistics("checkpoint", RGB, None)
    assert normalise.model_statistics("inception", RGB, tmp_path / "timm.pth") == (
        (0.5,) * 3,
        (0.5,) * 3,
    )
    assert said == []
    normalise.model_statistics("data", RGB, tmp_path / "timm.pth")
    normalise.announce(tmp_path / "timm.pth")
    assert len(said) == 1 and "records no input statistics" in said[0]
    assert "inception (timm's augreg ViTs, 0.5)" in said[0]


def test_named_statistics_need_three_channels() -> None:
    with pytest.raises(UserError, match="imagenet gives 3 channel statistics, the data has 1"):
        normalise.model_statistics("imagenet", DIGITS, None)


def test_the_recipe_key_reaches_both_models(tiny_recipe, tmp_path: Path, said: list[str]) -> None:
    """The classifier's description and the pre-training DMAE's adapter follow it."""
    from dmae_cli.training.pretrain import build_dmae

    init = dmae_checkpoint(tmp_path / "init.pth", 0.5, 0.25)
    recipe = tiny_recipe("model.normalize=checkpoint", f"finetune.init={init}")
    spec = ModelSpec.for_finetune(recipe, DIGITS, DIGITS, 0.5, init=str(init))
    assert spec.mean == (0.5,) and spec.std == (0.25,)
    recipe = tiny_recipe("model.normalize=checkpoint", f"pretrain.init={init}")
    adapter = build_dmae(recipe, DIGITS).adapter
    assert adapter.mean.flatten().tolist() == [0.5] and adapter.std.flatten().tolist() == [0.25]
    plain = build_dmae(tiny_recipe(), DIGITS).adapter
    assert plain.mean.flatten().tolist() == pytest.approx([0.3])


def test_an_unknown_choice_is_one_line(tiny_recipe) -> None:
    with pytest.raises((RecipeError, UserError), match="model.normalize"):
        tiny_recipe("model.normalize=imagnet")
