from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from tests.conftest import one_line_error

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("pretrain", "finetune", "certify", "report", "plugins"):
        assert command in result.output


@pytest.mark.parametrize("command", ["pretrain", "plugins"])
def test_command_help_has_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_plugins_json_lists_builtins() -> None:
    result = run("plugins", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    names = {(r["kind"], r["name"]) for r in rows}
    assert ("backbone", "vit_large_patch16") in names and ("dataset", "digits") in names
    assert all(r["origin"] == "built-in" and r["distribution"] == "dmae" for r in rows)
    assert all(r["description"] and not r["description"].startswith("failed") for r in rows)


def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dmae_cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("dmae ")


def test_missing_data_path_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run(
        "pretrain",
        "recipes/digits.yaml",
        "--set",
        "data.dataset=imagefolder",
        "--set",
        f"data.root={missing}",
        "--set",
        f"runs_dir={tmp_path}",
    )
    assert str(missing) in one_line_error(result)


def test_malformed_recipe_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {epochs: [1,\n")
    assert "malformed YAML" in one_line_error(run("pretrain", str(bad)))


def test_unknown_backbone_is_one_line(tmp_path: Path) -> None:
    result = run(
        "pretrain",
        "recipes/digits.yaml",
        "--set",
        "model.backbone=vit_enormous",
        "--set",
        f"runs_dir={tmp_path}",
    )
    assert "unknown backbone 'vit_enormous'; available: vit_base_patch16" in one_line_error(result)


def test_unknown_key_in_override_is_one_line() -> None:
    result = run("pretrain", "recipes/digits.yaml", "--set", "pretrain.epohcs=3")
    assert "unknown key 'pretrain.epohcs'; did you mean 'epochs'?" in one_line_error(result)


def test_pictures_only_without_a_run_is_one_line(tmp_path: Path) -> None:
    result = run("pretrain", "recipes/digits.yaml", "--pictures-only", "--out", str(tmp_path))
    assert "no checkpoint to draw reconstructions from" in one_line_error(result)


def test_pretrain_cli_end_to_end(tmp_path: Path) -> None:
    from tests.conftest import TINY_OVERRIDES

    sets = [
        x
        for item in [*TINY_OVERRIDES, "pretrain.epochs=1", "pretrain.reconstructions=4"]
        for x in ("--set", item)
    ]
    result = run("pretrain", "recipes/digits.yaml", *sets, "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "reconstructions.png").is_file()
    assert "outputs in" in result.stderr
    again = run(
        "pretrain", "recipes/digits.yaml", *sets, "--out", str(tmp_path / "p"), "--pictures-only"
    )
    assert again.exit_code == 0, again.output


def test_sigint_stops_with_130_and_the_rerun_resumes(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from tests.conftest import TINY_OVERRIDES

    sets = [x for item in [*TINY_OVERRIDES, "pretrain.epochs=40"] for x in ("--set", item)]
    command = [sys.executable, "-m", "dmae_cli", "pretrain", "recipes/digits.yaml", *sets]
    command += ["--out", str(tmp_path)]
    env = {**os.environ, "DMAE_PLUGINS": "builtin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("stopped: interrupted at epoch")
        and "run the same command" in last_line
    )

    sets = [x for item in [*TINY_OVERRIDES, "pretrain.epochs=2"] for x in ("--set", item)]
    again = run("pretrain", "recipes/digits.yaml", *sets, "--out", str(tmp_path))
    assert again.exit_code == 0, again.output
    assert "resuming from" in again.stderr


# -- recipe options: declared once, on the recipe's fields --------------------------------------
@pytest.fixture
def certified(monkeypatch: pytest.MonkeyPatch) -> list:
    """Stand in for the certification: record the recipe `dmae certify` would run."""
    from dmae_cli.smoothing import certify

    recipes: list = []
    monkeypatch.setattr(certify, "run_certify", lambda recipe, **_: recipes.append(recipe) or [])
    return recipes


@pytest.mark.parametrize(
    ("command", "keys"), [("certify", ("certify", "seed")), ("finetune", ("finetune",))]
)
def test_every_flagged_recipe_field_is_an_option(command: str, keys: tuple[str, ...]) -> None:
    from dmae_cli.config.recipe import recipe_options

    options = recipe_options(*keys)
    assert options, "no recipe field declares a flag"
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for option in options:
        assert f"({option.key})" in result.output


def test_typed_floats_reach_the_recipe_unchanged(certified: list) -> None:
    """YAML 1.1 reads 1e-05 as a string: a typed option is never turned back into text."""
    result = run("certify", "recipes/digits.yaml", "--alpha", "0.00001", "--sigma", "1e-3", "2E-1")
    assert result.exit_code == 0, result.output
    assert certified[0].certify.alpha == 1e-05
    assert certified[0].certify.sigma == (1e-3, 0.2)


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True))
def test_any_typed_float_round_trips(alpha: float) -> None:
    from dmae_cli.smoothing import certify

    recipes: list = []
    original = certify.run_certify
    certify.run_certify = lambda recipe, **_: recipes.append(recipe) or []  # type: ignore
    try:
        result = run("certify", "recipes/digits.yaml", "--alpha", repr(alpha))
    finally:
        certify.run_certify = original
    assert result.exit_code == 0, result.output
    assert recipes[0].certify.alpha == alpha


def test_typed_options_win_over_set_over_the_recipe_over_defaults(certified: list) -> None:
    args = ["--set", "certify.n=7", "--set", "certify.n0=3", "--n", "9", "--batch-size", "auto"]
    assert run("certify", "recipes/digits.yaml", *args).exit_code == 0
    cfg = certified[0].certify
    assert (cfg.n, cfg.n0, cfg.batch_size) == (9, 3, "auto")  # typed > --set > recipe
    assert cfg.sigma == (0.25, 0.5)  # the recipe's, over the default (0.25,)
    assert cfg.end is None  # the default


def test_typed_option_mistakes_name_the_key_and_what_was_expected() -> None:
    line = one_line_error(run("certify", "recipes/digits.yaml", "--alpha", "1.5"))
    assert "certify.alpha: expected a number in (0.0, 1.0), got 1.5" in line
    line = one_line_error(run("finetune", "recipes/digits.yaml", "--sigma", "-0.5"))
    assert "finetune.sigma: expected one or more numbers >= 0" in line  # 0: a clean classifier
    line = one_line_error(run("certify", "recipes/digits.yaml", "--sigma", "0"))
    assert "certify.sigma: expected one or more numbers > 0" in line


def test_set_values_stay_yaml() -> None:
    line = one_line_error(run("certify", "recipes/digits.yaml", "--set", "certify.alpha=1e-05"))
    assert "certify.alpha: expected a number (in YAML write exponents" in line


# -- read once -----------------------------------------------------------------------------------
@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How often each recipe file and each checkpoint is read."""
    from dmae_cli.config import recipe
    from dmae_cli.runtime import checkpoint

    counts: Counter = Counter()
    read_recipe, load_checkpoint = recipe.read_recipe_file, checkpoint.load_checkpoint

    def count_recipe(path: Path) -> dict:
        counts[Path(path).resolve()] += 1
        return read_recipe(path)

    def count_checkpoint(path: Path, *args: object, **kwargs: object) -> dict:
        counts[Path(path).resolve()] += 1
        return load_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(recipe, "read_recipe_file", count_recipe)
    monkeypatch.setattr(checkpoint, "load_checkpoint", count_checkpoint)
    return counts


@pytest.mark.parametrize("config", [True, False], ids=["config-beside-the-model", "bare"])
@pytest.mark.parametrize("estimate", [False, True], ids=["certify", "estimate"])
def test_certify_reads_the_recipe_and_the_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: Counter, config: bool, estimate: bool
) -> None:
    from dmae_cli.config.recipe import load_recipe, recipe_to_yaml
    from dmae_cli.smoothing import estimate as estimate_module
    from tests.conftest import save_classifier

    monkeypatch.setattr(estimate_module, "ESTIMATE_SECONDS", 0.05)
    model = save_classifier(tmp_path / "runs" / "digits" / "finetune" / "sigma-0.5" / "best.pth")
    if config:
        saved = load_recipe("recipes/digits.yaml", ["device=cpu", "certify.sigma=[0.5]"])
        (model.parent / "config.yaml").write_text(recipe_to_yaml(saved))
    monkeypatch.chdir(tmp_path)  # ./runs: the latest fine-tuned model is found there
    reads.clear()
    args = ["--sigma", "0.5", "--n", "20", "--n0", "5", "--max-examples", "2"]
    result = run("certify", *args, *(["--estimate"] if estimate else []))
    assert result.exit_code == 0, result.output
    expected = {model.resolve(): 1}
    if config:
        expected[(model.parent / "config.yaml").resolve()] = 1
    assert dict(reads) == expected


@pytest.mark.parametrize("name", sorted(c.callback.__name__ for c in app.registered_commands))
def test_command_help_paragraphs_fit_an_80_column_terminal(name: str) -> None:
    """The help keeps its docstring's line breaks: a line wider than the 78 columns rich
    gives it at 80 is wrapped, and leaves a stub of a line before the next one."""
    import inspect

    command = next(c for c in app.registered_commands if c.callback.__name__ == name)
    lines = (inspect.getdoc(command.callback) or "").splitlines()
    prose = [line for line in lines if not line.startswith("  ")]  # examples may wrap
    assert [line for line in prose if len(line) > 78] == []
