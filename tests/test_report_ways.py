"""`dmae report` shows the ways of getting a certified classifier side by side.

The four ways of issue 19, told apart by the run file's JSON header (`classifier_sigma`,
`denoiser`, `denoiser_tuned_for`): a clean classifier alone (named as not a smoothing model),
a clean classifier behind a DMAE denoiser (untuned or tuned for it), a noise-trained classifier
behind one, and the paper's way (fine-tuned with noise). Files without those keys give the
report of before, byte for byte; runs compared at one sigma are compared on the examples they
all certified.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.report.inputs import find_inputs
from dmae_cli.report.kinds import file_kind
from dmae_cli.report.plots import curves_figure
from dmae_cli.report.tables import build_report
from dmae_cli.smoothing.runfile import HEADER_LINE, Row, tsv_path, write_header
from tests.conftest import one_line_error

runner = CliRunner()
BEFORE = Path(__file__).with_name("report_ways_before.json")  # today's output, recorded once
FORMATS = "table,markdown,latex,csv,json"
RADII = "0,0.5,1"

# (label, predict, radius) per example; idx is the position unless given
LOW = [(3, 3, 0.61), (1, 1, 0.5), (4, 4, 0.12), (7, -1, 0.0), (2, 5, 0.9), (0, 0, 0.25)]
HIGH = [(3, 3, 1.2), (1, 1, 0.4), (4, -1, 0.0), (7, 7, 1.0), (2, 5, 1.6), (0, 0, 1.0)]


def certified(
    directory: Path,
    sigma: float,
    rows: list[tuple[int, int, float]],
    keys: dict[str, Any] | None = None,
    idx: list[int] | None = None,
) -> Path:
    """A run file as `dmae certify` writes it, its header holding `keys` besides the usual."""
    directory.mkdir(parents=True, exist_ok=True)
    tsv = tsv_path(directory, sigma)
    indices = idx if idx is not None else list(range(len(rows)))
    lines = [HEADER_LINE]
    for i, (label, predict, radius) in zip(indices, rows, strict=True):
        row = Row(
            i, label, predict, radius, int(predict == label), 0.5, 900, 1000, 100, "cohen",
            None, "budget",
        )  # fmt: skip
        lines.append(row.line())
    tsv.write_text("".join(lines))
    header = {"sigma": sigma, "n0": 100, "n": 1000, "alpha": 0.001, "certifier": "cohen"}
    write_header(tsv, {**header, **(keys or {})})
    return tsv


def cohen_file(path: Path, rows: list[tuple[int, int, float]]) -> Path:
    """Cohen et al.'s format: no header, nothing said about the classifier."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for i, (label, predict, radius) in enumerate(rows):
        lines.append(f"{i}\t{label}\t{predict}\t{radius:.3}\t{int(label == predict)}\t0:00:01")
    path.write_text("\n".join(lines) + "\n")
    return path


def old_inputs(tmp: Path) -> list[Path]:
    """Two runs of files written before the header said how the classifier was made, and a
    file of Cohen et al.'s: the same examples at each sigma."""
    for sigma, rows in ((0.25, LOW), (0.5, HIGH)):
        certified(tmp / "runs" / "digits" / "certify", sigma, rows)
    certified(tmp / "runs" / "other" / "certify", 0.25, HIGH)
    cohen = cohen_file(tmp / "cohen" / "noise_0.50", LOW)
    return [tmp / "runs" / "digits", tmp / "runs" / "other", cohen]


def report(*args: object) -> Any:
    """`dmae report` at a fixed terminal width."""
    return runner.invoke(app, ["report", *map(str, args)], env={"COLUMNS": "160"})


def all_outputs(paths: list[Path], tmp: Path) -> dict[str, str]:
    """Every format, and the comparison with the published rows, as text (paths as <tmp>)."""
    result = report(*paths, "--radii", RADII, "--format", FORMATS, "--compare", "cifar10")
    assert result.exit_code == 0, result.output
    return {
        "stdout": result.stdout.replace(str(tmp), "<tmp>"),
        "stderr": result.stderr.replace(str(tmp), "<tmp>"),
    }


