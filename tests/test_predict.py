"""`dmae predict`: repeatable answers, agreement with `dmae certify`, bad files, the outputs.

A tiny random classifier of the digits shape (tests/conftest.py) stands in for a fine-tuned one;
n is a few hundred samples, so each command takes about a second.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.config.recipe import load_recipe
from dmae_cli.data.images import fit, image_files, read_image
from dmae_cli.data.loading import load_dataset
from dmae_cli.runtime.errors import UserError
from tests.conftest import TINY_OVERRIDES, one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
FAST = ["--n", "200", "--n0", "20", "--device", "cpu"]


def predict(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["predict", *args], env=env)


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """Three PNG files: a digits test image, a larger RGB one, a 16-bit grayscale one."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    digit = load_recipe("recipes/digits.yaml")
    image = load_dataset(digit, "test", augment=False)[0][0]
    gray = (image[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(gray).save(folder / "digit.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / "rgb.png")
    deep = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    return folder


def test_the_same_images_give_the_same_output_every_run(model: Path, pictures: Path) -> None:
    args = [str(pictures), "--checkpoint", str(model), "--certify", "--json", *FAST]
    first, second = predict(*args), predict(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    answers = json.loads(first.stdout)["images"]
    assert [Path(a["file"]).name for a in answers] == ["deep.png", "digit.png", "rgb.png"]
    # the same picture twice in one call: its noise depends on its pixels, not its position
    twice = predict(str(pictures / "digit.png"), str(pictures / "digit.png"), *args[1:])
    one, other = json.loads(twice.stdout)["images"]
    assert (one["label"], one["radius"]) == (other["label"], other["radius"])


def test_certify_agrees_with_dmae_certify_on_100_digits(
    model: Path, tmp_path: Path, tiny_recipe
) -> None:
    """With the noise `dmae certify` draws (--noise-seed), predict --certify gives its rows."""
    recipe = tiny_recipe()
    test = load_dataset(recipe, "test", augment=False)
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    for idx in range(100):  # .npy: the exact float pixels certify sees (a PNG rounds them)
        np.save(arrays / f"{idx:03d}.npy", test[idx][0].numpy())
    settings = ["--n", "100", "--n0", "10", "--batch-size", "64", "--certifier", "cohen"]
    out = tmp_path / "certified"
    certify = ["certify", "recipes/digits.yaml", "--sigma", "0.5", "--checkpoint", str(model)]
    certify += [*settings, "--max-examples", "100", "--seed", "7", "--out", str(out)]
    certify += ["--set", "certify.together=8", "--set", "device=cpu"]
    certified = runner.invoke(app, certify)
    assert certified.exit_code == 0, certified.output
    rows = [line.split("\t") for line in (out / "sigma-0.5.tsv").read_text().splitlines()[1:]]
    answered = predict(
        str(arrays), "-c", str(model), "--certify", "--tsv", "--noise-seed", "7", *settings
    )
    assert answered.exit_code == 0, answered.output
    lines = [line.split("\t") for line in answered.stdout.splitlines()[1:]]
    assert len(lines) == len(rows) == 100
    for row, line in zip(rows, lines, strict=True):  # idx label predict radius ...
        assert int(line[1]) == int(row[2]), (row, line)
        assert float(line[3]) == pytest.approx(float(row[3]), abs=1e-12), (row, line)
    assert any(float(row[3]) > 0 for row in rows)  # not only abstentions


def test_bad_files_are_one_line_each_and_the_others_are_answered(
    model: Path, pictures: Path, tmp_path: Path
) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 16, 16), dtype=np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = [tmp_path / n for n in ("broken.png", "wrong.npy", "objects.npy", "missing.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    good = pictures / "digit.png"
    result = predict(str(good), *map(str, bad), str(empty), "-c", str(model), "--tsv", *FAST)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, result.stderr
    assert "Traceback" not in result.output
    for path in [*bad, empty]:
        assert any(str(path) in line for line in errors), (path, errors)
    rows = result.stdout.splitlines()
    assert rows[0] == "file\tlabel\tprediction" and rows[1].startswith(f"{good}\t")
    assert len(rows) == 2


def test_json_and_table_outputs(model: Path, pictures: Path, tmp_path: Path) -> None:
    long = tmp_path / ("a-file-name-much-longer-than-a-terminal-of-eighty-columns-" * 2 + ".png")
    long.write_bytes((pictures / "digit.png").read_bytes())
    table = predict(str(long), "-c", str(model), "--certify", *FAST, env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert str(long) in table.stdout  # on one line, whole
    assert "radius" in table.stdout and "pA lower" in table.stdout
    document = json.loads(predict(str(long), "-c", str(model), "--json", *FAST).stdout)
    assert document["sigma"] == 0.5 and document["n"] == 200 and document["failed"] == []
    (entry,) = document["images"]
    assert entry["prediction"] == ("abstain" if entry["label"] == -1 else str(entry["label"]))
    assert "radius" not in entry  # prediction only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json", "--tsv"], "--json and --tsv: choose one output format"),
        (["--n", "0"], "certify.n: expected a number > 0, got 0"),
        (["--alpha", "2"], "certify.alpha: expected a number in (0.0, 1.0), got 2"),
        (["--certifier", "nope"], "unknown certifier 'nope'"),
        (["--sigma", "-1"], "certify.sigma: expected one or more numbers > 0"),
        (["--first-index", "-1"], "--first-index -1: an example index is 0 or more"),
        (["--device", "tpu"], "device: unknown device 'tpu'"),
    ],
)
def test_mistakes_are_one_line(model: Path, pictures: Path, args: list[str], message: str) -> None:
    result = predict(str(pictures / "digit.png"), "-c", str(model), "--device", "cpu", *args)
    assert message in one_line_error(result)


def test_a_checkpoint_that_is_no_classifier_is_one_line(pictures: Path, tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "plain.pth")
    result = predict(str(pictures), "-c", str(tmp_path / "plain.pth"))
    assert "not a dmae checkpoint" in one_line_error(result)


def test_help_has_examples() -> None:
    result = predict("--help", env={"COLUMNS": "120"})
    assert result.exit_code == 0
    for text in ("dmae predict digit.png --checkpoint", "--certify", "--noise-seed", "--tsv"):
        assert text in result.stdout


def test_pictures_are_converted_to_the_model_channels_and_side(pictures: Path) -> None:
    rgb = read_image(pictures / "rgb.png", 1, 16)  # RGB 30x40 -> grayscale, crop of a resize
    assert rgb.shape == (1, 16, 16) and rgb.min() >= 0 and rgb.max() <= 1
    deep = read_image(pictures / "deep.png", 3, 16)  # 16 bits -> [0, 1], repeated to RGB
    raw = np.asarray(Image.open(pictures / "deep.png"), dtype=np.float64) / 65535
    assert torch.allclose(deep[2].double(), torch.from_numpy(raw), atol=1e-6)
    assert image_files([pictures]) == sorted(pictures.iterdir())


def test_fit_resizes_the_shorter_side_and_crops_the_centre() -> None:
    ramp = torch.linspace(0, 1, 400).expand(1, 300, 400).contiguous()
    assert fit(ramp, 224).shape == (1, 224, 224)  # ImageNet: to 256 on the short side, crop
    resized = torch.nn.functional.interpolate(
        ramp[None], (256, 341), mode="bicubic", antialias=True
    )
    left = (341 - 224) // 2
    assert torch.allclose(fit(ramp, 224), resized[0, :, 16:240, left : left + 224].clamp(0, 1))
    square = torch.rand(1, 8, 8)
    assert fit(square, 8) is square  # the model's side: used as it is
    small = fit(torch.rand(3, 20, 40), 16)  # a small model: short side to 16, centre crop
    assert small.shape == (3, 16, 16)


def test_read_image_names_the_problem(tmp_path: Path) -> None:
    np.save(tmp_path / "loud.npy", np.full((1, 16, 16), 2.0, dtype=np.float32))
    with pytest.raises(UserError, match="values outside"):
        read_image(tmp_path / "loud.npy", 1, 16)
    np.save(tmp_path / "ints.npy", np.zeros((1, 16, 16), dtype=np.int64))
    with pytest.raises(UserError, match="expected an array of floats"):
        read_image(tmp_path / "ints.npy", 1, 16)


def test_round_trip_from_an_official_checkpoint_to_the_report(
    tmp_path: Path, pictures: Path
) -> None:
    """An official-layout pre-training file (with its argparse args) -> dmae finetune --init ->
    dmae certify -> dmae predict on three PNG files -> dmae report, each a command."""
    from dmae_cli.training.pretrain import build_dmae

    tiny = [*TINY_OVERRIDES, f"runs_dir={tmp_path / 'runs'}", "device=cpu"]
    recipe = load_recipe("recipes/digits.yaml", tiny)
    torch.manual_seed(0)
    dmae = build_dmae(recipe, load_dataset(recipe, "train", augment=False).info)
    official = tmp_path / "checkpoint-399.pth"
    args = argparse.Namespace(model="mae_vit_tiny_patch4", blr=1.5e-4, mask_ratio=0.75)
    torch.save({"model": dmae.official_state_dict(), "epoch": 399, "args": args}, official)
    sets = [item for s in tiny for item in ("--set", s)]
    short = ["--set", "finetune.epochs=1", "--set", "finetune.warmup_epochs=0"]
    finetune = ["finetune", "recipes/digits.yaml", "--sigma", "0.5", "--init", str(official)]
    tuned = runner.invoke(app, [*finetune, *sets, *short])
    assert tuned.exit_code == 0, tuned.output
    assert "loaded" in tuned.stderr and "tensors from" in tuned.stderr
    certify = ["certify", "recipes/digits.yaml", "--sigma", "0.5", "--n", "50", "--n0", "10"]
    certified = runner.invoke(app, [*certify, "--max-examples", "6", *sets])
    assert certified.exit_code == 0, certified.output
    model = tmp_path / "runs" / "digits" / "finetune" / "sigma-0.5" / "best.pth"
    answered = predict(str(pictures), "-c", str(model), "--certify", "--json", *FAST)
    assert answered.exit_code == 0, answered.output
    assert len(json.loads(answered.stdout)["images"]) == 3
    reported = runner.invoke(app, ["report", str(tmp_path / "runs" / "digits")])
    assert reported.exit_code == 0, reported.output
    assert "certified accuracy" in reported.stdout and "σ=0.5" in reported.stdout
