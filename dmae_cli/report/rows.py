"""A per-example TSV read streaming: line by line into compact, typed columns.

A results file may hold millions of rows. Each row is parsed as it is read into `array`
buffers (8 bytes a number, 1 a flag), which become numpy arrays
without a copy: memory is a small multiple of the final columns, never the file's text. Every
error is one `UserError` line naming the file and the line.

Which columns are read, and how:
  - `label`, `predict` (integers), `radius` (a finite number >= 0: an abstention is radius 0
    with predict -1), `correct` (0/1, true/false) and `sigma` (a finite number), when present:
    a bad value stops the reading at its line;
  - `idx`: integers, checked for repeats once the file is read (another tool's text indices
    are kept as text, and checked as they come);
  - `count_top`, `n`, `selected` (integers, for `--alpha`): a bad value is remembered with its
    line and stops the report only when the column is used (`Table.numbers_of`);
  - `certifier`: whether each row's is `cohen` (the rows `--alpha` recomputes), 1 byte a row.
Every other column (`time`, `pa_lower`, ...) is not kept.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import warnings
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.runfile import COHEN_COLUMNS

MAX_LINE = 1 << 20  # characters: a longer line is not a results file (/dev/zero, a binary)
INT64 = (-(2**63), 2**63 - 1)
_FLAGS = {"0": False, "1": True, "false": False, "true": True}
REQUIRED = ("label", "predict", "radius", "correct")  # what the report needs of any tool's file
COHEN_HEADER = " ".join(COHEN_COLUMNS)


class ReportWarning(UserWarning):
    """Something in the inputs the report works around (an ignored option, a mismatch)."""


def warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


def _int(text: str) -> int:
    return int(text)


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _radius(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise ValueError(text)
    return value


def _flag(text: str) -> bool:
    return _FLAGS[text.strip().lower()]


# name: (parse, array typecode, what a value must be)
STRICT: dict[str, tuple[Callable[[str], object], str, str]] = {
    "label": (_int, "q", "an integer"),
    "predict": (_int, "q", "an integer"),
    "radius": (_radius, "d", "a finite number >= 0"),
    "correct": (_flag, "b", "0 or 1"),
    "sigma": (_number, "d", "a finite number"),
}
LAZY = ("count_top", "n", "selected")  # integers, needed by --alpha only
MATCH = {"certifier": "cohen"}  # a text column: rows whose value is this one (lower case)
READ = ("idx", *STRICT, *LAZY, *MATCH)


@dataclass(frozen=True)
class Table:
    """A TSV's rows, column by column; `lines[i]` is the file line of row i."""

    names: tuple[str, ...]  # the header, as written
    numbers: dict[str, np.ndarray]  # STRICT, LAZY and idx columns the file has
    matches: dict[str, np.ndarray]  # MATCH columns: bool, the rows of the value matched
    lines: np.ndarray  # int64
    invalid: dict[str, str]  # a LAZY column's first bad value, as the error to raise
    text_idx: bool = False  # some idx are text: `numbers["idx"]` does not name every example

    def __len__(self) -> int:
        return len(self.lines)

    def only(self, keep: np.ndarray) -> Table:
        """The rows where `keep` (bool, one per row) is true."""
        return replace(
            self,
            numbers={name: values[keep] for name, values in self.numbers.items()},
            matches={name: values[keep] for name, values in self.matches.items()},
            lines=self.lines[keep],
        )

    def numbers_of(self, name: str) -> np.ndarray:
        """A LAZY column, or the error of its first value that is not an integer."""
        if name in self.invalid:
            raise UserError(self.invalid[name])
        return self.numbers[name]


def shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- lines ----------------------------------------------------------------------------------------
def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 text file, read as it is consumed."""
    try:
        with path.open(encoding="utf-8", newline=None) as f:
            number = 0
            while line := f.readline(MAX_LINE + 1):
                number += 1
                if len(line) > MAX_LINE:
                    raise UserError(
                        f"{path}:{number}: a line of more than {MAX_LINE} characters; not a "
                        f"certification result"
                    )
                yield number, line
    except UnicodeDecodeError:
        raise UserError(f"{path}:{_undecodable_line(path)}: not a UTF-8 text file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _undecodable_line(path: Path) -> int:
    """The line of the first byte that is not UTF-8 (the text reader does not say)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return line + bytes(exc.object[: exc.start]).count(b"\n")
            line += block.count(b"\n")
    return line


