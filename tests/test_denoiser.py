"""Denoised smoothing: a DMAE without a mask as the denoiser D in front of a classifier f
trained on clean images, certified as f(D(x + noise)) (`models/denoiser.py`,
`smoothing/denoising.py`, `dmae certify --denoiser`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dmae_cli.api import CertifyRequest, DatasetInfo, simulate
from dmae_cli.cli.app import app
from dmae_cli.config.recipe import Recipe, load_recipe
from dmae_cli.data.loading import load_dataset
from dmae_cli.models.classifier import Classifier, load_classifier
from dmae_cli.models.denoiser import Denoised, Denoiser, load_denoiser
from dmae_cli.models.dmae import DMAE, unpatchify
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.smoothing.denoising import LoadedDenoiser
from dmae_cli.smoothing.drive import counts_of
from dmae_cli.smoothing.estimate import estimate_certify
from dmae_cli.smoothing.jobs import build_sampler
from dmae_cli.training.pretrain import run_pretrain
from dmae_plugins.certifiers.cohen import Cohen
from tests.conftest import TINY_OVERRIDES, one_line_error, save_classifier
from tests.test_import import official_vit
from tests.test_models import tiny_dmae

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
SMALL = ["certify.n=40", "certify.n0=10", "certify.batch_size=32", "certify.max_examples=3"]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dmae_meta(dmae: DMAE, **changes: Any) -> dict[str, Any]:
    """The self-description `dmae pretrain` writes for `tiny_dmae`'s model."""
    adapter = dmae.adapter
    return {
        "backbone": "vit_tiny",
        "backbone_options": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": adapter.model_size,
        "patch_size": 4,
        "input_size": adapter.input_size,
        "channels": 1,
        "mean": adapter.mean.flatten().tolist(),
        "std": adapter.std.flatten().tolist(),
        "num_classes": 10,
        "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "norm_pix_loss": dmae.norm_pix_loss,
        "dataset": "digits",
        "stage": "pretrain",
        **changes,
    }


