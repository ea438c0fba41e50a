"""The report's inputs: per-example certification results, read and checked.

Reads the per-example TSV files of `dmae certify` and of Cohen et al.'s tools (tab-separated,
a header line, columns `idx label predict radius correct time`, `predict` = -1 for an
abstention) into `CertResults`, with each file's sigma from its `sigma` column, its JSON header,
`--sigma` or its name, in that order. Errors name the file and line. `with_alpha` recomputes the
radii under another confidence level `alpha` from the raw counts that our own files carry
(Cohen's certifier only), with the `cohen` certifier's own `dmae_cli.api.cohen_bound`.

Any tool's file is read the same way, by column name, and what the report needs of one is
Cohen's columns. What is particular to dmae's own files, their names in a certify directory,
the JSON header beside each and its reading, and the columns they begin with, is
`dmae_cli.smoothing.runfile`'s, the module that writes them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dmae_cli.api import cohen_bound
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.runfile import COHEN_COLUMNS, TSV_GLOB, header_path, read_header, read_text

ABSTAIN = -1
REQUIRED = ("label", "predict", "radius", "correct")  # what the report needs of any tool's file
COHEN_HEADER = " ".join(COHEN_COLUMNS)
# sigma_0.50, sigma-0.5, noise_0.25, sigma=1 (and the same inside a directory name)
SIGMA_IN_NAME = re.compile(r"(?:sigma|noise)[_\-=]?(\d+(?:\.\d+)?|\.\d+)", re.IGNORECASE)


class ReportWarning(UserWarning):
    """Something in the inputs the report works around (an ignored option, a mismatch)."""


def warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


# -- reading ------------------------------------------------------------------------------------
def find_inputs(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Every TSV to read, with the run it belongs to.

    A directory is a run directory (its `certify/sigma-*.tsv`, runfile's `TSV_GLOB`) or a
    certify directory (its own `sigma-*.tsv`); its files form one run named after it. Files
    given one by one form one run together, named after their common directory (the run's, for
    runs/<name>/certify/).
    """
    found: list[tuple[Path, str]] = []
    loose = [Path(p) for p in paths if not Path(p).is_dir()]
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        if path.is_dir():
            found += [(f, _run_name(path)) for f in _tsv_files_in(path)]
    if loose:
        parents = {p.resolve().parent for p in loose}
        name = _run_name(parents.pop()) if len(parents) == 1 else "files"
        found += [(p, name or "files") for p in loose]
    return found


def _tsv_files_in(directory: Path) -> list[Path]:
    for where in (directory / "certify", directory):
        files = sorted(where.glob(TSV_GLOB))
        if files:
            return files
    raise UserError(
        f"{directory}: no certification results (expected certify/{TSV_GLOB} or {TSV_GLOB}); "
        f"run 'dmae certify' first or pass the TSV files"
    )


def _run_name(directory: Path) -> str:
    directory = directory.resolve()
    return directory.parent.name if directory.name == "certify" else directory.name


@dataclass(frozen=True)
class CertResults:
    """One file of per-example results. `correct` is never True for an abstention."""

    path: Path
    run: str
    sigma: float
    label: np.ndarray  # int64
    predict: np.ndarray  # int64, ABSTAIN (-1) for an abstention
    radius: np.ndarray  # float64
    correct: np.ndarray  # bool
    columns: dict[str, list[str]] = field(default_factory=dict)  # every column, as text
    lines: tuple[int, ...] = ()  # the file line of every row, for error messages
    header: dict[str, Any] = field(default_factory=dict)  # the JSON header, if any

    def __len__(self) -> int:
        return len(self.label)


def _parse_table(path: Path, text: str) -> tuple[list[str], dict[str, list[str]], list[int]]:
    """Header names, columns as text and the file line of every row; errors name the line."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")), None)
    if start is None:
        raise UserError(f"{path}:1: empty file; expected a header line '{COHEN_HEADER}'")
    names = [name.strip() for name in lines[start].split("\t")]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise UserError(
            f"{path}:{start + 1}: not a certification result of dmae certify or Cohen et al.'s "
            f"certify.py: the header lacks {', '.join(missing)}; expected tab-separated columns "
            f"'{COHEN_HEADER}'{_separator_hint(lines[start])}"
        )
    columns: dict[str, list[str]] = {name: [] for name in names}
    line_numbers = []
    for number, line in enumerate(lines[start + 1 :], start + 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names) and number == len(lines) and not text.endswith("\n"):
            # `dmae certify` appends row by row: an interrupted run can leave half a line
            warn(f"{path}:{number}: ignoring an incomplete last line (an interrupted run?)")
            break
        if len(fields) != len(names):
            raise UserError(
                f"{path}:{number}: expected {len(names)} tab-separated fields, found {len(fields)}"
            )
        for name, value in zip(names, fields, strict=True):
            columns[name].append(value.strip())
        line_numbers.append(number)
    if not line_numbers:
        raise UserError(f"{path}:{start + 1}: a header but no examples")
    return names, columns, line_numbers


def _separator_hint(header: str) -> str:
    """Cohen's column names split by something other than tabs: say so."""
    if "\t" in header:
        return ""
    for separator, name in ((",", "commas"), (";", "semicolons"), (" ", "spaces")):
        if all(c in header.split(separator) for c in REQUIRED):
            return f" (this header separates them by {name})"
    return ""


def _numbers(path: Path, name: str, values: list[str], lines: list[int], kind: type) -> np.ndarray:
    out = []
    for value, line in zip(values, lines, strict=True):
        try:
            if kind is bool:
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError
                out.append(value.lower() in ("1", "true"))
                continue
            number = kind(value)
            if kind is float and not math.isfinite(number):
                raise ValueError
            out.append(number)
        except ValueError:
            expected = {int: "an integer", float: "a finite number", bool: "0 or 1"}[kind]
            raise UserError(f"{path}:{line}: {name} {value!r} is not {expected}") from None
    return np.asarray(out, dtype={int: np.int64, float: np.float64, bool: bool}[kind])


