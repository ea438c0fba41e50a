"""The report's inputs: per-example certification results, read and checked.

Reads the per-example TSV files of `dmae certify` and of Cohen et al.'s tools (tab-separated,
a header line, columns `idx label predict radius correct time`, `predict` = -1 for an
abstention) into `CertResults`, with each file's sigma from its `sigma` column, its JSON header,
`--sigma` or its name, in that order. Errors name the file and line. The rows are read
streaming into compact typed columns (`report.rows`): a file of millions of rows costs a small
multiple of its numbers in memory. `with_alpha` recomputes the radii under another confidence
level `alpha` from the raw counts that our own files carry (Cohen's certifier only), with the
`cohen` certifier's own `dmae_cli.api.cohen_bound`.

Any tool's file is read the same way, by column name, and what the report needs of one is
Cohen's columns. What is particular to dmae's own files, their names in a certify directory,
the JSON header beside each and its reading, and the columns they begin with, is
`dmae_cli.smoothing.runfile`'s, the module that writes them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dmae_cli.api import cohen_bound
from dmae_cli.report.kinds import Kind, file_kind
from dmae_cli.report.rows import Table, read_table, warn
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.runfile import TSV_GLOB, header_path, read_header

ABSTAIN = -1
# sigma_0.50, sigma-0.5, noise_0.25, sigma=1 (and the same inside a directory name)
SIGMA_IN_NAME = re.compile(r"(?:sigma|noise)[_\-=]?(\d+(?:\.\d+)?|\.\d+)", re.IGNORECASE)


# -- reading ------------------------------------------------------------------------------------
def find_inputs(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Every TSV to read, with the run it belongs to.

    A directory is a run directory (its `certify/sigma-*.tsv`, runfile's `TSV_GLOB`) or a
    certify directory (its own `sigma-*.tsv`); its files form one run named after it. Files
    given one by one form one run together, named after their common directory. A run's
    certify/ is named after the run, another certify directory in it (certify-denoised/) after
    both ("digits/certify-denoised"); two directories of one name are told apart by their paths.
    """
    found: list[tuple[Path, Path | None]] = []  # each file, and the directory naming its run
    loose = [Path(p) for p in paths if not Path(p).is_dir()]
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        if path.is_dir():
            found += [(f, path.resolve()) for f in _tsv_files_in(path)]
    if loose:
        parents = {p.resolve().parent for p in loose}
        common = parents.pop() if len(parents) == 1 else None
        found += [(p, common) for p in loose]
    names = _run_names({d for _, d in found if d is not None})
    return [(f, names[d] if d is not None else "files") for f, d in found]


def _tsv_files_in(directory: Path) -> list[Path]:
    for where in (directory / "certify", directory):
        files = sorted(where.glob(TSV_GLOB))
        if files:
            return files
    raise UserError(
        f"{directory}: no certification results (expected certify/{TSV_GLOB} or {TSV_GLOB}); "
        f"run 'dmae certify' first or pass the TSV files"
    )


def _run_names(directories: set[Path]) -> dict[Path, str]:
    """A name for each (resolved) directory; names that would collide are the paths instead."""
    names = {d: _run_name(d) or "files" for d in directories}
    taken = list(names.values())
    for directory, name in names.items():
        if taken.count(name) > 1:
            names[directory] = os.path.relpath(directory)
    return names


def _run_name(directory: Path) -> str:
    if directory.name == "certify":
        return directory.parent.name
    if directory.name.startswith("certify"):  # certify-denoised/ beside the run's certify/
        return f"{directory.parent.name}/{directory.name}"
    return directory.name


@dataclass(frozen=True)
class CertResults:
    """One file of per-example results. `correct` is never True for an abstention."""

    path: Path
    run: str
    sigma: float
    label: np.ndarray  # int64
    predict: np.ndarray  # int64, ABSTAIN (-1) for an abstention
    radius: np.ndarray  # float64, >= 0
    correct: np.ndarray  # bool
    table: Table | None = None  # every column read, and the file line of every row
    header: dict[str, Any] = field(default_factory=dict)  # the JSON header, if any
    kind: Kind | None = None  # how the classifier was made, when the header says

    def __len__(self) -> int:
        return len(self.label)

    def indices(self) -> np.ndarray | None:
        """The integer indices of the examples, None when the file does not name them all."""
        table = self.table
        if table is None or "idx" not in table.numbers or table.text_idx:
            return None
        return table.numbers["idx"]

    def only(self, keep: np.ndarray) -> CertResults:
        """The results of the examples where `keep` (bool, one per row) is true."""
        return replace(
            self,
            label=self.label[keep],
            predict=self.predict[keep],
            radius=self.radius[keep],
            correct=self.correct[keep],
            table=None if self.table is None else self.table.only(keep),
        )