def save_dmae(
    path: Path, input_size: int = 16, model_size: int = 16, seed: int = 0, **changes: Any
) -> Path:
    """A tiny DMAE checkpoint as `dmae pretrain` writes one; `changes` edit its meta."""
    torch.manual_seed(seed)
    dmae = tiny_dmae(input_size, model_size, norm_pix_loss=bool(changes.get("norm_pix_loss")))
    meta = dmae_meta(dmae, **changes)
    checkpoint.save_checkpoint(path, {"model": dmae.state_dict(), "meta": meta, "epoch": 1})
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DMAE really pre-trained on digits (five epochs, norm_pix_loss false as the recipe)."""
    runs = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(
        RECIPE,
        [
            *TINY_OVERRIDES,
            f"runs_dir={runs}",
            "device=cpu",
            "pretrain.epochs=5",
            "pretrain.warmup_epochs=1",
        ],
    )
    assert recipe.pretrain.norm_pix_loss is False
    return run_pretrain(recipe).run_dir / "last.pth"


def recipe(runs: Path, *overrides: str) -> Recipe:
    items = [f"runs_dir={runs}", "device=cpu", "certify.sigma=[0.5]", *SMALL, *overrides]
    return load_recipe(RECIPE, items)


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# -- the denoiser ------------------------------------------------------------------------------
def test_the_output_is_the_decoders_prediction_unnormalised_and_resized_back() -> None:
    torch.manual_seed(1)
    dmae = tiny_dmae(input_size=8, model_size=16).eval()  # mean 0.3, std 0.4; 8 -> 16 pixels
    denoiser = Denoiser(dmae, output_size=8)
    noisy = torch.rand(3, 1, 8, 8) + 0.5 * torch.randn(3, 1, 8, 8)
    before = torch.get_rng_state()
    with torch.no_grad():
        out = denoiser(noisy)
        again = denoiser(noisy)
    assert torch.equal(torch.get_rng_state(), before)  # draws nothing
    assert torch.equal(out, again) and out.shape == (3, 1, 8, 8)
    assert out.min() >= 0 and out.max() <= 1
    # By hand, through the pretraining path with nothing masked (shuffled, then restored):
    with torch.no_grad():
        latent, mask, ids = dmae.forward_encoder(dmae.adapter(noisy), 0.0)
        pred = dmae.forward_decoder(latent, ids)
    assert not mask.any()
    pixels = unpatchify(pred, 4, 1) * 0.4 + 0.3
    pixels = F.interpolate(pixels, size=(8, 8), mode="bicubic", antialias=True)
    assert torch.allclose(out, pixels.clamp(0, 1), atol=1e-5)
    assert (pixels < 0).any() or (pixels > 1).any() or pixels.std() > 0  # not a constant


def test_the_denoiser_is_differentiable_and_refuses_norm_pix_loss_models() -> None:
    denoiser = Denoiser(tiny_dmae(8, 16), 8)
    denoiser(torch.rand(2, 1, 8, 8)).square().sum().backward()
    grad = denoiser.dmae.encoder.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="norm_pix_loss"):
        Denoiser(tiny_dmae(8, 16, norm_pix_loss=True), 8)


@pytest.mark.parametrize("stage", ["pretrain", "denoiser"])
def test_load_denoiser_rebuilds_the_saved_dmae(tmp_path: Path, stage: str) -> None:
    path = save_dmae(tmp_path / "d.pth", 8, 16, stage=stage, tuned_for="ab" * 32)
    state = torch.load(path, weights_only=True)
    source = tiny_dmae(8, 16)
    source.load_state_dict(state["model"])
    denoiser, spec = load_denoiser(path)
    assert not denoiser.training and denoiser.output_size == 8 and spec.tuned_for == "ab" * 32
    noisy = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(denoiser(noisy), Denoiser(source.eval(), 8)(noisy))


LOAD_MISTAKES = {
    "foreign": ({"meta": None}, "not a dmae checkpoint (no self-description)"),
    "classifier": ({"stage": "finetune"}, "a classifier (finetune) checkpoint, not a denoiser"),
    "norm-pix": ({"norm_pix_loss": True}, "cannot denoise; pre-train with 'pretrain.norm_pix"),
    "unsaid": ({"norm_pix_loss": None}, "does not say whether it was pre-trained with norm_pix"),
    "stage": ({"stage": "shard"}, "a shard checkpoint; expected a DMAE"),
    "decoder": ({"decoder": None}, "lacks decoder in its meta"),
}


@pytest.mark.parametrize("case", list(LOAD_MISTAKES))
def test_what_cannot_denoise_is_one_line(tmp_path: Path, case: str) -> None:
    changes, message = LOAD_MISTAKES[case]
    path = save_dmae(tmp_path / "d.pth")
    state = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "meta":
            del state["meta"]
        elif value is None:
            del state["meta"][key]
        else:
            state["meta"][key] = value
    torch.save(state, path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_denoiser(path)


def test_a_classifier_of_another_size_behind_the_denoiser_is_one_line(tmp_path: Path) -> None:
    path = save_dmae(tmp_path / "d.pth", 8, 16, dataset="tiny8")
    info = DatasetInfo(10, 8, 1, (0.3,), (0.4,))
    denoiser = LoadedDenoiser.load(path, torch.device("cpu"), info, "tiny8")
    clf = save_classifier(tmp_path / "clf.pth", sigma=0.0)
    model, spec = load_classifier(clf)
    with pytest.raises(UserError, match=r"takes 1x16x16 images, but the denoiser .* 1x8x8"):
        denoiser.before(model, spec, clf)


# -- noise lands before the denoiser ----------------------------------------------------------
def test_noise_is_added_before_the_denoiser_and_the_classifier_gets_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    dmae = save_dmae(tmp_path / "d.pth", 16, 32)
    seen: dict[str, list[torch.Tensor]] = {"in": [], "out": [], "classifier": []}
    denoise, classify = Denoiser.forward, Classifier.forward

    def spy_denoiser(self: Denoiser, noisy: torch.Tensor) -> torch.Tensor:
        out = denoise(self, noisy)
        seen["in"].append(noisy.detach().clone())
        seen["out"].append(out.detach().clone())
        return out

    def spy_classifier(self: Classifier, pixels: torch.Tensor) -> torch.Tensor:
        seen["classifier"].append(pixels.detach().clone())
        return classify(self, pixels)

    monkeypatch.setattr(Denoiser, "forward", spy_denoiser)
    monkeypatch.setattr(Classifier, "forward", spy_classifier)
    cfg = recipe(
        runs, f"certify.checkpoint={clean}", f"certify.denoiser={dmae}",
        "certify.max_examples=1", "certify.n=400", "certify.parallel=1",
    )  # fmt: skip
    [result] = run_certify(cfg)
    assert result.tsv.parent.name == "certify-denoised"
    image = load_dataset(cfg, "test", augment=False)[0][0]
    noisy = torch.cat(seen["in"])
    assert noisy.shape[0] == 410  # n0 + n copies, each through the denoiser once
    spread = noisy - image
    assert abs(spread.std().item() - 0.5) < 0.02 and abs(spread.mean().item()) < 0.02
    assert torch.equal(torch.cat(seen["classifier"]), torch.cat(seen["out"]))


# -- dmae certify --denoiser ------------------------------------------------------------------
def test_certify_through_a_pretrained_denoiser_end_to_end(tmp_path: Path, pretrained: Path) -> None:
    runs = tmp_path / "runs"
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    args = [RECIPE, "--set", f"runs_dir={runs}", "--checkpoint", clean, "--sigma", 0.25]
    args += ["--n0", 10, "--n", 40, "--max-examples", 3, "--batch-size", 32]
    args += ["--denoiser", pretrained]
    result = cli("certify", *args)
    assert result.exit_code == 0, result.output
    tsv = runs / "digits" / "certify-denoised" / "sigma-0.25.tsv"
    assert len(tsv.read_text().splitlines()) == 4
    assert not (runs / "digits" / "certify").exists()  # never mixed with f alone
    header = json.loads(tsv.with_suffix(".json").read_text())
    assert header["checkpoint_sha256"] == checkpoint.file_sha256(clean)
    assert header["denoiser_sha256"] == checkpoint.file_sha256(pretrained)
    assert header["denoiser"] == str(pretrained) and header["denoiser_tuned_for"] is None
    assert header["classifier_sigma"] == 0.0
    again = cli("certify", *args)  # resumes: nothing left
    assert again.exit_code == 0, again.output
    other = tmp_path / "other.pth"
    state = torch.load(pretrained, weights_only=True)
    state["model"]["decoder_pred.bias"] += 0.01
    torch.save(state, other)
    changed = cli("certify", *args[:-1], other)
    line = one_line_error(changed)
    sha = checkpoint.file_sha256(pretrained)[:12]
    assert f"holds results certified through the denoiser of sha256 {sha}..., this run" in line
    alone = cli("certify", *args[:-2], "--out", tsv.parent)  # f alone, into D's results
    assert alone.exit_code == 2 and "Traceback" not in alone.output
    assert "this run is without a denoiser" in alone.stderr.strip().splitlines()[-1]


def test_estimate_times_the_denoiser_in_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    dmae = save_dmae(tmp_path / "d.pth")
    calls: list[int] = []
    denoise = Denoiser.forward

    def counted(self: Denoiser, noisy: torch.Tensor) -> torch.Tensor:
        calls.append(noisy.shape[0])
        return denoise(self, noisy)

    monkeypatch.setattr(Denoiser, "forward", counted)
    cfg = recipe(tmp_path / "runs", f"certify.checkpoint={clean}", f"certify.denoiser={dmae}")
    [estimate] = estimate_certify(cfg, seconds=0.2)
    assert estimate.throughput is not None and sum(calls) >= estimate.throughput.copies
    assert estimate.tsv.parent.name == "certify-denoised"


def test_a_run_without_a_denoiser_written_before_denoisers_still_resumes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    clf = save_classifier(tmp_path / "clf.pth", sigma=0.5)
    [first] = run_certify(recipe(runs, f"certify.checkpoint={clf}"))
    header = json.loads(first.header.read_text())
    for key in ("denoiser", "denoiser_sha256", "denoiser_tuned_for", "classifier_sigma"):
        del header[key]
    first.header.write_text(json.dumps(header))
    [again] = run_certify(recipe(runs, f"certify.checkpoint={clf}"))
    assert again.certified_now == 0 and len(again.rows) == 3


def test_notes_say_what_each_model_was_trained_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    run_certify(recipe(runs, f"certify.checkpoint={clean}", "certify.max_examples=1"))
    said = " ".join(capsys.readouterr().err.split())
    assert "is a clean classifier (trained without noise), certifying at sigma 0.5" in said
    dmae = save_dmae(tmp_path / "d.pth", noise_levels=[0.25])
    run_certify(
        recipe(runs, f"certify.checkpoint={clean}", f"certify.denoiser={dmae}",
               "certify.max_examples=1")
    )  # fmt: skip
    said = " ".join(capsys.readouterr().err.split())
    assert "clean classifier" not in said
    assert "trained to remove noise of sigma 0.25, certifying at 0.5" in said


def test_a_denoiser_tuned_for_another_classifier_is_noted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tuned for one file, certified in front of another: said, and the header tells the report
    (which then does not call it tuned for this classifier)."""
    runs = tmp_path / "runs"
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    for tuned_for, noted in ((checkpoint.file_sha256(clean), False), ("ab" * 32, True)):
        dmae = save_dmae(tmp_path / f"{noted}.pth", stage="denoiser", tuned_for=tuned_for)
        out = tmp_path / f"out-{noted}"
        sets = [f"certify.checkpoint={clean}", f"certify.denoiser={dmae}"]
        run_certify(recipe(runs, *sets, "certify.max_examples=1"), out=out)
        said = " ".join(capsys.readouterr().err.split())
        assert ("was tuned for another classifier (sha256 abababababab...)" in said) is noted
        header = json.loads(next(out.glob("sigma-*.json")).read_text())
        assert header["denoiser_tuned_for"] == tuned_for
        assert (header["checkpoint_sha256"] == tuned_for) is not noted