def test_files_without_the_new_keys_give_the_report_of_before_byte_for_byte(
    tmp_path: Path,
) -> None:
    assert all_outputs(old_inputs(tmp_path), tmp_path) == json.loads(BEFORE.read_text())


# -- the four ways --------------------------------------------------------------------------------
NO_DENOISER = {"denoiser": None, "denoiser_sha256": None, "denoiser_tuned_for": None}
DENOISER = {"denoiser": "runs/digits/pretrain/last.pth", "denoiser_sha256": "d" * 64}
UNTUNED = {**DENOISER, "denoiser_tuned_for": None}
# tuned for the very classifier certified behind it: its file's sha256
TUNED = {**DENOISER, "denoiser_tuned_for": "c" * 64, "checkpoint_sha256": "c" * 64}

PAPER = "classifier fine-tuned with noise (the paper's way)"
ALONE = "clean classifier alone (not a smoothing model)"
WITH_DENOISER = "clean classifier + DMAE denoiser"
WITH_TUNED = "clean classifier + tuned DMAE denoiser"
CSV_BEFORE = (
    "run,series,sigma,file,radius,certified_accuracy,ci_low,ci_high,certified,examples,"
    "abstention_rate,acr,clean_accuracy"
)


def four_ways(tmp: Path) -> list[Path]:
    """The runs of issue 19 on the same examples: the paper's way (two sigmas), a clean
    classifier alone, and the clean classifier behind a DMAE denoiser, untuned and tuned."""
    runs = tmp / "runs"
    for sigma, rows in ((0.25, LOW), (0.5, HIGH)):
        certified(runs / "digits" / "certify", sigma, rows, {"classifier_sigma": sigma})
    clean = {"classifier_sigma": 0.0}
    certified(runs / "digits-clean" / "certify", 0.25, LOW, {**clean, **NO_DENOISER})
    certified(runs / "digits" / "certify-denoised", 0.25, HIGH, {**clean, **UNTUNED})
    certified(runs / "digits" / "certify-tuned", 0.25, HIGH, {**clean, **TUNED})
    return [
        runs / "digits",
        runs / "digits-clean",
        runs / "digits" / "certify-denoised",
        runs / "digits" / "certify-tuned",
    ]


WAYS = {  # run name: its kind
    "digits": PAPER,
    "digits-clean": ALONE,
    "digits/certify-denoised": WITH_DENOISER,
    "digits/certify-tuned": WITH_TUNED,
}


@pytest.mark.parametrize(
    ("keys", "label"),
    [
        ({}, None),
        ({"classifier_sigma": None, **NO_DENOISER}, None),
        ({"classifier_sigma": 0.5}, PAPER),
        ({"classifier_sigma": 0, **NO_DENOISER}, ALONE),
        ({"classifier_sigma": 0.0, **UNTUNED}, WITH_DENOISER),
        ({"classifier_sigma": 0.0, **TUNED}, WITH_TUNED),
        ({"classifier_sigma": 0.25, **UNTUNED}, "classifier (sigma 0.25) + DMAE denoiser"),
        ({"classifier_sigma": 0.25, **TUNED}, "classifier (sigma 0.25) + tuned DMAE denoiser"),
        ({"classifier_sigma": None, **UNTUNED}, "classifier + DMAE denoiser"),
        ({"denoiser_tuned_for": "c" * 64}, None),  # tuned for, but no denoiser: says nothing
        (  # a denoiser tuned for one classifier in front of another
            {"classifier_sigma": 0.0, **TUNED, "checkpoint_sha256": "e" * 64},
            "clean classifier + DMAE denoiser tuned for another classifier",
        ),
    ],
)
def test_a_files_kind_comes_from_its_header(keys: dict, label: str | None) -> None:
    kind = file_kind(keys, Path("sigma-0.25.json"))
    assert (None if kind is None else kind.label) == label


