"""Training for denoised smoothing: a DMAE pre-trained on several noise levels, a clean
classifier (finetune sigma 0), and a denoiser tuned for a frozen classifier
(`dmae finetune --denoiser-for`).

Tiny models (width 32, depth 2) on digits, a few epochs each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import dmae_cli.training.denoiser as denoiser_module
import dmae_cli.training.pretrain as pretrain_module
from dmae_cli.cli.app import app
from dmae_cli.config.recipe import load_recipe
from dmae_cli.data.loading import load_dataset
from dmae_cli.models.classifier import load_classifier
from dmae_cli.models.denoiser import load_denoiser
from dmae_cli.runtime.checkpoint import load_checkpoint
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.augment import ConfigIgnoredWarning
from dmae_cli.training.denoiser import run_denoiser
from dmae_cli.training.finetune import evaluate, run_finetune
from dmae_cli.training.objective import Objective, build_objective
from dmae_cli.training.pretrain import add_noise, run_pretrain
from tests.conftest import TINY_OVERRIDES, as_torchrun_rank, one_line_error, save_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
LEVELS = (0.25, 0.5, 1.0)


# -- pre-training on several noise levels ------------------------------------------------------
def test_one_level_draws_the_noise_as_a_scalar_sigma_always_has() -> None:
    images = torch.rand(8, 1, 16, 16)
    torch.manual_seed(3)
    expected = images + 0.25 * torch.randn_like(images)
    for sigma in (0.25, (0.25,)):
        torch.manual_seed(3)
        assert torch.equal(add_noise(images, sigma), expected)


def test_several_levels_give_each_image_one_of_them() -> None:
    images = torch.zeros(600, 1, 16, 16)
    torch.manual_seed(0)
    noise = add_noise(images, LEVELS)
    stds = noise.flatten(1).std(dim=1)
    nearest = torch.tensor(LEVELS)[(stds[:, None] / torch.tensor(LEVELS)).log().abs().argmin(1)]
    assert torch.allclose(stds, nearest, rtol=0.25)  # each image's noise is one level's
    counts = [(nearest == s).sum().item() for s in LEVELS]
    assert all(150 <= c <= 250 for c in counts), counts  # uniform: 200 each


def test_pretraining_with_a_list_draws_from_it_and_records_it(tiny_recipe, monkeypatch) -> None:
    stds: list[torch.Tensor] = []

    def spy(images: torch.Tensor, sigma: float | tuple[float, ...]) -> torch.Tensor:
        noisy = add_noise(images, sigma)
        stds.append((noisy - images).flatten(1).std(dim=1))
        return noisy

    monkeypatch.setattr(pretrain_module, "add_noise", spy)
    recipe = tiny_recipe("pretrain.epochs=1", "pretrain.sigma=[0.25, 0.5, 1.0]")
    run_pretrain(recipe)
    seen = torch.cat(stds)
    levels = torch.tensor(LEVELS)
    nearest = levels[(seen[:, None] / levels).log().abs().argmin(1)]
    assert torch.allclose(seen, nearest, rtol=0.25)
    assert set(nearest.tolist()) == set(LEVELS)
    run = recipe.stage_dir("pretrain")
    assert load_checkpoint(run / "last.pth")["meta"]["noise_levels"] == list(LEVELS)
    assert yaml.safe_load((run / "config.yaml").read_text())["pretrain"]["sigma"] == list(LEVELS)


def test_a_scalar_sigma_is_recorded_as_one_level(tiny_recipe) -> None:
    recipe = tiny_recipe("pretrain.epochs=1")
    run_pretrain(recipe)
    run = recipe.stage_dir("pretrain")
    assert load_checkpoint(run / "last.pth")["meta"]["noise_levels"] == [0.25]
    assert yaml.safe_load((run / "config.yaml").read_text())["pretrain"]["sigma"] == 0.25


def test_the_picture_shows_every_level_in_turn(tiny_recipe, tmp_path, monkeypatch) -> None:
    import dmae_cli.training.pictures as pictures
    from dmae_cli.data.loading import load_dataset
    from dmae_cli.training.pretrain import build_dmae

    recipe = tiny_recipe("pretrain.sigma=[0.25, 0.5, 1.0]", "pretrain.reconstructions=5")
    test_set = load_dataset(recipe, "test", augment=False)
    drawn: dict[str, object] = {}
    real = pictures.reconstruction_grid

    def spy(model, clean, noisy, mask, pred, path, titles=None):
        drawn.update(noise=(noisy - clean).flatten(1).std(dim=1), titles=titles)
        return real(model, clean, noisy, mask, pred, path, titles)

    monkeypatch.setattr(pictures, "reconstruction_grid", spy)
    model = build_dmae(recipe, test_set.info)
    cpu = torch.device("cpu")
    path = pictures.write_reconstructions(recipe, test_set, model, tmp_path / "r.png", cpu)
    assert path.is_file() and drawn["titles"] == ["σ=0.25", "σ=0.5", "σ=1", "σ=0.25", "σ=0.5"]
    expected = torch.tensor([0.25, 0.5, 1.0, 0.25, 0.5])
    assert torch.allclose(drawn["noise"], expected, rtol=0.25)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "pretrain.sigma: expected a list of 1 to 64 distinct numbers > 0 and <= 10"),
        ("[0.25, 0]", "pretrain.sigma: expected a list of 1 to 64 distinct numbers > 0"),
        ("[0.25, 0.25]", "pretrain.sigma: expected a list of 1 to 64 distinct numbers"),
        ("[0.25, 11.0]", "<= 10, got (0.25, 11.0)"),
        ("[0.25, x]", "pretrain.sigma[1]: expected a number, got 'x'"),
        (f"[{', '.join(['0.5'] * 65)}]", "pretrain.sigma: expected a list of 1 to 64"),
        ("0", "pretrain.sigma: expected a number > 0 and <= 10, got 0.0"),
    ],
)
def test_a_bad_list_of_levels_is_one_line(tmp_path: Path, value: str, message: str) -> None:
    args = ["pretrain", "recipes/digits.yaml", "--set", f"runs_dir={tmp_path}"]
    line = one_line_error(runner.invoke(app, [*args, "--set", f"pretrain.sigma={value}"]))
    assert message in line, line
    assert list(tmp_path.iterdir()) == []


# -- the clean classifier ------------------------------------------------------------------------
def test_at_sigma_0_the_objective_sees_each_image_once_without_noise(tiny_recipe) -> None:
    cfg = tiny_recipe().finetune  # consistency on, num_noise 2
    objective = build_objective(cfg, 0.0, 10)
    assert (objective.num_noise, objective.consistency) == (1, False)
    images, labels = torch.rand(4, 1, 16, 16), torch.arange(4)
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return torch.zeros(len(x), 10, requires_grad=True)

    state = torch.random.get_rng_state()
    objective(model, (images, labels))
    assert torch.equal(seen[0], images)  # one copy, untouched
    assert torch.equal(torch.random.get_rng_state(), state)  # no noise drawn
    assert isinstance(objective, Objective)


def test_evaluation_at_sigma_0_is_clean_accuracy() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    data = [(torch.rand(5, 1, 8, 8), torch.randint(3, (5,))) for _ in range(3)]
    stats = evaluate(model, data, 0.0, seed=0, copies=4)
    assert stats["acc_noisy"] == stats["acc_clean"]
    assert stats["acc_clean"] == evaluate(model, data, 0.25, seed=0)["acc_clean"]


def test_finetune_at_sigma_0_trains_a_clean_classifier(tiny_recipe) -> None:
    recipe = tiny_recipe(
        "finetune.sigma=[0]",
        "finetune.epochs=6",
        "finetune.warmup_epochs=1",
        "finetune.eval_every=6",
        "finetune.init=none",
    )
    with pytest.warns(
        ConfigIgnoredWarning,
        match=r"finetune.consistency, finetune.num_noise, finetune.eval_noise_copies ignored "
        r"at sigma 0",
    ):
        (run,) = run_finetune(recipe)
    assert run.run_dir == recipe.stage_dir("finetune") / "sigma-0.0"
    losses = [h["loss"] for h in run.history]
    assert losses[-1] < 0.8 * losses[0], losses
    best = load_checkpoint(run.run_dir / "best.pth")
    assert best["meta"]["sigma"] == 0.0 and best["meta"]["stage"] == "finetune"
    assert best["metrics"]["acc_noisy"] == best["metrics"]["acc_clean"] > 0.3


def test_no_warning_when_the_recipe_asks_for_nothing_sigma_0_ignores(tiny_recipe) -> None:
    import warnings

    from dmae_cli.training.objective import warn_clean_ignores

    plain = tiny_recipe(
        "finetune.sigma=[0]",
        "finetune.consistency=false",
        "finetune.num_noise=1",
        "finetune.eval_noise_copies=1",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_clean_ignores(plain.finetune)
        warn_clean_ignores(tiny_recipe().finetune)  # no sigma 0: consistency is used


@pytest.mark.filterwarnings("ignore::dmae_cli.training.augment.ConfigIgnoredWarning")
def test_cli_names_the_clean_classifier(tmp_path: Path) -> None:
    sets = [*TINY_OVERRIDES, "finetune.epochs=1", f"runs_dir={tmp_path}"]
    args = ["finetune", "recipes/digits.yaml", "--sigma", "0", "--init", "none"]
    result = runner.invoke(app, [*args, *[w for s in sets for w in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert "sigma 0.0: clean classifier (trained without noise: not a smoothing model)" in (
        result.output.replace("\n", " ")
    )
    lines = (tmp_path / "digits" / "finetune" / "sigma-0.0" / "metrics.jsonl").read_text()
    assert json.loads(lines.splitlines()[-1])["acc_noisy"] >= 0


# -- tuning a denoiser for a frozen classifier ---------------------------------------------------
TUNE = ["denoiser.epochs=2", "denoiser.warmup_epochs=0.5", "denoiser.save_every=1"]


@pytest.fixture(scope="module")
def dmae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DMAE pre-trained for one epoch (pixels, no norm_pix_loss): the denoiser's start."""
    runs = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(
        "recipes/digits.yaml", [*TINY_OVERRIDES, "pretrain.epochs=1", f"runs_dir={runs}"]
    )
    run_pretrain(recipe)
    return recipe.stage_dir("pretrain") / "last.pth"


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    """A tiny clean digits classifier (random weights: its own predictions are the targets)."""
    return save_classifier(tmp_path / "clean.pth", sigma=0.0, seed=1)


