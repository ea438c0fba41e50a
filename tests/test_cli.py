from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
