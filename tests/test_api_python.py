"""The Python API: `from dmae_cli import Smoothed, load_classifier`.

Its names, a cheap `import dmae_cli`, the image forms it takes, the same answers as
`dmae certify` given the same noise, and mistakes as one `UserError`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmae_cli
from dmae_cli import ABSTAIN, Certificate, Smoothed, UserError, load_classifier
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.smoothing.noise import example_generator
from tests.conftest import save_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def smoothed(model: Path) -> Smoothed:
    return Smoothed(load_classifier(model, device="cpu"), batch_size=64)


def test_the_public_names_and_their_version() -> None:
    assert dmae_cli.API_VERSION == 1
    for name in dmae_cli.__all__:
        assert getattr(dmae_cli, name) is not None, name
    assert dmae_cli.ABSTAIN == -1 and dmae_cli.Certificate is Certificate
    with pytest.raises(AttributeError, match="no attribute 'Smoothd'"):
        _ = dmae_cli.Smoothd  # type: ignore[attr-defined]


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, dmae_cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_image_forms_give_the_same_answers(smoothed: Smoothed) -> None:
    """(C, H, W), (N, C, H, W), a list, and a PIL image of the same pixels."""
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 1, 16, 16)))
    images = pixels.float() / 255  # 8-bit values: a PNG holds them exactly
    batch = smoothed.predict(images, n=200)
    assert batch == smoothed.predict(list(images), n=200)
    assert [smoothed.predict(x, n=200)[0] for x in images] == batch
    picture = Image.fromarray(pixels[1, 0].numpy().astype(np.uint8))
    assert smoothed.predict(picture, n=200) == batch[1:2]
    assert smoothed.predict(images, n=200) == batch  # again: the same noise


def test_certify_gives_dmae_certify_rows_with_its_noise(
    smoothed: Smoothed, model: Path, tiny_recipe
) -> None:
    recipe = tiny_recipe(
        f"certify.checkpoint={model}",
        "certify.sigma=[0.5]",
        "certify.n=100",
        "certify.n0=10",
        "certify.batch_size=64",
        "certify.max_examples=16",
        "certify.together=8",
        "device=cpu",
        "seed=3",
    )
    [result] = run_certify(recipe)
    from dmae_cli.data.loading import load_dataset

    test = load_dataset(recipe, "test", augment=False)
    images = [test[i][0] for i in range(16)]
    noise = [example_generator(3, i, torch.device("cpu")) for i in range(16)]
    certs = smoothed.certify(images, n0=10, n=100, noise=noise)
    assert [c.prediction for c in certs] == [r.predict for r in result.rows]
    assert [c.radius for c in certs] == pytest.approx([r.radius for r in result.rows], abs=1e-12)
    assert any(c.radius > 0 for c in certs) and all(isinstance(c, Certificate) for c in certs)


def test_predict_abstains_or_names_a_class(smoothed: Smoothed) -> None:
    labels = smoothed.predict(torch.rand(4, 1, 16, 16), n=100, alpha=0.001)
    assert all(label == ABSTAIN or 0 <= label < 10 for label in labels)
    names = [smoothed.classifier.class_name(label) for label in labels]
    assert all(name == "abstain" or name.isdigit() for name in names)


def test_sequential_certifier_by_name(smoothed: Smoothed) -> None:
    (cert,) = smoothed.certify(torch.rand(1, 16, 16), n0=10, n=500, certifier="sequential")
    assert cert.n <= 500


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.predict(torch.rand(3, 16, 16)), r"shape \(3, 16, 16\); this model takes \(1"),
        (lambda s: s.predict(torch.full((1, 16, 16), 1.5)), "values outside"),
        (lambda s: s.predict(torch.zeros(1, 16, 16, dtype=torch.uint8)), "give floats"),
        (lambda s: s.predict(np.zeros((1, 16, 16))), "a ndarray; give a tensor or a PIL image"),
        (lambda s: s.predict(torch.rand(1, 16, 16), n=0), "certify.n: expected a number > 0"),
        (lambda s: s.certify(torch.rand(1, 16, 16), certifier="x"), "unknown certifier 'x'"),
        (lambda s: s.predict(torch.rand(2, 1, 16, 16), noise=[]), "0 generators for 2 images"),
    ],
)
def test_mistakes_are_one_user_error(smoothed: Smoothed, call, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call(smoothed)


def test_load_classifier_refuses_what_is_no_classifier(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "plain.pth")
    with pytest.raises(UserError, match="not a dmae checkpoint"):
        load_classifier(tmp_path / "plain.pth")
    with pytest.raises(UserError, match="sigma"):
        Smoothed(load_classifier(save_classifier(tmp_path / "c.pth")), sigma=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda(model: Path) -> None:
    smoothed = Smoothed(load_classifier(model, device="cuda"))
    labels = smoothed.predict(torch.rand(2, 1, 16, 16), n=200)
    assert smoothed.classifier.device.type == "cuda" and len(labels) == 2


def test_an_imported_classifier_is_smoothed_like_a_fine_tuned_one(tmp_path: Path) -> None:
    """`dmae import` of an official fine-tuned file: the API and `dmae predict` take it."""
    from typer.testing import CliRunner

    from dmae_cli.cli.app import app
    from tests.test_import import import_args, official_save, official_vit

    vit = official_vit()
    source = official_save(tmp_path / "official-ft.pth", vit.state_dict())
    out = tmp_path / "imported.pth"
    runner = CliRunner()
    imported = runner.invoke(app, [str(a) for a in import_args(source, out)])
    assert imported.exit_code == 0, imported.output
    classifier = load_classifier(out, device="cpu")
    image = torch.rand(1, 16, 16)
    with torch.no_grad():  # the base classifier is the official model, normalisation included
        expected = vit((image[None] - 0.3) / 0.4)
        assert torch.allclose(classifier.model(image[None]), expected, atol=1e-5)
    smoothed = Smoothed(classifier)
    assert smoothed.sigma == 0.5
    np.save(tmp_path / "x.npy", image.numpy())
    answered = runner.invoke(app, ["predict", str(tmp_path / "x.npy"), "-c", str(out), "--tsv"])
    assert answered.exit_code == 0, answered.output
    label = int(answered.stdout.splitlines()[1].split("\t")[1])
    assert smoothed.predict(image, n=1000) == [label]