# -- rows -----------------------------------------------------------------------------------------
class _Columns:
    """The columns being filled, one row at a time."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = path, names
        self.strict = [
            (names.index(n), parse, array(code)) for n, (parse, code, _) in STRICT.items()
            if n in names
        ]  # fmt: skip
        self.lazy = [(names.index(n), array("q")) for n in LAZY if n in names]
        self.invalid: dict[str, str] = {}
        self.match = [
            (names.index(n), v.lower(), array("b")) for n, v in MATCH.items() if n in names
        ]
        self.idx_at = names.index("idx") if "idx" in names else None
        self.idx, self.idx_text = array("q"), {}  # text idx -> its line
        self.text_rows: list[int] = []  # rows whose idx is text (not in the int check)
        self.lines = array("q")

    def add(self, fields: list[str], number: int) -> None:
        try:
            for at, parse, out in self.strict:
                out.append(parse(fields[at]))
        except (ValueError, KeyError, OverflowError):
            raise self.bad_value(fields, number) from None
        for at, out in self.lazy:
            try:
                out.append(int(fields[at]))
            except (ValueError, OverflowError):
                out.append(0)
                name = self.names[at]
                if name not in self.invalid:
                    self.invalid[name] = f"{self.path}:{number}: {_not_int64(name, fields[at])}"
        for at, value, out in self.match:
            out.append(fields[at].strip().lower() == value)
        if self.idx_at is not None:
            self.add_idx(fields[self.idx_at], number)
        self.lines.append(number)

    def add_idx(self, text: str, number: int) -> None:
        try:
            self.idx.append(int(text))
            return
        except (ValueError, OverflowError):
            pass
        text = text.strip()
        if text in self.idx_text:
            raise UserError(f"{self.path}:{number}: idx {text} repeats line {self.idx_text[text]}")
        self.idx_text[text] = number
        self.text_rows.append(len(self.idx))
        self.idx.append(0)

    def bad_value(self, fields: list[str], number: int) -> UserError:
        """The first value of the row that `add` could not take, said in words."""
        for name, (parse, _, expected) in STRICT.items():
            if name not in self.names:
                continue
            text = fields[self.names.index(name)]
            try:
                value = parse(text)
            except (ValueError, KeyError):
                if name == "radius" and _is_negative(text):
                    return UserError(
                        f"{self.path}:{number}: radius {text.strip()} is negative: a certified "
                        f"radius is >= 0 (an abstention is radius 0 with predict -1)"
                    )
                return UserError(f"{self.path}:{number}: {name} {shown(text)} is not {expected}")
            if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
                return UserError(f"{self.path}:{number}: {_not_int64(name, text)}")
        return UserError(f"{self.path}:{number}: a value this report cannot read")

    def table(self) -> Table:
        lines = np.frombuffer(self.lines, dtype=np.int64)
        numbers = {
            self.names[at]: np.frombuffer(out, dtype=_DTYPES[out.typecode])
            for at, _, out in self.strict
        }
        numbers |= {self.names[at]: np.frombuffer(out, dtype=np.int64) for at, out in self.lazy}
        matches = {self.names[at]: np.frombuffer(out, dtype=np.bool_) for at, _, out in self.match}
        if self.idx_at is not None:
            idx = np.frombuffer(self.idx, dtype=np.int64)
            _check_unique(self.path, idx, lines, self.text_rows)
            numbers["idx"] = idx
        return Table(tuple(self.names), numbers, matches, lines, self.invalid, bool(self.text_rows))


_DTYPES = {"q": np.int64, "d": np.float64, "b": np.bool_}


def _not_int64(name: str, text: str) -> str:
    try:
        int(text)
    except ValueError:
        return f"{name} {shown(text)} is not an integer"
    return f"{name} {shown(text.strip())} is out of range (at most {INT64[1]} in magnitude)"


def _is_negative(text: str) -> bool:
    try:
        return float(text) < 0
    except ValueError:
        return False


def _check_unique(path: Path, idx: np.ndarray, lines: np.ndarray, text_rows: list[int]) -> None:
    """A repeated idx (e.g. two shards concatenated twice) would count an example twice."""
    if text_rows:
        rows = np.setdiff1d(np.arange(len(idx)), text_rows)
        values = idx[rows]
    else:
        rows, values = None, idx
    order = np.argsort(values, kind="stable")  # equal values keep the file's order
    ordered = values[order]
    again = order[np.flatnonzero(ordered[1:] == ordered[:-1]) + 1]
    if not again.size:
        return
    repeat = int(again.min())  # the first row, in the file, whose idx came before
    first = int(np.flatnonzero(values == values[repeat])[0])
    if rows is not None:
        repeat, first = int(rows[repeat]), int(rows[first])
    raise UserError(f"{path}:{lines[repeat]}: idx {idx[repeat]} repeats line {lines[first]}")


def read_table(path: Path) -> Table:
    """The header and rows of a TSV; errors name the file and line."""
    with contextlib.closing(numbered_lines(path)) as lines:
        return _read_table(path, lines)


def _read_table(path: Path, lines: Iterator[tuple[int, str]]) -> Table:
    header = next(((n, ln) for n, ln in lines if ln.strip() and not ln.startswith("#")), None)
    if header is None:
        raise UserError(f"{path}:1: empty file; expected a header line '{COHEN_HEADER}'")
    start, text = header
    text = text.rstrip("\n")
    names = [name.strip() for name in text.split("\t")]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise UserError(
            f"{path}:{start}: not a certification result of dmae certify or Cohen et al.'s "
            f"certify.py: the header lacks {', '.join(missing)}; expected tab-separated columns "
            f"'{COHEN_HEADER}'{_separator_hint(text)}"
        )
    twice = next((n for n in READ if names.count(n) > 1), None)
    if twice is not None:  # which one would be meant?
        raise UserError(f"{path}:{start}: the header names the column {shown(twice)} twice")
    table = _read_rows(path, names, lines)
    if not len(table):
        raise UserError(f"{path}:{start}: a header but no examples")
    return table


def _separator_hint(header: str) -> str:
    """Cohen's column names split by something other than tabs: say so."""
    if "\t" in header:
        return ""
    for separator, name in ((",", "commas"), (";", "semicolons"), (" ", "spaces")):
        if all(c in header.split(separator) for c in REQUIRED):
            return f" (this header separates them by {name})"
    return ""


def _read_rows(path: Path, names: list[str], lines: Iterator[tuple[int, str]]) -> Table:
    """The rows after the header; an incomplete last line (no newline, too few fields: an
    interrupted run) is left out with a warning."""
    columns = _Columns(path, names)
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != len(names):
            if not line.endswith("\n"):
                # `dmae certify` appends row by row: an interrupted run can leave half a line
                warn(f"{path}:{number}: ignoring an incomplete last line (an interrupted run?)")
                break
            raise UserError(
                f"{path}:{number}: expected {len(names)} tab-separated fields, found {len(fields)}"
            )
        columns.add(fields, number)
    return columns.table()
