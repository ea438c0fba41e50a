"""`dmae report`: every number against a direct computation, the readers, errors and curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from scipy.stats import binomtest, norm
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.report import published
from dmae_cli.report.inputs import find_inputs, read_results, with_alpha
from dmae_cli.report.plots import curves_figure, save_curves
from dmae_cli.report.run import parse_radii
from dmae_cli.report.tables import build_report
from dmae_cli.runtime.errors import UserError
from tests.conftest import one_line_error

runner = CliRunner()
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)

# (label, predict, radius, correct) per example, as Cohen et al.'s certify.py writes them.
# Includes: an abstention (predict -1), a wrong prediction with a large radius, radii exactly
# on a table radius (0.5, 1.0), and an abstention whose file says correct=1 (never correct).
ROWS = {
    0.25: [
        (3, 3, 0.61, 1),
        (1, 1, 0.5, 1),
        (4, 4, 0.12, 1),
        (7, -1, 0.0, 0),
        (2, 5, 0.9, 0),
        (0, 0, 0.25, 1),
        (9, 9, 0.74, 1),
        (8, 8, 0.03, 1),
    ],
    0.5: [
        (3, 3, 1.2, 1),
        (1, 1, 0.4, 1),
        (4, -1, 0.0, 1),
        (7, -1, 0.0, 0),
        (2, 5, 1.6, 0),
        (0, 0, 1.0, 1),
        (9, 9, 0.5, 1),
        (8, 2, 0.2, 0),
    ],
}


def cohen_file(path: Path, rows: list[tuple[int, int, float, int]], extra: str = "") -> Path:
    lines = [HEADER.rstrip("\n") + extra]
    for i, (label, predict, radius, correct) in enumerate(rows):
        lines.append(f"{i}\t{label}\t{predict}\t{radius:.3}\t{correct}\t0:00:01.234567")
    path.write_text("\n".join(lines) + "\n")
    return path


def direct(rows: list[tuple[int, int, float, int]], radius: float) -> float:
    """Certified accuracy by its definition, written out independently of the code."""
    hits = sum(1 for _, p, r, c in rows if c == 1 and p != -1 and r >= radius)
    return hits / len(rows)


@pytest.fixture
def cohen_pair(tmp_path: Path) -> list[Path]:
    return [
        cohen_file(tmp_path / "noise_0.25", ROWS[0.25]),
        cohen_file(tmp_path / "sigma_0.50", ROWS[0.5]),
    ]


def invoke(*args: str):
    return runner.invoke(app, ["report", *map(str, args)])


# -- numbers ------------------------------------------------------------------------------------
def test_every_number_equals_a_direct_computation(cohen_pair: list[Path]) -> None:
    report = build_report(cohen_pair, RADII)
    (run,) = report.runs
    assert [s.sigma for s in run.summaries] == [0.25, 0.5]
    for s in run.summaries:
        rows = ROWS[s.sigma]
        assert s.examples == len(rows)
        assert [p.accuracy for p in s.points] == pytest.approx([direct(rows, r) for r in RADII])
        assert s.clean.accuracy == pytest.approx(direct(rows, 0.0))
        acr = sum(r for _, p, r, c in rows if c and p != -1) / len(rows)
        assert s.acr == pytest.approx(acr)
        assert s.abstention_rate == pytest.approx(sum(p == -1 for _, p, _, _ in rows) / len(rows))
        for p in s.points:
            ci = binomtest(p.certified, p.total).proportion_ci(0.95, method="exact")
            assert (p.low, p.high) == pytest.approx((ci.low, ci.high))
    for i, r in enumerate(RADII):
        best = max(direct(ROWS[s], r) for s in ROWS)
        winner = min(s for s in ROWS if direct(ROWS[s], r) == best)  # ties: the smaller sigma
        assert run.envelope[i].point.accuracy == pytest.approx(best)
        assert run.envelope[i].sigma == winner


def test_hand_checked_values(cohen_pair: list[Path]) -> None:
    """A few numbers worked out by hand, so the direct computation is checked too."""
    run = build_report(cohen_pair, (0.0, 0.5, 1.0)).runs[0]
    low, high = run.summaries
    assert [p.certified for p in low.points] == [6, 3, 0]  # 0.61, 0.5 (on the radius), 0.74
    assert [p.certified for p in high.points] == [4, 3, 2]  # abstention with correct=1 excluded
    assert high.acr == pytest.approx((1.2 + 0.4 + 1.0 + 0.5) / 8)
    assert high.abstention_rate == pytest.approx(2 / 8)
    assert [e.sigma for e in run.envelope] == [0.25, 0.25, 0.5]


def test_ci_alpha_widens_the_interval(cohen_pair: list[Path]) -> None:
    narrow = build_report(cohen_pair, (0.5,), ci_alpha=0.2).runs[0].summaries[0].points[0]
    wide = build_report(cohen_pair, (0.5,), ci_alpha=0.01).runs[0].summaries[0].points[0]
    assert wide.low < narrow.low <= narrow.accuracy <= narrow.high < wide.high


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:3:0.25", tuple(i * 0.25 for i in range(13))),
        ("0:1:0.3", (0.0, 0.3, 0.6, 0.9)),
        ("0,0.5,1", (0.0, 0.5, 1.0)),
        ("1, 0.5", (0.5, 1.0)),
    ],
)
def test_parse_radii(text: str, expected: tuple[float, ...]) -> None:
    assert parse_radii(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0:3", "0:3:0", "3:0:0.5", "a,b", "-1,0", ""])
def test_bad_radii(text: str) -> None:
    with pytest.raises(UserError, match="--radii"):
        parse_radii(text)


# -- readers ------------------------------------------------------------------------------------
def test_sigma_from_names_column_and_option(tmp_path: Path) -> None:
    rows = ROWS[0.25]
    assert read_results(cohen_file(tmp_path / "sigma-0.5.tsv", rows)).sigma == 0.5
    assert read_results(cohen_file(tmp_path / "noise_0.25", rows)).sigma == 0.25
    nested = tmp_path / "noise_1.00" / "test"
    nested.mkdir(parents=True)
    assert read_results(cohen_file(nested / "results", rows)).sigma == 1.0
    plain = cohen_file(tmp_path / "certify.tsv", rows)
    assert read_results(plain, sigma=0.12).sigma == 0.12
    with pytest.raises(UserError, match="pass --sigma"):
        read_results(plain)
    column = tmp_path / "with-column.tsv"
    column.write_text(
        HEADER.rstrip("\n")
        + "\tsigma\n"
        + "0\t1\t1\t0.3\t1\t0.1\t0.75\n1\t2\t2\t0.1\t1\t0.1\t0.75\n"
    )
    with pytest.warns(UserWarning, match="--sigma 0.5 ignored"):
        assert read_results(column, sigma=0.5).sigma == 0.75


def ours(directory: Path, sigma: float, rows: list[tuple], certifier: str = "cohen") -> Path:
    """A file as `dmae certify` writes it, through its run-file module (names, rows, header)."""
    from dmae_cli.smoothing.runfile import HEADER_LINE, Row, tsv_path, write_header

    directory.mkdir(parents=True, exist_ok=True)
    tsv = tsv_path(directory, sigma)
    lines = [HEADER_LINE]
    for idx, (label, predict, radius, count_top, n) in enumerate(rows):
        row = Row(
            idx, label, predict, radius, int(predict == label), 0.5, count_top, n, 100,
            certifier, None, "budget" if n else "skipped",
        )  # fmt: skip
        lines.append(row.line())
    tsv.write_text("".join(lines))
    header = {"sigma": sigma, "n0": 100, "n": 1000, "alpha": 0.001, "certifier": certifier}
    write_header(tsv, header)
    return tsv


def cohen_row(label: int, count_top: int, n: int, sigma: float, alpha: float = 0.001) -> tuple:
    """A row whose prediction and radius follow from the counts, computed with binomtest."""
    low = binomtest(count_top, n).proportion_ci(1 - 2 * alpha, method="exact").low
    if low < 0.5:
        return (label, -1, 0.0, count_top, n)
    return (label, label, sigma * float(norm.ppf(low)), count_top, n)


OUR_ROWS = [
    (3, 990, 1000),  # large radius
    (1, 700, 1000),  # certified at alpha 0.001
    (4, 520, 1000),  # abstains at alpha 0.001, certifies at 0.4
    (2, 0, 1000),
]


def test_our_run_directory_and_certify_directory(tmp_path: Path) -> None:
    certify = tmp_path / "runs" / "digits" / "certify"
    for sigma in (0.25, 0.5):
        ours(certify, sigma, [cohen_row(lab, k, n, sigma) for lab, k, n in OUR_ROWS])
    for target in (certify.parent, certify):
        inputs = find_inputs([target])
        assert [p.name for p, _ in inputs] == ["sigma-0.25.tsv", "sigma-0.5.tsv"]
        assert {run for _, run in inputs} == {"digits"}
    report = build_report([certify.parent], (0.0, 0.5))
    s = report.runs[0].summaries[1]
    assert s.sigma == 0.5 and s.examples == 4
    assert s.clean.certified == 2 and s.abstentions == 2


def test_alpha_recomputes_cohen_radii_from_counts(tmp_path: Path) -> None:
    sigma = 0.5
    tsv = ours(tmp_path / "certify", sigma, [cohen_row(lab, k, n, sigma) for lab, k, n in OUR_ROWS])
    results = read_results(tsv)
    for alpha in (0.001, 0.05):
        # at the file's own alpha nothing changes; a looser alpha gives larger radii
        redone = with_alpha(results, alpha)
        for i, (label, k, n) in enumerate(OUR_ROWS[:2]):
            expected = cohen_row(label, k, n, sigma, alpha)
            assert redone.radius[i] == pytest.approx(expected[2], rel=1e-9)
            assert redone.correct[i]
    with pytest.warns(UserWarning, match="1 abstained rows would certify"):
        loose = with_alpha(results, 0.4)
    assert not loose.correct[2]  # the file cannot say which class the abstention selected
    strict = with_alpha(results, 1e-300)
    assert strict.radius[0] < results.radius[0]


def test_alpha_gives_back_the_cohen_certifiers_own_radius_bit_for_bit(tmp_path: Path) -> None:
    """The certifier and `--alpha` share one radius function: at the file's alpha, no change."""
    import torch

    from dmae_cli.api import CertifyRequest, simulate
    from dmae_plugins.certifiers.cohen import Cohen

    rows = []
    for label, k, n in OUR_ROWS:
        selection, estimation = torch.zeros(10, dtype=torch.int64), torch.zeros(10).long()
        selection[label], estimation[label], estimation[label - 1] = 100, k, n - k
        answers = iter([selection, estimation])
        cert = simulate(Cohen(), CertifyRequest(0.5, 1e-3, 100, n), lambda _, a=answers: next(a))
        rows.append((label, cert.prediction, cert.radius, cert.count_top, cert.n))
    results = read_results(ours(tmp_path / "certify", 0.5, rows))
    assert results.radius.tolist() == [r[2] for r in rows] and any(results.radius > 0)
    assert with_alpha(results, 0.001).radius.tolist() == [r[2] for r in rows]