def read_results(path: Path, run: str = "", sigma: float | None = None) -> CertResults:
    """Read one TSV, streaming; `sigma` is used when the file itself does not record its
    sigma."""
    path = Path(path)
    table = read_table(path)
    predict = table.numbers["predict"]
    header = read_header(path)  # {} for another tool's file
    recorded = _sigma_from_column(path, table)
    if recorded is None and header.get("sigma") is not None:
        recorded = _header_sigma(header_path(path), header["sigma"])
    return CertResults(
        path=path,
        run=run or path.resolve().parent.name,
        sigma=_resolve_sigma(path, recorded, sigma),
        label=table.numbers["label"],
        predict=predict,
        radius=table.numbers["radius"],
        correct=table.numbers["correct"] & (predict != ABSTAIN),
        table=table,
        header=header,
        kind=file_kind(header, header_path(path)),
    )


def _header_sigma(path: Path, value: Any) -> float:
    if not _is_sigma(value):
        raise UserError(f"{path}: sigma {value!r} is not a finite number > 0")
    return float(value)


def _is_sigma(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _sigma_from_column(path: Path, table: Table) -> float | None:
    if "sigma" not in table.numbers:
        return None
    values, lines = table.numbers["sigma"], table.lines
    differs = np.flatnonzero(~np.isclose(values, values[0]))
    if differs.size:
        line = lines[int(differs[0])]
        raise UserError(
            f"{path}:{line}: sigma {values[differs[0]]:g} differs from {values[0]:g} on line "
            f"{lines[0]}; the report expects one sigma per file"
        )
    if values[0] <= 0:
        raise UserError(f"{path}:{lines[0]}: sigma {values[0]:g} is not > 0")
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
    if not _is_sigma(sigma):
        raise UserError(f"{path}: sigma must be a finite number > 0, got {sigma:g}")
    return sigma


# -- recomputing radii under another alpha --------------------------------------------------------
def with_alpha(results: CertResults, alpha: float) -> CertResults:
    """The same results with every Cohen radius recomputed at confidence 1 - alpha.

    Rows of another certifier keep their radius (its statistics are not ours to redo); rows
    whose estimation stage was skipped (n = 0) stay wrong. An abstention that would certify
    under the new alpha stays an abstention unless the file records the selected class.
    """
    path, table = results.path, results.table
    if table is None or "count_top" not in table.numbers or "n" not in table.numbers:
        warn(f"{path}: --alpha ignored: no count_top/n columns to recompute radii from")
        return results
    count_top, n = table.numbers_of("count_top"), table.numbers_of("n")
    named = table.matches.get("certifier")  # the rows whose certifier is cohen
    if named is None:  # one certifier for the whole file, in its JSON header
        named = np.full(len(n), str(results.header.get("certifier", "")).lower() == "cohen")
    cohen = named & (n > 0)
    _check_counts(results, cohen, count_top, n)
    others = int(np.sum(~cohen & (n > 0)))
    if others:
        warn(f"{path}: --alpha ignored on {others} rows of a certifier other than cohen")
    radius = cohen_bound(results.sigma, count_top, n, alpha).radius  # NaN: abstains
    selected = table.numbers_of("selected") if "selected" in table.numbers else results.predict
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


def _check_counts(
    results: CertResults, cohen: np.ndarray, count_top: np.ndarray, n: np.ndarray
) -> None:
    """Cohen's votes for the top class are a count out of n: 0 <= count_top <= n."""
    bad = np.flatnonzero(cohen & ((count_top < 0) | (count_top > n)))
    if bad.size and results.table is not None:
        row = int(bad[0])
        raise UserError(
            f"{results.path}:{results.table.lines[row]}: count_top {count_top[row]} of n "
            f"{n[row]}: expected 0 <= count_top <= n"
        )