CLI_MISTAKES = {
    "norm-pix-loss": "cannot denoise; pre-train with 'pretrain.norm_pix_loss: false'",
    "classifier": "a classifier (finetune) checkpoint, not a denoiser",
    "size": "the denoiser takes 1x8x8 images, but dataset 'digits' has 1x16x16 images",
}


@pytest.mark.parametrize("case", list(CLI_MISTAKES))
def test_certify_denoiser_mistakes_are_one_line(tmp_path: Path, case: str) -> None:
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    if case == "classifier":
        denoiser = save_classifier(tmp_path / "noisy.pth", sigma=0.25)
    else:
        sizes = (8, 16) if case == "size" else (16, 16)
        denoiser = save_dmae(tmp_path / "d.pth", *sizes, norm_pix_loss=case == "norm-pix-loss")
    result = cli(
        "certify", RECIPE, "--set", f"runs_dir={tmp_path}", "--checkpoint", clean,
        "--denoiser", denoiser, "--sigma", 0.25,
    )  # fmt: skip
    assert CLI_MISTAKES[case] in one_line_error(result)


def test_a_timm_classifier_imported_with_dmae_import_certifies_through_the_denoiser(
    tmp_path: Path,
) -> None:
    torch.save(official_vit().state_dict(), tmp_path / "timm.pth")
    made = cli(
        "import", tmp_path / "timm.pth", "--out", tmp_path / "clf.pth", "--sigma", 0,
        "--mean", "0.3", "--std", "0.4", "--backbone", "vit_tiny", "--option", "num_heads=2",
        "--dataset", "digits",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    dmae = save_dmae(tmp_path / "d.pth", 16, 32)
    result = cli(
        "certify", "--checkpoint", tmp_path / "clf.pth", "--denoiser", dmae, "--sigma", 0.25,
        "--n0", 8, "--n", 16, "--max-examples", 2, "--out", tmp_path / "cert",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "cert" / "sigma-0.25.tsv").read_text().splitlines()
    assert len(rows) == 3
    header = json.loads((tmp_path / "cert" / "sigma-0.25.json").read_text())
    assert header["classifier_sigma"] == 0.0 and header["denoiser_sha256"]


# -- the certificates of f∘D hold --------------------------------------------------------------
def test_certificates_of_the_composed_model_hold(tmp_path: Path, pretrained: Path) -> None:
    """pA_lower, a (1 - alpha) lower confidence bound, exceeds the true probability of the
    selected class at most about alpha of the time; a plug-in estimate far more often."""
    cfg = recipe(tmp_path, "certify.batch_size=500", "certify.parallel=1")
    data = load_dataset(cfg, "test", augment=False)
    denoiser, _ = load_denoiser(pretrained)
    clf, _ = load_classifier(save_classifier(tmp_path / "clean.pth", sigma=0.0))
    sampler = build_sampler(cfg, Denoised(denoiser, clf), 0.5, data.info, torch.device("cpu"))
    image, probs = _an_uncertain_image(sampler, data)
    alpha, trials, n = 0.1, 300, 50
    request = CertifyRequest(0.5, alpha, 10, n, (0.0,))
    over, plug_in = 0, 0
    for seed in range(trials):
        counts = Recorded(counts_of(sampler, image, torch.Generator().manual_seed(10_000 + seed)))
        cert = simulate(Cohen(), request, counts)
        truth = probs[int(counts.drawn[0].argmax())]  # of the class the n0 copies selected
        over += cert.extra["pa_lower"] > truth
        plug_in += cert.count_top / n > truth
    margin = 3 * (alpha * (1 - alpha) / trials) ** 0.5
    assert over / trials <= alpha + margin, (over, probs)
    assert plug_in / trials > 3 * alpha  # the test can tell a bound from an estimate


class Recorded:
    """A counts function that keeps what it answered."""

    def __init__(self, counts: Any) -> None:
        self.counts, self.drawn = counts, []

    def __call__(self, num: int) -> torch.Tensor:
        self.drawn.append(self.counts(num))
        return self.drawn[-1]


def _an_uncertain_image(sampler: Any, data: Any) -> tuple[torch.Tensor, np.ndarray]:
    """A test image whose top class under noise has a probability well inside (0, 1), and
    the class probabilities of f∘D there, from 20,000 noisy copies."""
    for idx in range(40):
        image = data[idx][0]
        counts = counts_of(sampler, image, torch.Generator().manual_seed(idx))(4000)
        if 0.3 < counts.max() / 4000 < 0.9:
            more = counts_of(sampler, image, torch.Generator().manual_seed(99))(20_000)
            return image, (more / 20_000).numpy()
    raise AssertionError("no test image of uncertain class under noise")


def test_the_pretrained_denoiser_removes_noise(pretrained: Path) -> None:
    """Even after one epoch, D(x + noise) is nearer x than x + noise is (a sanity check that
    the decoder's output is read as pixels, not as normalised values)."""
    cfg = load_recipe(RECIPE, ["device=cpu"])
    images = torch.stack([load_dataset(cfg, "test", augment=False)[i][0] for i in range(32)])
    denoiser, _ = load_denoiser(pretrained)
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = denoiser(noisy)
    assert (denoised - images).square().mean() < (noisy - images).square().mean()


def test_copies_of_a_checkpoint_are_one_denoiser(tmp_path: Path, pretrained: Path) -> None:
    """The header names the denoiser by content: a copy elsewhere resumes the same run."""
    runs = tmp_path / "runs"
    clean = save_classifier(tmp_path / "clean.pth", sigma=0.0)
    copy = tmp_path / "copy.pth"
    shutil.copy(pretrained, copy)
    run_certify(recipe(runs, f"certify.checkpoint={clean}", f"certify.denoiser={pretrained}"))
    [again] = run_certify(recipe(runs, f"certify.checkpoint={clean}", f"certify.denoiser={copy}"))
    assert again.certified_now == 0