@pytest.mark.parametrize("value", ["0.25", -0.5, True, float("nan"), [0]])
def test_a_classifier_sigma_that_is_not_a_number_is_one_line(tmp_path: Path, value: Any) -> None:
    tsv = certified(tmp_path / "certify", 0.25, LOW, {"classifier_sigma": value})
    message = one_line_error(report(tsv))
    assert f"{tsv.with_suffix('.json')}: classifier_sigma" in message


def test_certify_directories_of_one_run_have_names_of_their_own(tmp_path: Path) -> None:
    inputs = find_inputs(four_ways(tmp_path))
    assert list(dict.fromkeys(run for _, run in inputs)) == list(WAYS)
    given = tmp_path / "runs" / "digits" / "certify-denoised"
    assert {run for _, run in find_inputs(sorted(given.glob("*.tsv")))} == {
        "digits/certify-denoised"
    }


def test_directories_of_one_name_are_told_apart(tmp_path: Path) -> None:
    """Two runs named digits under different roots were one run of twice the files."""
    a, b = tmp_path / "a" / "digits", tmp_path / "b" / "digits"
    certified(a / "certify", 0.25, LOW)
    certified(b / "certify", 0.25, HIGH)
    names = [run for _, run in find_inputs([a, b])]
    assert len(set(names)) == 2
    assert [Path(n).resolve() for n in names] == [a.resolve(), b.resolve()]
    report_ = build_report([a, b], (0.0,))
    assert [len(run.summaries) for run in report_.runs] == [1, 1]


def test_every_format_names_each_way(tmp_path: Path) -> None:
    result = report(*four_ways(tmp_path), "--radii", RADII, "--format", FORMATS)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for number, (run, kind) in enumerate(WAYS.items(), 1):
        assert f"{run}: {kind}\n" in out  # the line above the run's terminal table
        assert f"{number}: {run}, {kind}\n" in out  # the legend of the side-by-side table
        assert f"| {run} σ=0.25 | {kind} | 6 |" in out  # markdown
        assert f"{run} $\\sigma$=0.25 & {kind.replace('%', '')} & 6 &" in out  # LaTeX
    assert "| digits best over σ | classifier fine-tuned with noise (the paper's way) |  |" in out
    assert "not a smoothing model (a baseline)" in out  # the caption says what the kinds mean
    assert r"\begin{tabular}{llrrrrrrr}" in out  # the kind is a text column
    data = json.loads(out[out.index("{\n") :])
    assert {run["run"]: run["kind"] for run in data["runs"]} == WAYS
    assert list(data["runs"][0]) == ["run", "files", "envelope", "kind"]  # appended
    for run in data["runs"]:
        assert {f["kind"] for f in run["files"]} == {WAYS[run["run"]]}
        assert list(run["files"][0])[-1] == "kind"


def test_the_csv_keeps_its_columns_and_appends_the_kind(tmp_path: Path) -> None:
    result = report(*four_ways(tmp_path), "--radii", RADII, "--format", "csv")
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header == CSV_BEFORE + ",kind"
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(lines) == 3 * (2 + 1 + 1 + 1 + 1)  # 5 files and 1 envelope
    assert {(row["run"], row["kind"]) for row in rows} == set(WAYS.items())
    before = [line.rsplit(",", 1)[0] for line in lines]  # without the kind: as before
    for row, line in zip(rows, before, strict=True):
        assert line.split(",")[:2] == [row["run"], row["series"]]


def test_the_comparison_with_the_paper_names_the_ways(tmp_path: Path) -> None:
    result = report(*four_ways(tmp_path), "--radii", "0.25,0.5", "--compare", "cifar10")
    assert result.exit_code == 0, result.output
    for name in (
        "ours: digits, paper's way (best over σ)",
        "ours: digits-clean, clean alone, not a smoothing model (σ=0.25)",
        "ours: digits/certify-denoised, clean + denoiser (σ=0.25)",
        "ours: digits/certify-tuned, clean + tuned denoiser (σ=0.25)",
    ):
        assert name in result.stdout


