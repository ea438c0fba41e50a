"""`dmae report` on hostile and careless inputs: one line naming the file and line, never a
traceback, an absurd allocation or a wrong number; and a large TSV read in bounded memory.

- a negative radius, an integer beyond int64, a repeated header column, a line of megabytes,
  a non-positive or non-finite sigma (column, JSON header, --sigma), counts that cannot be
  votes under --alpha: test_hostile_rows_are_one_line_naming_file_and_line
- a million radii (or infinitely many) asked for: test_too_many_radii_is_one_line
- what the streaming reader must still read as before (comments, blank lines, CRLF, text
  indices, a torn last line, a bad count column that --alpha does not use):
  test_careless_but_readable_files
- memory: test_reading_holds_compact_columns_not_text
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.report.inputs import read_results, with_alpha
from dmae_cli.report.run import MAX_RADII, parse_radii
from dmae_cli.report.tables import build_report
from dmae_cli.runtime.errors import UserError
from tests.conftest import one_line_error

runner = CliRunner()
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
GOOD = "0\t1\t1\t0.5\t1\t0:00:01\n"
OURS = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tcount_top\tn\tn0\tcertifier\tpa_lower\tstop\n"


def invoke(*args: object):
    return runner.invoke(app, ["report", *map(str, args)])


def write(tmp_path: Path, body: str, name: str = "sigma_0.25") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def our_row(idx: int, count_top: object = 990, n: object = 1000, radius: float = 0.5) -> str:
    return f"{idx}\t1\t1\t{radius}\t1\t0.1\t{count_top}\t{n}\t100\tcohen\t\tbudget\n"


HOSTILE = {
    "negative-radius": (
        HEADER + GOOD + "1\t1\t1\t-5\t1\t0:00:01\n",
        [],
        3,
        "radius -5 is negative: a certified radius is >= 0 (an abstention is radius 0 with "
        "predict -1)",
    ),
    "negative-radius-of-a-wrong-row": (
        HEADER + "0\t1\t2\t-0.5\t0\t0:00:01\n",
        [],
        2,
        "radius -0.5 is negative",
    ),
    "label-of-20-digits": (
        HEADER + "0\t12345678901234567890\t1\t0.5\t0\t0:00:01\n",
        [],
        2,
        "label '12345678901234567890' is out of range",
    ),
    "predict-of-20-digits": (
        HEADER + GOOD + "1\t1\t-99999999999999999999\t0.5\t0\t0:00:01\n",
        [],
        3,
        "predict '-99999999999999999999' is out of range",
    ),
    "column-twice": (
        "idx\tlabel\tpredict\tradius\tcorrect\tradius\n0\t1\t1\t0.5\t1\t0.7\n",
        [],
        1,
        "names the column 'radius' twice",
    ),
    "line-of-2-megabytes": (
        HEADER + GOOD + "1\t1\t1\t0.5\t1\t" + "9" * (2 << 20) + "\n",
        [],
        3,
        "a line of more than 1048576 characters",
    ),
    "sigma-column-negative": (
        HEADER.rstrip("\n") + "\tsigma\n" + GOOD.rstrip("\n") + "\t-0.5\n",
        [],
        2,
        "sigma -0.5 is not > 0",
    ),
    "count-top-above-n": (
        OURS + our_row(0) + our_row(1, count_top=1200),
        ["--alpha", "0.01"],
        3,
        "count_top 1200 of n 1000: expected 0 <= count_top <= n",
    ),
    "count-not-an-integer": (
        OURS + our_row(0) + our_row(1, count_top="many"),
        ["--alpha", "0.01"],
        3,
        "count_top 'many' is not an integer",
    ),
    "count-of-20-digits": (
        OURS + our_row(0, n=10**20),
        ["--alpha", "0.01"],
        2,
        "n '100000000000000000000' is out of range",
    ),
}


@pytest.mark.parametrize(("body", "args", "line", "words"), HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_rows_are_one_line_naming_file_and_line(
    tmp_path: Path, body: str, args: list[str], line: int, words: str
) -> None:
    path = write(tmp_path, body)
    message = one_line_error(invoke(path, *args))
    assert f"{path}:{line}: " in message and words in message
    assert len(message) < 400  # a huge value is shown cut short


@pytest.mark.parametrize(
    ("header", "option", "words"),
    [
        ({"sigma": float("nan")}, [], "sigma nan is not a finite number > 0"),
        ({"sigma": float("inf")}, [], "sigma inf is not a finite number > 0"),
        ({"sigma": -1}, [], "sigma -1 is not a finite number > 0"),
        (None, ["--sigma", "nan"], "--sigma nan: expected a finite number > 0"),
        (None, ["--sigma", "inf"], "--sigma inf: expected a finite number > 0"),
        (None, ["--sigma", "-0.5"], "--sigma -0.5: expected a finite number > 0"),
    ],
    ids=["header-nan", "header-inf", "header-negative", "option-nan", "option-inf", "option-neg"],
)
def test_a_sigma_that_is_not_a_positive_number_is_one_line(
    tmp_path: Path, header: dict | None, option: list[str], words: str
) -> None:
    path = write(tmp_path, HEADER + GOOD, "sigma-0.5.tsv")
    if header is not None:
        path.with_suffix(".json").write_text(json.dumps(header))  # NaN and Infinity: Python's
    assert words in one_line_error(invoke(path, *option))


@pytest.mark.parametrize(
    ("radii", "words"),
    [
        ("0:1000000:0.000001", "1000000000001 radii; at most 10000"),
        ("0:1e308:1e-308", "infinitely many radii; at most 10000"),
        ("0:10000:1", "10001 radii; at most 10000"),
        ("0:inf:1", "expected START:STOP:STEP"),
        ("0:1:nan", "expected START:STOP:STEP"),
        ("0:1:2:3", "expected START:STOP:STEP"),
        (",".join(map(str, range(MAX_RADII + 1))), "10001 radii; at most 10000"),
    ],
    ids=[
        "a-million-million",
        "overflowing",
        "one-too-many",
        "infinite",
        "nan-step",
        "4-parts",
        "list",
    ],
)
def test_too_many_radii_is_one_line(tmp_path: Path, radii: str, words: str) -> None:
    path = write(tmp_path, HEADER + GOOD)
    message = one_line_error(invoke(path, "--radii", radii))
    assert message.startswith("error: --radii") and words in message
    assert len(message) < 400  # a long list is shown cut short


def test_the_most_radii_allowed_are_computed() -> None:
    assert len(parse_radii(f"0:{MAX_RADII - 1}:1")) == MAX_RADII
    with pytest.raises(UserError, match="at most"):
        parse_radii(f"0:{MAX_RADII}:1")


# -- careless but readable -----------------------------------------------------------------------
def test_careless_but_readable_files(tmp_path: Path) -> None:
    # comments and blank lines before the header, blank lines between rows, CRLF line ends
    body = "# written by hand\n\n" + HEADER + GOOD + "\n" + "1\t2\t-1\t0\t0\t0:00:01\n"
    crlf = write(tmp_path, body.replace("\n", "\r\n"), "crlf_sigma_0.5.tsv")
    results = read_results(crlf)
    assert len(results) == 2 and results.sigma == 0.5
    assert results.table is not None and results.table.lines.tolist() == [4, 6]
    assert results.correct.tolist() == [True, False] and results.radius.tolist() == [0.5, 0.0]
    # another tool's text indices: read, and a repeat among them is found
    text_idx = write(tmp_path, HEADER + GOOD.replace("0", "img_a", 1) + GOOD.replace("0", "7", 1))
    assert len(read_results(text_idx)) == 2
    twice = write(tmp_path, HEADER + GOOD.replace("0", "img_a", 1) * 2, "twice_sigma_1")
    assert f"{twice}:3: idx img_a repeats line 2" in one_line_error(invoke(twice))
    # an integer idx beyond int64 is an index like another; 007 and 7 are one example
    huge = write(tmp_path, HEADER + GOOD.replace("0", "9" * 25, 1), "huge_sigma_1")
    assert len(read_results(huge)) == 1
    same = write(tmp_path, HEADER + GOOD.replace("0", "007", 1) + GOOD.replace("0", "7", 1))
    assert f"{same}:3: idx 7 repeats line 2" in one_line_error(invoke(same))


def test_a_bad_count_column_matters_only_to_alpha(tmp_path: Path) -> None:
    path = write(tmp_path, OURS + our_row(0) + our_row(1, count_top="?"))
    assert invoke(path).exit_code == 0
    results = read_results(path)
    with pytest.raises(UserError, match=rf"{path}:3: count_top '\?' is not an integer"):
        with_alpha(results, 0.01)


def test_a_torn_last_line_after_a_long_file_is_still_skipped(tmp_path: Path) -> None:
    rows = "".join(f"{i}\t{i % 10}\t{i % 10}\t{i / 7000:.4f}\t1\t0.1\n" for i in range(7000))
    path = write(tmp_path, HEADER + rows + "7000\t3\t3")
    with pytest.warns(UserWarning, match=f"{path}:7002: ignoring an incomplete last line"):
        report = build_report([path], (0.0, 0.5))
    (summary,) = report.runs[0].summaries
    assert summary.examples == 7000
    radii = [float(f"{i / 7000:.4f}") for i in range(7000)]
    assert summary.points[1].certified == sum(1 for r in radii if r >= 0.5)


# -- memory --------------------------------------------------------------------------------------
def test_reading_holds_compact_columns_not_text(tmp_path: Path) -> None:
    """Peak memory while reading is a small multiple of the columns kept (41 bytes a row for
    Cohen's columns: idx, label, predict, radius, line as 8 bytes, correct as 1), never the
    file's text split into strings (hundreds of bytes a row)."""
    count = 200_000
    rng = np.random.default_rng(0)
    radius = rng.random(count)
    rows = "".join(
        f"{i}\t{i % 10}\t{i % 10}\t{r!r}\t1\t0:00:01.234567\n"
        for i, r in enumerate(radius.tolist())
    )
    path = write(tmp_path, HEADER + rows)
    tracemalloc.start()
    try:
        results = read_results(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = 41 * count
    assert peak < 3 * kept, f"peak {peak / 2**20:.1f} MiB for {kept / 2**20:.1f} MiB of columns"
    assert results.radius.tolist() == radius.tolist()  # repr floats read back exactly
