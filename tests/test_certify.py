"""`dmae certify`: output files, resume after a crash or a signal, two processes, the CLI.

A tiny random classifier of the digits shape stands in for a fine-tuned one (its checkpoint has
the layout `dmae finetune` writes), with n = 60 samples per image, so each run takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmae_cli import checkpoint
from dmae_cli.api import Certificate, CertifyRequest, CountsFn
from dmae_cli.certify import COLUMNS, read_lines, run_certify, select_indices
from dmae_cli.checkpoint import file_sha256
from dmae_cli.cli import app
from dmae_cli.errors import UserError
from dmae_cli.interrupt import Interrupted
from dmae_cli.models import build_classifier
from dmae_cli.recipe import Recipe, load_recipe, recipe_to_yaml
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import Sequential
from dmae_plugins.datasets.digits import train_statistics
from tests.conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
SMALL = ["certify.n=60", "certify.n0=10", "certify.batch_size=32", "certify.max_examples=8"]
runner = CliRunner()


def save_classifier(path: Path, sigma: float = 0.5, num_classes: int = 10, seed: int = 0) -> Path:
    """A width-32, depth-2 classifier for 16x16 digits, saved as `dmae finetune` saves one."""
    mean, std = train_statistics(0)
    meta = {
        "backbone": "vit_tiny",
        "backbone_options": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": 16,
        "patch_size": 4,
        "input_size": 16,
        "channels": 1,
        "mean": [mean],
        "std": [std],
        "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)],
        "dataset": "digits",
        "data_fingerprint": "",
        "sigma": sigma,
        "stage": "finetune",
    }
    torch.manual_seed(seed)
    model = build_classifier(meta)
    checkpoint.save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards: a second OpenMP thread costs more in synchronisation than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A runs directory holding a sigma-0.5 model of the digits recipe."""
    save_classifier(tmp_path / "runs" / "digits" / "finetune" / "sigma-0.5" / "best.pth")
    return tmp_path / "runs"


def recipe(runs: Path, *overrides: str) -> Recipe:
    items = [f"runs_dir={runs}", "device=cpu", "certify.sigma=[0.5]", *SMALL, *overrides]
    return load_recipe(RECIPE, items)


def without_time(path: Path) -> list[list[str]]:
    """The TSV's cells with the wall-clock column blanked (the only nondeterministic one)."""
    lines = path.read_text().splitlines()
    return [
        [c if i != COLUMNS.index("time") else "" for i, c in enumerate(line.split("\t"))]
        for line in lines
    ]


# -- files ----------------------------------------------------------------------------------
def test_writes_sorted_rows_and_a_header(runs: Path) -> None:
    [result] = run_certify(recipe(runs, "certify.interval=3"))
    tsv = runs / "digits" / "certify" / "sigma-0.5.tsv"
    assert result.tsv == tsv and result.certified_now == 8
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert lines[0].startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime\t")  # Cohen's first
    rows = result.rows
    assert [r.idx for r in rows] == [0, 3, 6, 9, 12, 15, 18, 21]
    for r in rows:
        assert (r.n, r.n0, r.certifier, r.stop) == (60, 10, "cohen", "budget")
        assert r.correct == int(r.predict == r.label) and (r.radius > 0) <= (r.predict >= 0)
    header = json.loads(result.header.read_text())
    model = runs / "digits" / "finetune" / "sigma-0.5" / "best.pth"
    assert header["checkpoint_sha256"] == file_sha256(model)
    assert (header["sigma"], header["n0"], header["n"], header["alpha"]) == (0.5, 10, 60, 0.001)
    assert (header["seed"], header["certifier"], header["split"]) == (0, "cohen", "test")
    assert {"torch", "scipy", "timm", "dmae"} <= set(header["versions"])
    assert result.samples == 8 * 70 and result.mean_samples() == 70
    assert result.accuracy(0.0) == sum(r.correct for r in rows) / 8