def _check_unique(path: Path, columns: dict[str, list[str]], lines: list[int]) -> None:
    """A repeated idx (e.g. two shards concatenated twice) would count an example twice."""
    first: dict[str, int] = {}
    for idx, line in zip(columns.get("idx", []), lines, strict=False):
        if idx in first:
            raise UserError(f"{path}:{line}: idx {idx} repeats line {first[idx]}")
        first[idx] = line


def read_results(path: Path, run: str = "", sigma: float | None = None) -> CertResults:
    """Read one TSV; `sigma` is used when the file itself does not record its sigma."""
    path = Path(path)
    _, columns, lines = _parse_table(path, read_text(path))
    _check_unique(path, columns, lines)
    predict = _numbers(path, "predict", columns["predict"], lines, int)
    correct = _numbers(path, "correct", columns["correct"], lines, bool) & (predict != ABSTAIN)
    header = read_header(path)  # {} for another tool's file
    results = CertResults(
        path=path,
        run=run or path.resolve().parent.name,
        sigma=0.0,  # resolved below, once the file is known to be readable
        label=_numbers(path, "label", columns["label"], lines, int),
        predict=predict,
        radius=_numbers(path, "radius", columns["radius"], lines, float),
        correct=correct,
        columns=columns,
        lines=tuple(lines),
        header=header,
    )
    recorded = _sigma_from_column(path, columns, lines)
    if recorded is None and header.get("sigma") is not None:
        recorded = _header_sigma(header_path(path), header["sigma"])
    return replace(results, sigma=_resolve_sigma(path, recorded, sigma))


def _header_sigma(path: Path, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UserError(f"{path}: sigma {value!r} is not a number > 0")
    return float(value)


def _sigma_from_column(path: Path, columns: dict[str, list[str]], lines: list[int]) -> float | None:
    if "sigma" not in columns:
        return None
    values = _numbers(path, "sigma", columns["sigma"], lines, float)
    differs = np.flatnonzero(~np.isclose(values, values[0]))
    if differs.size:
        line = lines[int(differs[0])]
        raise UserError(
            f"{path}:{line}: sigma {values[differs[0]]:g} differs from {values[0]:g} on line "
            f"{lines[0]}; the report expects one sigma per file"
        )
    return float(values[0])


def sigma_from_name(path: Path) -> float | None:
    """sigma written in the file name (sigma_0.50, sigma-0.5, noise_0.25), else in one of the
    two directories above it (Cohen et al.'s layout: noise_0.50/test/sigma_0.50)."""
    for part in (path.name, path.parent.name, path.parent.parent.name):
        match = SIGMA_IN_NAME.search(part)
        if match:
            return float(match.group(1))
    return None


def _resolve_sigma(path: Path, recorded: float | None, given: float | None) -> float:
    """What the file records beats --sigma; --sigma beats a guess from the file name."""
    if recorded is not None:
        if given is not None and not math.isclose(given, recorded):
            warn(f"{path}: --sigma {given:g} ignored: the file records sigma {recorded:g}")
        return recorded
    sigma = given if given is not None else sigma_from_name(path)
    if sigma is None:
        raise UserError(
            f"{path}: cannot tell its sigma (no sigma column, no JSON header, no sigma in the "
            f"name such as sigma_0.50); pass --sigma"
        )
    if sigma <= 0:
        raise UserError(f"{path}: sigma must be > 0, got {sigma:g}")
    return sigma


# -- recomputing radii under another alpha --------------------------------------------------------
def with_alpha(results: CertResults, alpha: float) -> CertResults:
    """The same results with every Cohen radius recomputed at confidence 1 - alpha.

    Rows of another certifier keep their radius (its statistics are not ours to redo); rows
    whose estimation stage was skipped (n = 0) stay wrong. An abstention that would certify
    under the new alpha stays an abstention unless the file records the selected class.
    """
    path, cols = results.path, results.columns
    if "count_top" not in cols or "n" not in cols:
        warn(f"{path}: --alpha ignored: no count_top/n columns to recompute radii from")
        return results
    count_top = _column(results, "count_top", int)
    n = _column(results, "n", int)
    names = cols.get("certifier") or [str(results.header.get("certifier", ""))] * len(n)
    cohen = np.asarray([name.lower() == "cohen" for name in names]) & (n > 0)
    others = int(np.sum(~cohen & (n > 0)))
    if others:
        warn(f"{path}: --alpha ignored on {others} rows of a certifier other than cohen")
    radius = cohen_bound(results.sigma, count_top, n, alpha).radius  # NaN: abstains
    selected = _column(results, "selected", int) if "selected" in cols else results.predict
    certifies = cohen & ~np.isnan(radius)
    lost = int(np.sum(certifies & (selected == ABSTAIN)))
    if lost:
        warn(
            f"{path}: {lost} abstained rows would certify at alpha {alpha:g}, but the file "
            f"does not record which class was selected; they stay abstentions"
        )
    certified = certifies & (selected != ABSTAIN)
    predict = np.where(cohen, np.where(certified, selected, ABSTAIN), results.predict)
    new_radius = np.where(cohen, np.where(certified, radius, 0.0), results.radius)
    correct = np.where(cohen, certified & (selected == results.label), results.correct)
    return replace(results, predict=predict, radius=new_radius, correct=correct.astype(bool))


def _column(results: CertResults, name: str, kind: type) -> np.ndarray:
    return _numbers(results.path, name, results.columns[name], list(results.lines), kind)