def test_alpha_leaves_other_certifiers_and_cohen_files_alone(tmp_path: Path) -> None:
    rows = [cohen_row(lab, k, n, 0.5) for lab, k, n in OUR_ROWS]
    other = read_results(ours(tmp_path / "a", 0.5, rows, certifier="sequential"))
    with pytest.warns(UserWarning, match="other than cohen"):
        assert np.array_equal(with_alpha(other, 0.05).radius, other.radius)
    plain = read_results(cohen_file(tmp_path / "sigma_0.25", ROWS[0.25]))
    with pytest.warns(UserWarning, match="no count_top/n columns"):
        assert with_alpha(plain, 0.05) is plain


def test_an_interrupted_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = cohen_file(tmp_path / "sigma_0.25", ROWS[0.25])
    path.write_text(path.read_text() + "8\t3\t3")  # no newline: a crash mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert len(read_results(path)) == len(ROWS[0.25])


# -- errors -------------------------------------------------------------------------------------
def malformed(tmp_path: Path, body: str, name: str = "sigma_0.25") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD = "0\t1\t1\t0.5\t1\t0:00:01\n"


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        (HEADER + GOOD + GOOD.replace("0\t", "1\t", 1) + "2\t1\t1\t0.5\n", 4, "fields"),
        (HEADER + GOOD + "1\t1\t1\tbig\t1\t0:00:01\n", 3, "radius 'big'"),
        (HEADER + "0\t1\tcat\t0.5\t1\t0:00:01\n", 2, "predict 'cat'"),
        (HEADER + "0\t1\t1\t0.5\t2\t0:00:01\n", 2, "correct '2'"),
        (HEADER + "0\t1\t1\tnan\t1\t0:00:01\n", 2, "radius 'nan'"),
        (HEADER + GOOD + GOOD, 3, "idx 0 repeats line 2"),
        ("idx\tlabel\tpredict\tcorrect\n0\t1\t1\t1\n", 1, "lacks radius"),
        ("idx label predict radius correct time\n0 1 1 0.5 1 0\n", 1, "lacks"),
        ("", 1, "empty"),
        (HEADER, 1, "no examples"),
    ],
)
def test_malformed_file_is_one_line_with_file_and_line(
    tmp_path: Path, body: str, line: int, words: str
) -> None:
    path = malformed(tmp_path, body)
    message = one_line_error(invoke(path))
    assert f"{path}:{line}:" in message and words in message


