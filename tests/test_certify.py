"""`dmae certify`: output files, resume after a crash or a signal, two processes, the CLI.

A tiny random classifier of the digits shape stands in for a fine-tuned one (its checkpoint has
the layout `dmae finetune` writes), with n = 60 samples per image, so each run takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from dmae_cli.api import Certificate, CertifyRequest, CountsFn, certifier_api, simulate
from dmae_cli.cli.app import app
from dmae_cli.config.recipe import Recipe, load_recipe, recipe_to_yaml
from dmae_cli.runtime.checkpoint import file_sha256
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import Interrupted
from dmae_cli.runtime.precision import autocast_dtype, precision_name
from dmae_cli.smoothing import estimate as estimate_module
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.smoothing.estimate import estimate_certify
from dmae_cli.smoothing.jobs import select_indices
from dmae_cli.smoothing.runfile import (
    COLUMNS,
    HEADER_LINE,
    MATCHING,
    Row,
    RowFile,
    check_header,
    finished,
    header_path,
    merge,
    open_for_append,
    part_path,
    parts,
    read_header,
    read_lines,
    tsv_path,
    write_header,
)
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import Sequential
from tests.conftest import one_line_error, save_classifier

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
SMALL = ["certify.n=60", "certify.n0=10", "certify.batch_size=32", "certify.max_examples=8"]
CPU_AUTO_PRECISION = precision_name(autocast_dtype("auto", torch.device("cpu")))
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert (header["batch_size"], header["device"], header["compile"]) == (32, "cpu", False)
    assert header["precision"] == CPU_AUTO_PRECISION  # resolved, not "auto"
    assert header["parallel"] == torch.get_num_threads()  # resolved: one pass per core
    assert result.samples == 8 * 70 and result.mean_samples() == 70
    assert result.accuracy(0.0) == sum(r.correct for r in rows) / 8


@pytest.mark.parametrize("together", [1, 3])
def test_a_crash_then_a_rerun_gives_the_uninterrupted_file(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, together: int
) -> None:
    grouped = f"certify.together={together}"
    [whole] = run_certify(recipe(runs), out=tmp_path / "whole")
    certify, calls = Cohen.certify, []

    def crashing(self: Cohen, request: CertifyRequest) -> Generator[int, Tensor, Certificate]:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a hard kill in the middle of the fourth example
        return (yield from certify(self, request))

    monkeypatch.setattr(Cohen, "certify", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_certify(recipe(runs, grouped), out=tmp_path / "resumed")
    monkeypatch.setattr(Cohen, "certify", certify)
    tsv = tmp_path / "resumed" / "sigma-0.5.tsv"
    assert len(read_lines(tsv)) == 3  # the crashed example's group is lost, no more
    with tsv.open("a") as f:
        f.write("3\t9\t9\t0.4")  # a row torn by the crash
    [resumed] = run_certify(recipe(runs, grouped), out=tmp_path / "resumed")
    assert resumed.certified_now == 5
    assert without_time(resumed.tsv) == without_time(whole.tsv)


@pytest.mark.parametrize("together", [1, 3])
def test_a_signal_stops_after_the_current_group_and_the_rerun_resumes(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, together: int
) -> None:
    sequential = ("certify.certifier=sequential", f"certify.together={together}")
    [whole] = run_certify(recipe(runs, sequential[0]), out=tmp_path / "whole")
    original, calls = Sequential.certify, []

    def interrupted(
        self: Sequential, request: CertifyRequest
    ) -> Generator[int, Tensor, Certificate]:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second example runs
        return (yield from original(self, request))

    monkeypatch.setattr(Sequential, "certify", interrupted)
    with pytest.raises(Interrupted) as stopped:
        run_certify(recipe(runs, *sequential), out=tmp_path / "resumed")
    assert stopped.value.exit_code == 130 and "resume" in str(stopped.value)
    assert len(read_lines(tmp_path / "resumed" / "sigma-0.5.tsv")) == max(2, together)
    [resumed] = run_certify(recipe(runs, *sequential), out=tmp_path / "resumed")
    assert without_time(resumed.tsv) == without_time(whole.tsv)
    assert {r.certifier for r in resumed.rows} == {"sequential"}


@pytest.mark.parametrize("name", ["cohen", "sequential"])
def test_api_2_in_packed_groups_writes_the_rows_api_1_wrote_one_at_a_time(
    runs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    """The same certifier through the driver's shared passes, in groups of 1 and 3, and
    through the API-1 adapter (a `counts` callback, `Sampler.counts`, one example at a
    time): the same rows, `time` aside; a warning says that API 1 shares no passes."""
    chosen = (f"certify.certifier={name}", "certify.n=300")
    files = []
    for together in (1, 3):
        [result] = run_certify(recipe(runs, *chosen, f"certify.together={together}"),
                               out=tmp_path / f"v2-{together}")  # fmt: skip
        files.append(without_time(result.tsv))
    certifier = Cohen if name == "cohen" else Sequential
    generator = certifier.certify

    def api_1(self: Cohen, counts: CountsFn, request: CertifyRequest) -> Certificate:
        return simulate(generator(self, request), None, counts)

    monkeypatch.setattr(certifier, "certify", api_1)
    assert certifier_api(certifier()) == 1
    capsys.readouterr()
    [result] = run_certify(recipe(runs, *chosen, "certify.together=3"), out=tmp_path / "v1")
    files.append(without_time(result.tsv))
    said = " ".join("".join(capsys.readouterr()).split())
    assert f"certifier '{name}' implements certifier API 1" in said
    assert "certify.together 3 shares no forward passes" in said
    assert files[0] == files[1] == files[2]
    assert len(files[0]) == 9 and all(int(row[COLUMNS.index("n")]) for row in files[0][1:])


def test_resuming_with_other_settings_is_refused(runs: Path) -> None:
    run_certify(recipe(runs, "certify.max_examples=2"))
    with pytest.raises(UserError, match=r"alpha=0\.001, this run has 0\.01; delete"):
        run_certify(recipe(runs, "certify.max_examples=2", "certify.alpha=0.01"))
    more = run_certify(recipe(runs, "certify.max_examples=4"))[0]  # a larger selection is fine
    assert more.certified_now == 2 and [r.idx for r in more.rows] == [0, 1, 2, 3]


def test_run_file_paths_repair_and_merge(tmp_path: Path) -> None:
    """The run file alone: a torn row is ignored, then cut before appending; parts merge."""
    tsv = tsv_path(tmp_path, 0.5)
    assert (tsv.name, header_path(tsv).name) == ("sigma-0.5.tsv", "sigma-0.5.json")
    assert part_path(tsv, 0) == tsv and part_path(tsv, 2).name == "sigma-0.5.tsv.part2"

    def line(idx: int) -> str:
        return Row(idx, 1, 1, 0.25, 1, 0.1, 9, 10, 5, "cohen", 0.6, "budget").line()

    with open_for_append(part_path(tsv, 1)) as rows:
        rows.append(line(1))
    with open_for_append(tsv) as rows:
        rows.append(line(2) + line(0)[:5])  # a crash in the middle of a row
    assert finished(tsv) == {1, 2}
    with open_for_append(tsv) as rows:
        rows.append(line(0))
    assert sorted(merge(tsv)) == [0, 1, 2] and not parts(tsv)
    assert tsv.read_text() == HEADER_LINE + line(0) + line(1) + line(2)


def test_a_damaged_header_stops_a_resume_with_its_line(tmp_path: Path) -> None:
    tsv = tsv_path(tmp_path, 0.5)
    header = {key: 1 for key in MATCHING}
    write_header(tsv, header)
    assert read_header(tsv) == header
    check_header(tsv, header)  # the same settings resume
    header_path(tsv).write_text('{\n"sigma": 0.5,\n')
    with pytest.raises(UserError, match=r"sigma-0\.5\.json:3: not valid JSON"):
        check_header(tsv, header)
    header_path(tsv).write_text("[1, 2]\n")
    with pytest.raises(UserError, match=r"sigma-0\.5\.json:1: expected a JSON object"):
        check_header(tsv, header)


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


def test_parallel_passes_certify_the_same_rows(runs: Path, tmp_path: Path) -> None:
    settings = ("certify.certifier=sequential", "certify.together=4", "precision=fp32")
    [one] = run_certify(recipe(runs, *settings, "certify.parallel=1"), out=tmp_path / "one")
    [two] = run_certify(recipe(runs, *settings, "certify.parallel=2"), out=tmp_path / "two")
    assert without_time(two.tsv) == without_time(one.tsv)
    assert json.loads(two.header.read_text())["parallel"] == 2


def test_auto_batch_size_is_recorded_as_chosen(runs: Path) -> None:
    [result] = run_certify(recipe(runs, "certify.batch_size=auto", "certify.max_examples=1"))
    assert json.loads(result.header.read_text())["batch_size"] == 256  # on a CPU
    assert result.rows[0].n == 60


# -- a full disk ----------------------------------------------------------------------------
def test_a_full_disk_stops_with_one_line_and_keeps_whole_rows(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [whole] = run_certify(recipe(runs), out=tmp_path / "whole")
    write, calls = RowFile._write, []

    def filling_up(self: RowFile, data: memoryview) -> int:
        calls.append(1)
        if len(calls) == 5:  # the column header and three rows fit; half the fourth does
            write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(RowFile, "_write", filling_up)
    small = [arg for item in SMALL for arg in ("--set", item)]
    out = tmp_path / "full"
    args = ["--sigma", "0.5", "--set", f"runs_dir={runs}", "--set", "device=cpu", *small]
    one_row_per_write = ["--set", "certify.together=1"]
    result = cli(RECIPE, *args, *one_row_per_write, "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]  # under the progress bar, as it stopped
    assert f"could not write to {out / 'sigma-0.5.tsv'}: No space left on device" in line
    assert "run the same command again to resume" in line
    text = (out / "sigma-0.5.tsv").read_text()
    assert text.endswith("\n") and len(read_lines(out / "sigma-0.5.tsv")) == 3  # whole rows
    assert without_time(out / "sigma-0.5.tsv") == without_time(whole.tsv)[:4]
    monkeypatch.setattr(RowFile, "_write", write)  # space again: the rerun resumes
    [resumed] = run_certify(recipe(runs), out=out)
    assert resumed.certified_now == 5
    assert without_time(resumed.tsv) == without_time(whole.tsv)


# -- the estimate ---------------------------------------------------------------------------
def test_estimate_follows_the_job_size_and_writes_nothing(runs: Path, tmp_path: Path) -> None:
    save_classifier(runs / "digits" / "finetune" / "sigma-0.25" / "best.pth", sigma=0.25)
    out = tmp_path / "estimated"
    job = recipe(runs, "certify.sigma=[0.25,0.5]", "certify.certifier=sequential")
    estimates = estimate_certify(job, out=out, seconds=0.05)
    assert not out.exists()
    assert [e.sigma for e in estimates] == [0.25, 0.5]
    for e in estimates:
        assert (e.selected, e.todo, e.passes, e.exact) == (8, 8, 8 * (10 + 60), False)
        assert "an upper bound: sequential stops early" in e.note
        assert (e.device, e.precision, e.batch_size, e.forward_size) == (
            "cpu", CPU_AUTO_PRECISION, 32, 32
        )  # fmt: skip
        t = e.throughput
        assert t is not None and t.copies % 32 == 0 and t.copies >= 32 and t.seconds > 0
        assert t.copies_per_second == pytest.approx(t.copies / t.seconds)
        assert e.seconds == pytest.approx(8 * (t.select_seconds + 60 / t.copies_per_second))
    [skipping] = estimate_certify(recipe(runs, "certify.skip_wrong=true"), out=out, seconds=0.01)
    assert not skipping.exact and "--skip-wrong" in skipping.note


def test_estimate_counts_only_what_is_left(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(estimate_module, "ESTIMATE_SECONDS", 0.05)
    run_certify(recipe(runs, "certify.max_examples=3"))
    out = runs / "digits" / "certify"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    small = [arg for item in SMALL for arg in ("--set", item)]
    result = cli(RECIPE, "--sigma", "0.5", "--set", f"runs_dir={runs}", *small, "--estimate")
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    assert "5 of 8" in result.stdout and f"{5 * 70:,}" in result.stdout
    assert "exact: cohen draws n0 + n copies per example" in result.stdout
    assert f"on cpu, {CPU_AUTO_PRECISION}, batch size 32" in result.stdout
    [done] = estimate_certify(recipe(runs, "certify.max_examples=3"), seconds=0.01)
    assert (done.todo, done.passes, done.seconds, done.throughput) == (0, 0, 0.0, None)


def test_compile_without_a_working_compiler_is_one_line(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compiler(*args: object, **kwargs: object) -> object:
        def compiled(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    out = tmp_path / "compiled"
    result = cli(
        RECIPE, "--sigma", "0.5", "--batch-size", "32", "--set", f"runs_dir={runs}", "--compile",
        "--out", str(out),
    )  # fmt: skip
    line = one_line_error(result)
    assert "--compile: torch.compile cannot compile the classifier on cpu" in line
    assert "certify without --compile" in line and not out.exists()  # before any file


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
        (["--batch-size", "-3"], "batch_size: expected an integer >= 1, or auto (0 also"),
        (["--batch-size", "lots"], "batch_size: expected an integer >= 1, or auto"),
        (["--set", "certify.parallel=0"], "certify.parallel: expected an integer >= 1, or auto"),
        (["--sigma", "-1"], "certify.sigma: expected one or more numbers > 0"),
        (["--certifier", "nope"], "unknown certifier 'nope'; available: cohen, sequential"),
        (
            ["--set", "certify.options={bogus: 1}"],
            "certifier 'cohen' from dmae rejected its options",
        ),
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
    for flag in ("--estimate", "--compile", "--batch-size auto"):
        assert flag in result.output
