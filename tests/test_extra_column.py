"""`Certificate.extra` beyond `pa_lower` and `stop` reaches the run file, in its `extra` JSON
column; `dmae report` reads files with that column and the older ones without it."""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from dmae_cli.api import Certificate, CertifyRequest
from dmae_cli.report.rows import read_table
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.smoothing.runfile import COLUMNS, FORMAT, MAX_EXTRA, Row, read_header, read_lines
from dmae_plugins.certifiers.cohen import Cohen
from tests.test_certify import recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def certificate(**extra: object) -> Certificate:
    return Certificate(1, 0.25, 9, 10, 5, {"pa_lower": 0.6, "stop": "budget", **extra})


def test_extra_keys_other_than_the_own_columns_are_written_as_json() -> None:
    extra = {"pb_upper": np.float64(0.125), "looks": [64, 128], "why": "tab\there", "k": 3}
    row = Row.of(7, 1, certificate(**extra), 0.5, "two-sided")
    fields = row.line().rstrip("\n").split("\t")
    assert len(fields) == len(COLUMNS) and COLUMNS[-1] == "extra"
    assert json.loads(fields[-1]) == {
        "pb_upper": 0.125,
        "looks": [64, 128],
        "why": "tab\there",
        "k": 3,
    }
    assert fields[COLUMNS.index("pa_lower")] == "0.6" and fields[COLUMNS.index("stop")] == "budget"
    assert Row.parse(row.line()) == replace(row, time=0.5)


def test_no_other_keys_is_an_empty_object_and_tensors_are_lists() -> None:
    assert Row.of(0, 1, certificate(), 0.1, "cohen").extra == "{}"
    row = Row.of(0, 1, certificate(votes=torch.tensor([3, 4]), top=np.int64(4)), 0.1, "x")
    assert json.loads(row.extra) == {"top": 4, "votes": [3, 4]}


def test_an_extra_that_json_cannot_hold_or_too_long_is_one_line() -> None:
    with pytest.raises(UserError, match="certifier 'x' returned a Certificate.extra for example 3"):
        Row.of(3, 1, certificate(model=object()), 0.1, "x")
    with pytest.raises(UserError, match="characters of Certificate.extra for example 4"):
        Row.of(4, 1, certificate(blob="a" * MAX_EXTRA), 0.1, "x")


def test_the_report_reads_files_with_and_without_the_extra_column(tmp_path: Path) -> None:
    rows = [Row.of(i, 1, certificate(note=f"\t{i}\n"), 0.1, "cohen") for i in range(3)]
    new = tmp_path / "new.tsv"
    new.write_text("\t".join(COLUMNS) + "\n" + "".join(row.line() for row in rows))
    old = tmp_path / "old.tsv"  # format 1: the same rows, no extra column
    old.write_text(
        "\t".join(COLUMNS[:-1])
        + "\n"
        + "".join(row.line().rsplit("\t", 1)[0] + "\n" for row in rows)
    )
    tables = [read_table(new), read_table(old)]
    assert [t.names[-1] for t in tables] == ["extra", "stop"]
    for name in ("label", "predict", "radius", "correct", "idx"):
        assert np.array_equal(tables[0].numbers[name], tables[1].numbers[name])


def test_dmae_certify_writes_the_extra_column(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certify = Cohen.certify

    def with_votes(self: Cohen, request: CertifyRequest) -> Generator[int, Tensor, Certificate]:
        seen: list[int] = []
        running = certify(self, request)
        num = next(running)
        try:
            while True:
                counts = yield num
                seen.append(int(counts.sum()))
                num = running.send(counts)
        except StopIteration as done:
            cert = done.value
        return replace(cert, extra={**cert.extra, "drawn": seen})

    monkeypatch.setattr(Cohen, "certify", with_votes)
    [result] = run_certify(recipe(runs, "certify.together=3"))
    assert read_header(result.tsv)["format"] == FORMAT == "dmae-certify/2"
    lines = read_lines(result.tsv)
    assert len(lines) == 8
    for line in lines.values():
        assert json.loads(Row.parse(line).extra) == {"drawn": [10, 60]}  # n0, then n