def test_binary_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "sigma_0.25"
    path.write_bytes(HEADER.encode() + GOOD.encode() + b"1\t1\t\xff\n")
    assert f"{path}:3:" in one_line_error(invoke(path))


def test_broken_json_header_names_its_line(tmp_path: Path) -> None:
    tsv = ours(tmp_path / "certify", 0.5, [cohen_row(1, 990, 1000, 0.5)])
    tsv.with_suffix(".json").write_text('{\n"sigma": 0.5,\n')
    assert f"{tsv.with_suffix('.json')}:3:" in one_line_error(invoke(tsv))


@pytest.mark.parametrize(
    "args",
    [
        ["nowhere.tsv"],
        ["{tmp}", "--radii", "0:x:1"],
        ["{file}", "--compare", "mnist"],
        ["{file}", "--format", "html"],
        ["{file}", "--plot", "{tmp}/curves.svg"],
        ["{file}", "--alpha", "2"],
    ],
)
def test_user_mistakes_are_one_line(tmp_path: Path, args: list[str]) -> None:
    file = cohen_file(tmp_path / "sigma_0.25", ROWS[0.25])
    result = invoke(*(a.format(tmp=tmp_path, file=file) for a in args))
    assert one_line_error(result).startswith("error:")


def test_empty_run_directory_says_what_it_expected(tmp_path: Path) -> None:
    assert "certify/sigma-*.tsv" in one_line_error(invoke(tmp_path))


