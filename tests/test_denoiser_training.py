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

import dmae_cli.training.pretrain as pretrain_module
from dmae_cli.cli.app import app
from dmae_cli.runtime.checkpoint import load_checkpoint
from dmae_cli.training.augment import ConfigIgnoredWarning
from dmae_cli.training.finetune import evaluate, run_finetune
from dmae_cli.training.objective import Objective, build_objective
from dmae_cli.training.pretrain import add_noise, run_pretrain
from tests.conftest import TINY_OVERRIDES, one_line_error

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