def test_the_curves_name_the_ways(tmp_path: Path) -> None:
    labels = legend(build_report(four_ways(tmp_path), (0.0, 0.5)))
    assert labels == [
        "digits (paper's way) σ = 0.25",
        "digits (paper's way) σ = 0.5",
        "digits (paper's way) best over σ",
        "digits-clean (clean alone, not a smoothing model) σ = 0.25",
        "digits/certify-denoised (clean + denoiser) σ = 0.25",
        "digits/certify-tuned (clean + tuned denoiser) σ = 0.25",
    ]


def legend(built: Any) -> list[str]:
    (ax,) = curves_figure(built).axes
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_papers_way_alone_reads_as_before(tmp_path: Path) -> None:
    """What dmae always reported needs no name: the same files with and without the keys give
    the same report (so the pipeline's own report, and its golden CSV, do not change)."""
    outputs = []
    for name, keys in (("old", {}), ("new", {"classifier_sigma": 0.25, **NO_DENOISER})):
        for sigma, rows in ((0.25, LOW), (0.5, HIGH)):
            certified(tmp_path / name / "digits" / "certify", sigma, rows, keys)
        outputs.append(all_outputs([tmp_path / name / "digits"], tmp_path / name))
    assert outputs[0] == outputs[1]
    assert "kind" not in outputs[1]["stdout"]


# -- kinds of one run -----------------------------------------------------------------------------
def test_a_noise_trained_classifier_per_sigma_behind_a_denoiser_is_one_kind(
    tmp_path: Path,
) -> None:
    where = tmp_path / "digits" / "certify-denoised"
    for sigma in (0.25, 0.5):
        certified(where, sigma, LOW, {"classifier_sigma": sigma, **UNTUNED})
    (run,) = build_report([where], (0.0,)).runs
    assert run.kind is not None and run.kind.label == "noise-trained classifier + DMAE denoiser"
    assert [s.results.kind.label for s in run.summaries] == [
        "classifier (sigma 0.25) + DMAE denoiser",
        "classifier (sigma 0.5) + DMAE denoiser",
    ]