# -- outputs ------------------------------------------------------------------------------------
def test_cli_table_is_the_default(cohen_pair: list[Path]) -> None:
    result = invoke(*cohen_pair, "--radii", "0,0.5,1")
    assert result.exit_code == 0, result.output
    for text in ("σ=0.25", "σ=0.5", "best (σ)", "ACR", "abstained", "75.0"):
        assert text in result.stdout


def test_cli_machine_formats(cohen_pair: list[Path]) -> None:
    result = invoke(*cohen_pair, "--radii", "0,0.5,1", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    files = data["runs"][0]["files"]
    assert [f["sigma"] for f in files] == [0.25, 0.5]
    assert [p["certified_accuracy"] for p in files[1]["certified"]] == [0.5, 3 / 8, 2 / 8]
    assert [e["sigma"] for e in data["runs"][0]["envelope"]] == [0.25, 0.25, 0.5]
    result = invoke(*cohen_pair, "--radii", "0,0.5,1", "--format", "csv,markdown,latex")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "run,series,sigma,file,radius,certified_accuracy" in out
    assert "| best over σ |" in out and "37.5 (σ=0.25)" in out
    assert r"\begin{tabular}" in out and r"\sigma" in out


def test_cli_out_writes_every_format_and_the_curves(cohen_pair: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = invoke(*cohen_pair, "--out", out)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "curves.pdf", "curves.png", "report.csv", "report.json", "report.md", "report.tex",
    ]  # fmt: skip
    assert "σ=0.25" in result.stdout  # the table still goes to the terminal
    assert out.joinpath("curves.pdf").read_bytes().startswith(b"%PDF")


def test_compare_puts_published_rows_beside_ours(cohen_pair: list[Path]) -> None:
    result = invoke(*cohen_pair, "--radii", "0.25,0.5,2", "--compare", "cifar10", "--format", "md")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    dmae = next(line for line in lines if line.startswith("| DMAE ViT-B |"))
    assert dmae == "| DMAE ViT-B | 87M | 79.2 | 64.6 | — |"  # r = 2 is not in the paper
    ours_row = next(line for line in lines if line.startswith("| ours: "))
    assert ours_row.endswith("| 50.0 | 37.5 | 0.0 |")
    assert "arXiv:2210.06983" in result.stdout


def test_published_tables_match_paper_section_4() -> None:
    imagenet = published.published_table("imagenet")
    assert imagenet.radii == (0.5, 1.0, 1.5, 2.0, 3.0)
    assert len(imagenet.rows) == 9 and all(row.reference for row in imagenet.rows)
    vit_l = next(row for row in imagenet.rows if row.method == "DMAE ViT-L")
    assert [vit_l.at(r) for r in imagenet.radii] == [73.6, 64.6, 53.7, 41.5, 27.5]
    cifar = published.published_table("cifar10")
    assert cifar.rows[0].at(0.25) == 61.0 and cifar.rows[-1].at(1.0) == 37.7
    assert cifar.rows[0].at(3.0) is None


def test_curves_are_a_real_plot(cohen_pair: list[Path], tmp_path: Path) -> None:
    report = build_report(cohen_pair, RADII)
    fig = curves_figure(report)
    (ax,) = fig.axes
    assert "radius" in ax.get_xlabel() and "certified accuracy" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["σ = 0.25", "σ = 0.5", "best over σ"]
    assert len(ax.get_lines()) == 3
    written = save_curves(report, tmp_path / "curves.png")
    assert [p.name for p in written] == ["curves.png", "curves.pdf"]
    image = mpimg.imread(written[0])[..., :3]
    assert image.shape[0] > 200 and image.std() > 0.05  # not blank
    for hex_colour in ("#1f77b4", "#ff7f0e", "#000000"):  # C0, C1, the envelope
        rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        close = np.abs(image - rgb).max(axis=-1) < 0.08
        assert close.sum() > 100, f"too few {hex_colour} pixels"


@pytest.mark.parametrize("command", ["report", "demo"])
def test_help_has_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output