def test_a_crash_then_a_rerun_gives_the_uninterrupted_file(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [whole] = run_certify(recipe(runs), out=tmp_path / "whole")
    certify, calls = Cohen.certify, []

    def crashing(self: Cohen, counts: CountsFn, request: CertifyRequest) -> Certificate:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a hard kill in the middle of the fourth example
        return certify(self, counts, request)

    monkeypatch.setattr(Cohen, "certify", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_certify(recipe(runs), out=tmp_path / "resumed")
    monkeypatch.setattr(Cohen, "certify", certify)
    tsv = tmp_path / "resumed" / "sigma-0.5.tsv"
    assert len(read_lines(tsv)) == 3
    with tsv.open("a") as f:
        f.write("3\t9\t9\t0.4")  # a row torn by the crash
    [resumed] = run_certify(recipe(runs), out=tmp_path / "resumed")
    assert resumed.certified_now == 5
    assert without_time(resumed.tsv) == without_time(whole.tsv)


def test_a_signal_stops_after_the_current_example_and_the_rerun_resumes(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [whole] = run_certify(recipe(runs, "certify.certifier=sequential"), out=tmp_path / "whole")
    original, calls = Sequential.certify, []

    def interrupted(self: Sequential, counts: CountsFn, request: CertifyRequest) -> Certificate:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second example runs
        return original(self, counts, request)

    monkeypatch.setattr(Sequential, "certify", interrupted)
    with pytest.raises(Interrupted) as stopped:
        run_certify(recipe(runs, "certify.certifier=sequential"), out=tmp_path / "resumed")
    assert stopped.value.exit_code == 130 and "resume" in str(stopped.value)
    assert len(read_lines(tmp_path / "resumed" / "sigma-0.5.tsv")) == 2
    [resumed] = run_certify(recipe(runs, "certify.certifier=sequential"), out=tmp_path / "resumed")
    assert without_time(resumed.tsv) == without_time(whole.tsv)
    assert {r.certifier for r in resumed.rows} == {"sequential"}


def test_resuming_with_other_settings_is_refused(runs: Path) -> None:
    run_certify(recipe(runs, "certify.max_examples=2"))
    with pytest.raises(UserError, match=r"alpha=0\.001, this run has 0\.01; delete"):
        run_certify(recipe(runs, "certify.max_examples=2", "certify.alpha=0.01"))
    more = run_certify(recipe(runs, "certify.max_examples=4"))[0]  # a larger selection is fine
    assert more.certified_now == 2 and [r.idx for r in more.rows] == [0, 1, 2, 3]


def test_skip_wrong_rows_keep_the_selected_class_without_estimation(runs: Path) -> None:
    [result] = run_certify(recipe(runs, "certify.skip_wrong=true"))
    skipped = [r for r in result.rows if r.stop == "skipped"]
    assert skipped and all(r.n == 0 and r.correct == 0 and r.radius == 0.0 for r in skipped)
    assert all(r.n == 60 for r in result.rows if r.stop != "skipped")


def test_example_selection() -> None:
    def pick(*items: str) -> list[int]:
        return select_indices(load_recipe(None, list(items)).certify, 360, "test")

    assert pick("certify.interval=50") == [0, 50, 100, 150, 200, 250, 300, 350]
    assert pick("certify.start=10", "certify.end=20", "certify.interval=4") == [10, 14, 18]
    assert pick("certify.start=355") == [355, 356, 357, 358, 359]
    assert pick("certify.interval=2", "certify.max_examples=3") == [0, 2, 4]
    with pytest.raises(UserError, match="360 examples"):
        pick("certify.end=361")
    with pytest.raises(UserError, match="larger than"):
        pick("certify.start=5", "certify.end=5")


# -- two processes --------------------------------------------------------------------------
def test_two_gloo_processes_write_the_single_process_file(runs: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dmae_cli", "certify", RECIPE, "--sigma", "0.5", "-n", "60", "--n0", "10",
        "--batch-size", "32", "--max-examples", "7", "--skip-wrong",
        "--set", f"runs_dir={runs}", "--set", "device=cpu", "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMAE_PLUGINS": "builtin"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "certified accuracy" in done.stdout
    # One thread here as in each torchrun worker, so that every float operation is the same.
    single = recipe(runs, "certify.max_examples=7", "certify.skip_wrong=true")
    [one] = run_certify(single, out=tmp_path / "single")
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "sigma-0.5.json",
        "sigma-0.5.tsv",
    ]
    assert without_time(tmp_path / "ddp" / "sigma-0.5.tsv") == without_time(one.tsv)


# -- the command line -----------------------------------------------------------------------
def cli(*args: str):
    return runner.invoke(app, ["certify", *args])


def test_cli_certifies_and_prints_the_table(runs: Path) -> None:
    save_classifier(runs / "digits" / "finetune" / "sigma-0.25" / "last.pth", sigma=0.25)
    args = ["--n", "30", "--n0", "5", "--max-examples", "3", "--set", f"runs_dir={runs}"]
    result = cli(RECIPE, "--sigma", "0.25", "0.5", "--certifier", "sequential", *args)
    assert result.exit_code == 0, result.output
    assert "certified accuracy" in result.stdout and "sigma 0.25" in result.stdout
    assert "samples/image" in result.stdout
    for sigma in ("0.25", "0.5"):
        assert f"sigma-{sigma}.tsv" in result.stderr
        assert (runs / "digits" / "certify" / f"sigma-{sigma}.json").is_file()


def test_cli_without_a_recipe_takes_the_latest_run(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = save_classifier(runs / "older" / "finetune" / "sigma-0.5" / "best.pth")
    os.utime(other, (1, 1))  # written long ago: the digits run is the latest
    model_dir = runs / "digits" / "finetune" / "sigma-0.5"
    (model_dir / "config.yaml").write_text(recipe_to_yaml(recipe(runs)))
    monkeypatch.chdir(tmp_path)  # ./runs is the default runs_dir
    result = cli("--sigma", "0.5", "--n", "20", "--n0", "5", "--max-examples", "2")
    assert result.exit_code == 0, result.output
    assert (runs / "digits" / "certify" / "sigma-0.5.tsv").is_file()
    assert not (runs / "older" / "certify").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "1.5"], "certify.alpha: expected a number in (0.0, 1.0), got 1.5"),
        (["--n", "0"], "certify.n: expected a number > 0, got 0"),
        (["--n0", "0"], "certify.n0: expected a number > 0"),
        (["--batch-size", "0"], "certify.batch_size: expected a number > 0"),
        (["--sigma", "-1"], "certify.sigma: expected one or more numbers > 0"),
        (["--certifier", "nope"], "unknown certifier 'nope'; available: cohen, sequential"),
        (["--set", "certify.options={bogus: 1}"], "certifier 'cohen' rejected its options"),
        (["--sigma", "0.25"], "no fine-tuned model for sigma 0.25"),
        (["--start", "400"], "outside the test split, which has 360 examples"),
        (["--split", "holdout"], "unknown split 'holdout'"),
        (["0.5"], "noise levels follow --sigma"),
    ],
)
def test_cli_mistakes_are_one_line(runs: Path, args: list[str], message: str) -> None:
    result = cli(RECIPE, "--set", f"runs_dir={runs}", *args)
    assert message in one_line_error(result)


def test_cli_refuses_a_checkpoint_that_does_not_fit(runs: Path, tmp_path: Path) -> None:
    wrong = save_classifier(tmp_path / "cifar.pth", num_classes=100)
    result = cli(RECIPE, "--set", f"runs_dir={runs}", "--checkpoint", str(wrong))
    assert "images of 100 classes, but dataset 'digits'" in one_line_error(result)
    junk = tmp_path / "junk.pth"
    torch.save({"weights": torch.zeros(1)}, junk)
    result = cli(RECIPE, "--set", f"runs_dir={runs}", "--checkpoint", str(junk))
    assert "not a dmae checkpoint" in one_line_error(result)
    missing = tmp_path / "missing.pth"
    assert "checkpoint not found" in one_line_error(cli(RECIPE, "--checkpoint", str(missing)))


def test_cli_help_has_examples() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    assert "Examples" in result.output and "--interval" in result.output
