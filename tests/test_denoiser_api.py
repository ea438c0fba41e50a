"""A denoiser in front of the classifier from Python (`load_classifier(path, denoiser=...)`) and
from `dmae predict --denoiser`: the answers `dmae certify --denoiser` gives, row for row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmae_cli import Smoothed, load_classifier
from dmae_cli.cli.app import app
from dmae_cli.config.recipe import load_recipe
from dmae_cli.data.loading import load_dataset
from dmae_cli.models.denoiser import Denoised
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.smoothing.noise import example_generator
from tests.conftest import one_line_error, save_classifier
from tests.test_denoiser import RECIPE, save_dmae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """A clean classifier whose head leans to 3 and 5, and a DMAE at the digits' sides."""
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    state = torch.load(clean, weights_only=True)
    state["model"]["vit.head.bias"][[3, 5]] = torch.tensor([1.0, 0.8])
    torch.save(state, clean)
    return clean, save_dmae(tmp_path / "dmae.pth", 16, 32)


def test_the_python_api_certifies_the_rows_dmae_certify_writes(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    clean, dmae = models
    classifier = load_classifier(clean, device="cpu", denoiser=dmae)
    assert isinstance(classifier.model, Denoised) and classifier.denoiser == str(dmae)
    with pytest.raises(UserError, match="a clean classifier .* pass the noise level"):
        Smoothed(classifier)
    cfg = load_recipe(
        RECIPE,
        [
            f"runs_dir={tmp_path}", "device=cpu", "certify.sigma=[0.5]", "certify.n0=20",
            "certify.n=200", "certify.max_examples=3", f"certify.checkpoint={clean}",
            f"certify.denoiser={dmae}", "certify.batch_size=64",
        ],
    )  # fmt: skip
    [result] = run_certify(cfg)
    images = [load_dataset(cfg, "test", augment=False)[i][0] for i in range(3)]
    noise = [example_generator(0, i, torch.device("cpu")) for i in range(3)]
    smoothed = Smoothed(classifier, sigma=0.5, batch_size=64)
    certs = smoothed.certify(images, n0=20, n=200, noise=noise)
    for row, cert in zip(result.rows, certs, strict=True):
        assert (row.predict, row.count_top, row.radius) == (
            cert.prediction,
            cert.count_top,
            cert.radius,
        )


def test_predict_with_a_denoiser(tmp_path: Path, models: tuple[Path, Path]) -> None:
    clean, dmae = models
    digit = load_dataset(load_recipe(RECIPE), "test", augment=False)[0][0]
    picture = tmp_path / "digit.png"
    Image.fromarray((digit[0].numpy() * 255).round().astype(np.uint8)).save(picture)
    fast = ["--n", "200", "--device", "cpu", "-c", str(clean), "--denoiser", str(dmae)]
    unsure = runner.invoke(app, ["predict", str(picture), *fast])
    assert "is a clean classifier (trained without noise): give" in one_line_error(unsure)
    done = runner.invoke(app, ["predict", str(picture), *fast, "--sigma", "0.5", "--json"])
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    assert document["denoiser"] == str(dmae) and document["sigma"] == 0.5
    classifier = load_classifier(clean, device="cpu", denoiser=dmae)
    image = classifier.prepare(Image.open(picture))
    [expected] = Smoothed(classifier, sigma=0.5).predict(image, n=200)
    assert document["images"][0]["label"] == expected
    table = runner.invoke(app, ["predict", str(picture), *fast, "--sigma", "0.5"])
    assert f"behind the denoiser {dmae}" in " ".join(table.stdout.split())
    wrong = runner.invoke(app, ["predict", str(picture), *fast[:-1], str(clean), "--sigma", "1"])
    assert "a classifier (finetune) checkpoint, not a denoiser" in one_line_error(wrong)