@pytest.mark.parametrize(
    ("second", "label"),
    [
        ({"classifier_sigma": 0.5}, f"mixed: {ALONE}; {PAPER}"),
        ({}, f"mixed: {ALONE}; kind not recorded"),
    ],
)
def test_mixed_kinds_in_one_run_are_said(tmp_path: Path, second: dict, label: str) -> None:
    where = tmp_path / "digits" / "certify"
    certified(where, 0.25, LOW, {"classifier_sigma": 0.0})
    certified(where, 0.5, HIGH, second)
    result = report(where.parent, "--radii", RADII, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert "run digits: its files are of different kinds" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {row["kind"] for row in rows if row["series"] == "envelope"} == {label}
    assert rows[0]["kind"] == ALONE  # each file keeps its own


# -- the same examples ----------------------------------------------------------------------------
def direct(rows: list[tuple[int, int, float]], idx: list[int], keep: set[int], r: float) -> float:
    """Certified accuracy at r of the rows whose idx is in `keep`, written out."""
    kept = [row for i, row in zip(idx, rows, strict=True) if i in keep]
    return sum(1 for label, p, radius in kept if p == label and radius >= r) / len(kept)


def test_runs_with_different_examples_are_compared_on_those_they_share(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    certified(a / "certify", 0.25, LOW, {"classifier_sigma": 0.25})
    certified(b / "certify", 0.25, HIGH, {"classifier_sigma": 0.0}, idx=[2, 3, 4, 5, 6, 7])
    certified(b / "certify", 0.5, HIGH, {"classifier_sigma": 0.0})  # only b: not cut
    with pytest.warns(UserWarning) as caught:
        built = build_report([a, b], (0.0, 0.5))
    messages = [str(w.message) for w in caught]
    assert messages == [
        "sigma 0.25: the runs certified different examples (a 6, b 6); compared on the 4 "
        "they share",
        "run b: files have different numbers of examples (4, 6); the envelope compares different "
        "test subsets",  # its sigma-0.25 file was cut, its sigma-0.5 file not
    ]
    run_a, run_b = built.runs
    shared = {2, 3, 4, 5}
    assert run_a.summaries[0].examples == run_b.summaries[0].examples == 4
    for r, point in zip((0.0, 0.5), run_a.summaries[0].points, strict=True):
        assert point.accuracy == pytest.approx(direct(LOW, list(range(6)), shared, r))
    for r, point in zip((0.0, 0.5), run_b.summaries[0].points, strict=True):
        assert point.accuracy == pytest.approx(direct(HIGH, [2, 3, 4, 5, 6, 7], shared, r))
    assert run_b.summaries[1].examples == 6
    assert run_a.summaries[0].results.indices().tolist() == [2, 3, 4, 5]


def test_the_warning_reaches_the_terminal_as_one_line(tmp_path: Path) -> None:
    certified(tmp_path / "a" / "certify", 0.25, LOW)
    certified(tmp_path / "b" / "certify", 0.25, LOW[:4])
    result = report(tmp_path / "a", tmp_path / "b", "--radii", RADII, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: sigma 0.25: the runs certified different examples (a 6, b 4); compared on "
        "the 4 they share"
    ]
    assert {row["examples"] for row in csv.DictReader(io.StringIO(result.stdout))} == {"4"}


def test_a_run_sharing_no_example_is_reported_as_it_is(tmp_path: Path) -> None:
    for name, idx in (("a", range(6)), ("b", range(2, 8)), ("c", range(100, 106))):
        certified(tmp_path / name / "certify", 0.25, LOW, idx=list(idx))
    with pytest.warns(UserWarning) as caught:
        built = build_report([tmp_path / n for n in "abc"], (0.0,))
    assert [str(w.message) for w in caught] == [
        "sigma 0.25: c certified none of the other runs' examples; reported on its own 6",
        "sigma 0.25: the runs certified different examples (a 6, b 6); compared on the 4 "
        "they share",
    ]
    assert [run.summaries[0].examples for run in built.runs] == [4, 4, 6]


def test_one_run_keeps_every_file_whole(tmp_path: Path) -> None:
    """The files of one run are not cut against each other (the envelope warns instead)."""
    where = tmp_path / "digits" / "certify"
    certified(where, 0.25, LOW)
    certified(where, 0.5, HIGH[:4], idx=[10, 11, 12, 13])
    with pytest.warns(UserWarning, match="different numbers of examples"):
        (run,) = build_report([where.parent], (0.0,)).runs
    assert [s.examples for s in run.summaries] == [6, 4]


def test_files_that_do_not_name_their_examples_are_compared_as_they_are(tmp_path: Path) -> None:
    certified(tmp_path / "a" / "certify", 0.25, LOW)
    text = tmp_path / "b" / "noise_0.25"
    text.parent.mkdir()
    text.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + "img-1\t3\t3\t0.5\t1\t1\n"
    )  # text indices: which test examples are these?
    with pytest.warns(UserWarning, match="cannot check that the runs certified the same"):
        built = build_report([tmp_path / "a", text], (0.0,))
    assert [run.summaries[0].examples for run in built.runs] == [6, 1]


def test_the_terminal_puts_the_ways_side_by_side_at_each_sigma(tmp_path: Path) -> None:
    """One table per sigma that several runs certified, a column per run, in 80 columns."""
    paths = four_ways(tmp_path)
    args = ["report", *map(str, paths), "--radii", RADII]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("side by side") == 1  # at sigma 0.5 the paper's way is alone
    assert max(len(line) for line in out.splitlines()) <= 80
    table = out[out.index("side by side") :].splitlines()
    header = next(line for line in table if "radius" in line)
    assert [cell.strip() for cell in header.split("┃")[2:6]] == ["1", "2", "3", "4"]
    at_sigma = {run.run: run.summaries[0] for run in build_report(paths, (0.5,)).runs}
    rows = [line.split("│") for line in table if line.startswith("│")]
    cells = [float(c) for c in next(r for r in rows if r[1].strip() == "0.5")[2:6]]
    assert cells == [round(100 * at_sigma[run].points[0].accuracy, 1) for run in WAYS]
    assert len(set(cells)) > 1  # the runs differ: the columns are not one run repeated