def tuning(tmp_path: Path, start: Path, classifier: Path, *extra: str):
    """The recipe of a short tuning of `start` for `classifier`, writing under tmp_path."""
    sets = [*TINY_OVERRIDES, *TUNE, f"runs_dir={tmp_path}", "finetune.sigma=[0.25]"]
    sets += [f"finetune.init={start}", f"finetune.denoiser_for={classifier}", *extra]
    return load_recipe("recipes/digits.yaml", sets)


def test_tuning_moves_only_the_denoiser(tmp_path, dmae_run, classifier, monkeypatch) -> None:
    before = classifier.read_bytes()
    loaded: list[torch.nn.Module] = []
    real = denoiser_module.load_classifier

    def keep(*args, **kwargs):
        model, spec = real(*args, **kwargs)
        loaded.append(model)
        return model, spec

    monkeypatch.setattr(denoiser_module, "load_classifier", keep)
    (run,) = run_denoiser(tuning(tmp_path, dmae_run, classifier))
    assert classifier.read_bytes() == before  # never written
    reference, _ = load_classifier(classifier)
    (used,) = loaded
    assert not used.training and not any(p.requires_grad for p in used.parameters())
    for key, value in reference.state_dict().items():
        assert torch.equal(used.state_dict()[key], value), key
    # The optimizer holds the DMAE's trained parameters and nothing else.
    last = load_checkpoint(run.run_dir / "last.pth")
    start = load_checkpoint(dmae_run)
    assert last["model"].keys() == start["model"].keys()  # a pretraining checkpoint's layout
    dmae, _ = load_denoiser(run.run_dir / "last.pth")
    trained = [n for n, p in dmae.dmae.named_parameters() if p.requires_grad and n != "mask_token"]
    held = sum(len(g["params"]) for g in last["optimizer"]["param_groups"])
    assert held == len(trained) == len(last["optimizer"]["state"])
    assert not torch.equal(
        last["model"]["decoder_pred.weight"], start["model"]["decoder_pred.weight"]
    )
    assert torch.equal(last["model"]["mask_token"], start["model"]["mask_token"])


