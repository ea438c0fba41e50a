"""`dmae demo`: the whole pipeline end to end, shrunk to seconds; the recipe it finds."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.cli.demo import PACKAGED_RECIPE, RECIPE, demo_recipe, find_recipe

from .conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_recipe_is_a_copy_of_the_digits_recipe() -> None:
    """The wheel ships dmae_cli/config/digits.yaml for `dmae demo` outside a checkout."""
    packaged = ROOT / "dmae_cli" / PACKAGED_RECIPE
    assert packaged.read_text() == (ROOT / RECIPE).read_text(), (
        "copy recipes/digits.yaml to dmae_cli/config/digits.yaml"
    )


def test_recipe_comes_from_the_working_directory_or_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert find_recipe() == RECIPE
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the copy inside the package
    found = find_recipe()
    assert found.is_file() and found.parent.name == "config"
    recipe = demo_recipe(overrides=[f"runs_dir={tmp_path}"])
    assert recipe.name == "digits-demo" and recipe.certify.sigma == (0.25, 0.5)


def test_demo_runs_every_stage_and_ends_with_a_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    tiny = [
        *TINY_OVERRIDES,
        f"runs_dir={tmp_path}",
        "pretrain.epochs=1",
        "pretrain.reconstructions=2",
        "pretrain.sigma=[0.25, 0.5]",  # one DMAE for both sigmas
        "finetune.epochs=1",
        "certify.n0=4",
        "certify.n=16",
        "certify.batch_size=16",
        "certify.max_examples=3",
    ]
    args = ["demo"] + [item for override in tiny for item in ("--set", override)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for stage in ("1/4 pretrain", "2/4 finetune", "3/4 certify", "4/4 report"):
        assert stage in result.stderr
    assert "sigma 0.25, 0.5, mask" in result.stderr  # not the tuple's repr
    assert "σ=0.25" in result.stdout and "best (σ)" in result.stdout  # the report table
    run = tmp_path / "digits-demo"
    assert (run / "report" / "curves.png").is_file() and (run / "report" / "report.md").is_file()
    assert f"curves: {run / 'report' / 'curves.png'} (and .pdf)" in result.stderr
    assert f"reconstructions: {run / 'pretrain' / 'reconstructions.png'}" in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # one line, however wide the terminal
    assert last.startswith("demo finished in ") and "at radius 0.5 for sigma 0.5" in last
    assert last.endswith(f"outputs in {run}/")