def test_the_training_labels_are_not_used(tmp_path, dmae_run, classifier, monkeypatch) -> None:
    def tuned(name: str) -> dict[str, torch.Tensor]:
        (run,) = run_denoiser(tuning(tmp_path, dmae_run, classifier, f"name={name}"))
        return load_checkpoint(run.run_dir / "last.pth")["model"]

    honest = tuned("honest")
    real = denoiser_module.load_dataset

    def scrambled(recipe, split, augment):
        dataset = real(recipe, split, augment)
        if split == "train":
            dataset._labels = [(label + 3) % 10 for label in dataset._labels]
        return dataset

    monkeypatch.setattr(denoiser_module, "load_dataset", scrambled)
    lying = tuned("lying")
    for key, value in honest.items():
        assert torch.equal(value, lying[key]), key


def test_an_interrupted_tuning_resumes_exactly(tmp_path, dmae_run, classifier, monkeypatch):
    import os
    import signal

    from dmae_cli.runtime.interrupt import Interrupted

    (straight,) = run_denoiser(tuning(tmp_path, dmae_run, classifier, "name=straight"))
    calls = {"n": 0}
    real = denoiser_module.Stability.__call__

    def loss_then_signal(self, *args):
        calls["n"] += 1
        if calls["n"] == 30:  # inside epoch 1 (22 updates per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args)

    split = tuning(tmp_path, dmae_run, classifier, "name=split")
    monkeypatch.setattr(denoiser_module.Stability, "__call__", loss_then_signal)
    with pytest.raises(Interrupted, match="interrupted at epoch 1, update 8/22"):
        run_denoiser(split)
    monkeypatch.setattr(denoiser_module.Stability, "__call__", real)
    (resumed,) = run_denoiser(split)
    assert [h["epoch"] for h in resumed.history] == [1]
    a = load_checkpoint(straight.run_dir / "last.pth")["model"]
    b = load_checkpoint(resumed.run_dir / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    lines = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_best_pth_describes_a_tuned_denoiser(tmp_path, dmae_run, classifier) -> None:
    from dmae_cli.runtime.checkpoint import file_sha256

    (run,) = run_denoiser(tuning(tmp_path, dmae_run, classifier))
    assert run.run_dir == tmp_path / "digits" / "denoiser" / "sigma-0.25"
    assert {"config.yaml", "metrics.jsonl", "last.pth", "best.pth", "checkpoint-0002.pth"} <= {
        p.name for p in run.run_dir.iterdir()
    }
    best = load_checkpoint(run.run_dir / "best.pth")
    meta = best["meta"]
    assert meta["stage"] == "denoiser" and meta["norm_pix_loss"] is False
    assert meta["noise_levels"] == [0.25] and meta["tuned_for"] == file_sha256(classifier)
    assert meta["init"] == str(dmae_run) and meta["decoder"]["depth"] == 1
    assert best["metrics"] == run.best and 0 <= run.best["acc_noisy"] <= 1
    model, spec = load_denoiser(run.run_dir / "best.pth")  # what dmae certify --denoiser reads
    assert spec.stage == "denoiser" and model(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_cli_tunes_and_says_where_the_denoiser_went(tmp_path, dmae_run, classifier) -> None:
    sets = [*TINY_OVERRIDES, "denoiser.epochs=1", f"runs_dir={tmp_path}"]
    args = ["finetune", "recipes/digits.yaml", "--sigma", "0.5", "--init", str(dmae_run)]
    args += ["--denoiser-for", str(classifier), "--out", str(tmp_path / "den")]
    result = runner.invoke(app, [*args, *[w for s in sets for w in ("--set", s)]])
    assert result.exit_code == 0, result.output
    said = result.output.replace("\n", "")
    assert f"sigma 0.5: denoiser for {classifier}" in said
    assert f"{tmp_path / 'den' / 'sigma-0.5'}/best.pth" in said
    help_text = runner.invoke(app, ["finetune", "--help"]).output
    assert "--denoiser-for clean.pth" in help_text and "--sigma 0" in help_text


def denoiser_error(tmp_path: Path, *args: str) -> str:
    sets = [*TINY_OVERRIDES, "denoiser.epochs=1", f"runs_dir={tmp_path}"]
    command = ["finetune", "recipes/digits.yaml", *args, "--out", str(tmp_path / "den")]
    line = one_line_error(runner.invoke(app, [*command, *[w for s in sets for w in ("--set", s)]]))
    assert not (tmp_path / "den" / "sigma-0.25" / "last.pth").exists()
    return line


def test_a_missing_classifier_is_one_line(tmp_path, dmae_run) -> None:
    missing = tmp_path / "nope.pth"
    line = denoiser_error(tmp_path, "--init", str(dmae_run), "--denoiser-for", str(missing))
    assert f"finetune.denoiser_for: {missing}: classifier checkpoint not found" in line


def test_sigma_0_with_a_denoiser_is_one_line(tmp_path, dmae_run, classifier) -> None:
    args = ["--init", str(dmae_run), "--denoiser-for", str(classifier), "--sigma", "0"]
    assert "0 has no noise to remove" in denoiser_error(tmp_path, *args)


def test_a_denoiser_that_does_not_fit_the_classifier_is_one_line(
    tmp_path, dmae_run, classifier
) -> None:
    small = save_classifier(tmp_path / "small.pth", sigma=0.0)
    state = load_checkpoint(small)
    state["meta"]["input_size"] = 8  # takes 8x8 images; the data and the denoiser are 16x16
    torch.save(state, small)
    args = ["--init", str(dmae_run), "--denoiser-for", str(small)]
    assert "the classifier takes 1-channel 8x8 images" in denoiser_error(tmp_path, *args)
    # A DMAE for 8x8 data in front of a 16x16 classifier.
    runs = tmp_path / "small-dmae"
    recipe = load_recipe(
        "recipes/digits.yaml",
        [*TINY_OVERRIDES, "pretrain.epochs=1", "data.image_size=8", f"runs_dir={runs}"],
    )
    run_pretrain(recipe)
    start = recipe.stage_dir("pretrain") / "last.pth"
    line = denoiser_error(tmp_path, "--init", str(start), "--denoiser-for", str(classifier))
    assert "the denoiser returns 1-channel 8x8 images" in line and "16x16" in line


def test_a_norm_pix_loss_start_is_one_line(tmp_path, dmae_run, classifier) -> None:
    state = load_checkpoint(dmae_run)
    state["meta"]["norm_pix_loss"] = True
    torch.save(state, tmp_path / "normpix.pth")
    args = ["--init", str(tmp_path / "normpix.pth"), "--denoiser-for", str(classifier)]
    assert "norm_pix_loss" in denoiser_error(tmp_path, *args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--linear-probe"], "--denoiser-for and --linear-probe exclude each other"),
        (["--init", "none"], "finetune.init: none (random weights) cannot denoise"),
    ],
)
def test_what_tuning_cannot_combine_with_is_one_line(tmp_path, classifier, extra, message):
    assert message in denoiser_error(tmp_path, "--denoiser-for", str(classifier), *extra)


def test_resuming_for_another_classifier_is_one_line(tmp_path, dmae_run, classifier) -> None:
    run_denoiser(tuning(tmp_path, dmae_run, classifier, "denoiser.epochs=1"))
    other = save_classifier(tmp_path / "other.pth", sigma=0.0, seed=7)
    with pytest.raises(UserError, match="tuned for another classifier"):
        run_denoiser(tuning(tmp_path, dmae_run, other))


def ddp_worker(rank: int, port: int, out: str, start: str, classifier: str) -> None:
    """One torchrun-like process tuning a denoiser; it reports what DDP wrapped."""
    from dmae_cli.training.trainer import Trainer

    as_torchrun_rank(rank, port)
    wrapped: list[torch.nn.Module] = []
    distribute = Trainer.distribute

    def spy(self: Trainer) -> None:
        distribute(self)
        wrapped.append(self.model)

    Trainer.distribute = spy  # type: ignore[method-assign]
    sets = [*TINY_OVERRIDES, "denoiser.epochs=1", "denoiser.batch_size=32", f"runs_dir={out}"]
    sets += [f"finetune.init={start}", f"finetune.denoiser_for={classifier}"]
    recipe = load_recipe("recipes/digits.yaml", [*sets, "finetune.sigma=[0.25]"])
    run_denoiser(recipe, out=Path(out) / "ddp")
    (model,) = wrapped
    inner = model.module
    report = {"wrapped": type(model).__name__, "inner": type(inner).__name__}
    torch.save({**report, "model": inner.dmae.state_dict()}, Path(out) / f"rank{rank}.pt")


def test_two_processes_wrap_only_the_denoiser_and_keep_it_identical(
    tmp_path, dmae_run, classifier
) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, str(tmp_path), str(dmae_run), str(classifier))
    mp.spawn(ddp_worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [(r["wrapped"], r["inner"]) for r in ranks] == [
        ("DistributedDataParallel", "Denoiser")
    ] * 2
    last = load_checkpoint(tmp_path / "ddp" / "sigma-0.25" / "last.pth")
    assert len(last["rng"]) == 2
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
        assert torch.equal(value, last["model"][key]), key


def test_augmentation_the_tuning_does_not_use_is_warned_about(tmp_path, dmae_run, classifier):
    """The tuning trains on the data set's own crops and flips: a recipe's mixup is ignored."""
    recipe = tuning(tmp_path, dmae_run, classifier, "finetune.mixup=0.8", "denoiser.epochs=1")
    with pytest.warns(ConfigIgnoredWarning, match=r"finetune.mixup ignored in tuning a denoiser"):
        run_denoiser(recipe, out=tmp_path / "den", stop_after=1)


def test_a_classifier_of_other_classes_than_the_data_is_one_line(tmp_path, dmae_run) -> None:
    """Its accuracy would be scored against labels of another class space."""
    other = save_classifier(tmp_path / "c100.pth", sigma=0.0, num_classes=100)
    args = ["--init", str(dmae_run), "--denoiser-for", str(other)]
    assert "the classifier has 100 classes, but the recipe's data set has 10" in denoiser_error(
        tmp_path, *args
    )


def test_a_tuned_denoiser_records_the_data_it_was_tuned_on(tmp_path, dmae_run, classifier):
    """Not the data its DMAE was pre-trained on: `dmae certify` notes a denoiser trained on
    another data set than it certifies."""
    state = load_checkpoint(dmae_run)
    state["meta"].update(dataset="elsewhere", data_fingerprint="0" * 16)
    start = tmp_path / "elsewhere.pth"
    torch.save(state, start)
    recipe = tuning(tmp_path, start, classifier, "denoiser.epochs=1")
    (run,) = run_denoiser(recipe)
    meta = load_checkpoint(run.run_dir / "last.pth")["meta"]
    fingerprint = load_dataset(recipe, "train", augment=True).info.fingerprint
    assert (meta["dataset"], meta["data_fingerprint"]) == ("digits", fingerprint)


def test_a_classifier_as_the_denoiser_to_tune_is_one_line(tmp_path, classifier) -> None:
    """--init names the denoiser's start: a classifier there is told apart in terms that fit
    this command (once, the hint spoke of certify's --checkpoint and --denoiser)."""
    line = denoiser_error(tmp_path, "--init", str(classifier), "--denoiser-for", str(classifier))
    assert "a classifier (finetune) checkpoint, not a denoiser: a denoiser is a DMAE" in line
    assert "--checkpoint" not in line
