"""dmae's certification run file: its format, and every read and write of it.

`dmae certify` writes, for each sigma, two files into its output directory (by default
runs/<name>/certify/); this module is the only one that knows their layout:

  sigma-<s>.tsv    tab-separated, the column header `HEADER_LINE` and then one row per
                   example (`Row`), sorted by idx: Cohen et al.'s columns `idx label predict
                   radius correct time` (`COHEN_COLUMNS`; time in seconds, predict -1 for an
                   abstention), then `count_top n n0 certifier pa_lower stop`, the raw counts
                   from which a radius can be recomputed, and `extra`: the certificate's other
                   `extra` entries as one JSON object (`{}` when none)
  sigma-<s>.json   the header beside it (`header_path`): what the rows depend on, the
                   `MATCHING` keys (format, sigma, n0, n, alpha, seed, certifier and its
                   options, radii, skip_wrong, checkpoint sha256, the denoiser's sha256 or
                   null, data set and fingerprint), and what is only recorded (the
                   classifier's training sigma, the denoiser's path and the classifier it was
                   tuned for, the device, precision, batch size and parallelism as resolved,
                   package versions, the creation time)

Written so that an interruption loses at most the examples in progress and a rerun resumes
where it stopped: rows are appended whole (`RowFile`), a torn last line left by a crash is cut
before appending again (`repair`) and ignored by `read_lines`; under torchrun rank r > 0
appends to `sigma-<s>.tsv.part<r>` and rank 0 folds the parts in (`merge`), sorted by idx,
atomically. `check_header` refuses to resume rows certified under other settings.

`dmae_cli.smoothing.jobs` builds the header's contents, `dmae_cli.smoothing.certify` drives the
writing, and `dmae report` (`dmae_cli.report.inputs`) finds and reads these files, headers
included, through the paths, readers and column names defined here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmae_cli.api import Certificate
from dmae_cli.config.recipe import sigma_name
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError

# /2 added the `extra` column; a /1 file is refused for resuming (its header says so) and
# read as before by `dmae report`, which reads columns by name.
FORMAT = "dmae-certify/2"

# The columns of Cohen et al.'s certify.py, which every other tool's file has too: dmae's files
# begin with them, so that a reader of those reads ours.
COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
COLUMNS = (*COHEN_COLUMNS, "count_top", "n", "n0", "certifier", "pa_lower", "stop", "extra")
OWN_COLUMNS = ("pa_lower", "stop")  # the `Certificate.extra` keys written to columns of their own
MAX_EXTRA = 1 << 16  # characters of the extra column: a report reads lines of up to 1 MiB
HEADER_LINE = "\t".join(COLUMNS) + "\n"

# Header keys that change what a row means; a resumed file must agree on all of them. The
# device changes which noise is drawn (another generator) and precision the arithmetic, not
# the validity of a row; the batch size changes neither the noise nor the row (see
# `NoiseStream`); the split is named by its fingerprint ("val" and "test" are one split). A
# header written before denoisers has no `denoiser_sha256`: it reads as null, no denoiser.
MATCHING = (
    "format", "sigma", "n0", "n", "alpha", "seed", "certifier", "certifier_options",
    "radii", "skip_wrong", "checkpoint_sha256", "denoiser_sha256", "dataset", "data_fingerprint",
)  # fmt: skip

TSV_GLOB = "sigma-*.tsv"  # the run files of a certify directory, one per sigma


# -- paths ----------------------------------------------------------------------------------
def tsv_path(directory: Path, sigma: float) -> Path:
    """The run file of `sigma` in a certify directory: sigma-<s>.tsv."""
    return Path(directory) / f"{sigma_name(sigma)}.tsv"


def header_path(tsv: Path) -> Path:
    """The JSON header beside a run file: the same name, ending in .json."""
    return tsv.with_suffix(".json")


def part_path(tsv: Path, rank: int) -> Path:
    """Where rank `rank` appends: the run file itself on rank 0, else sigma-<s>.tsv.part<r>."""
    return tsv if rank == 0 else tsv.with_name(f"{tsv.name}.part{rank}")


def parts(tsv: Path) -> list[Path]:
    """The rank part files beside `tsv` not merged yet."""
    return sorted(tsv.parent.glob(f"{tsv.name}.part*"))


# -- rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One certified example, as a line of the TSV."""

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float
    count_top: int
    n: int
    n0: int
    certifier: str
    pa_lower: float | None
    stop: str
    extra: str = "{}"  # JSON: `Certificate.extra` less OWN_COLUMNS

    @classmethod
    def of(cls, idx: int, label: int, cert: Certificate, seconds: float, name: str) -> Row:
        pa_lower = cert.extra.get("pa_lower")
        return cls(
            idx, label, cert.prediction, float(cert.radius), int(cert.prediction == label),
            seconds, cert.count_top, cert.n, cert.n0, name,
            None if pa_lower is None else float(pa_lower), str(cert.extra.get("stop", "")),
            extra_json(cert.extra, name, idx),
        )  # fmt: skip

    def line(self) -> str:
        if not math.isfinite(self.radius):  # a NaN would read back as neither certified nor not
            raise UserError(
                f"certifier '{self.certifier}' returned the radius {self.radius!r} for example "
                f"{self.idx}, not a finite number (a bug in the certifier); no row written"
            )
        # Floats as repr: exact, so `radius >= r` reads back as it was computed (Cohen's
        # 3-digit rounding can lift 0.2499 to 0.25).
        pa = "" if self.pa_lower is None else repr(self.pa_lower)
        fields = (
            self.idx, self.label, self.predict, repr(self.radius), self.correct,
            f"{self.time:.3f}", self.count_top, self.n, self.n0, self.certifier, pa, self.stop,
            self.extra,
        )  # fmt: skip
        return "\t".join(map(str, fields)) + "\n"

    @classmethod
    def parse(cls, line: str) -> Row:
        f = line.rstrip("\n").split("\t")
        if len(f) != len(COLUMNS):
            raise ValueError(f"expected {len(COLUMNS)} fields, got {len(f)}")
        return cls(
            int(f[0]), int(f[1]), int(f[2]), float(f[3]), int(f[4]), float(f[5]),
            int(f[6]), int(f[7]), int(f[8]), f[9], float(f[10]) if f[10] else None, f[11],
            f[12],
        )  # fmt: skip


def extra_json(extra: dict[str, Any], certifier: str, idx: int) -> str:
    """`extra` less OWN_COLUMNS as one line of JSON (sorted keys, ASCII: no tab or newline
    can split the row); a value JSON cannot hold is one line naming the certifier."""
    rest = {key: value for key, value in extra.items() if key not in OWN_COLUMNS}
    try:
        text = json.dumps(rest, sort_keys=True, default=_plain)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"certifier '{certifier}' returned a Certificate.extra for example {idx} that is not "
            f"JSON ({exc}); use numbers, strings, lists and dicts with string keys"
        ) from None
    if len(text) > MAX_EXTRA:
        raise UserError(
            f"certifier '{certifier}' returned {len(text):,} characters of Certificate.extra for "
            f"example {idx}; a run file holds at most {MAX_EXTRA:,} per row"
        )
    return text


def _plain(value: Any) -> Any:
    """numpy and torch values as the numbers or lists they hold (json's `default`)."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays, tensors
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- reading --------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A UTF-8 text file; a user error names the file, and the line of a byte that is not text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not a UTF-8 text file") from None


def read_lines(path: Path) -> dict[int, str]:
    """The complete rows of a TSV by idx; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return {}
    *lines, _torn = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0] + "\n" != HEADER_LINE:
        raise UserError(f"{path}: not a dmae certification file (unexpected column header)")
    rows: dict[int, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            rows.setdefault(Row.parse(line).idx, line + "\n")
        except ValueError as exc:
            raise UserError(f"{path}, line {number}: malformed row ({exc})") from None
    return rows


def finished(tsv: Path) -> set[int]:
    """The indices already certified into `tsv` or one of its rank parts."""
    return set(read_lines(tsv)).union(*(read_lines(p) for p in parts(tsv)))


def read_header(tsv: Path) -> dict[str, Any]:
    """The JSON header beside `tsv`, {} when there is none; errors name the file and line."""
    path = header_path(tsv)
    if not path.is_file():
        return {}
    try:
        header = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}:1: expected a JSON object")
    return header


# -- writing --------------------------------------------------------------------------------
def write_header(tsv: Path, header: dict[str, Any]) -> None:
    """Write the JSON header beside `tsv`, atomically."""
    checkpoint.atomic_write_text(header_path(tsv), json.dumps(header, indent=2) + "\n")


def check_header(tsv: Path, header: dict[str, Any]) -> None:
    """Refuse to resume rows certified under other settings (every rank checks the same)."""
    path = header_path(tsv)
    if not path.is_file():
        if read_lines(tsv) or parts(tsv):
            raise UserError(
                f"{tsv} exists without its header {path.name}; delete it to start over, "
                f"or write elsewhere with --out"
            )
        return
    old = read_header(tsv)
    new = json.loads(json.dumps(header))  # compare as stored: tuples become lists
    for key in MATCHING:
        if old.get(key) == new[key]:
            continue
        restart = f"delete {tsv.name} and {path.name} to start over, or write elsewhere with --out"
        if key == "denoiser_sha256":
            was, now = _through(old.get(key)), _through(new[key])
            raise UserError(f"{tsv} holds results certified {was}, this run is {now}; {restart}")
        raise UserError(
            f"{tsv} holds results for {key}={old.get(key)!r}, this run has {header[key]!r}; "
            f"{restart}"
        )


def _through(denoiser_sha256: object) -> str:
    if denoiser_sha256 is None:
        return "without a denoiser"
    return f"through the denoiser of sha256 {str(denoiser_sha256)[:12]}..."


class RowFile:
    """A row file open for appending that holds only whole rows, whatever happens.

    Each row goes straight to the operating system in unbuffered writes (what `write` plus
    `flush` did, with no buffer left to fail again at close). A write that fails, typically
    on a full disk, is cut back off the file, so every row before it stays intact and
    running the same command again resumes after it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab", buffering=0)

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def append(self, line: str) -> None:
        data = memoryview(line.encode("utf-8"))
        end = self._file.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[self._write(data) :]
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._file.truncate(end)  # drop the torn row
            raise UserError(
                f"could not write to {self.path}: {exc.strerror or exc}; the rows written "
                f"before are kept: free some space and run the same command again to resume"
            ) from exc

    def _write(self, data: memoryview) -> int:
        written = self._file.write(data)
        if not written:  # a regular file that takes no bytes would loop forever
            raise OSError(errno.EIO, "the file system accepted no bytes")
        return written


def repair(path: Path) -> None:
    """Cut a torn last line (a crash mid-write) off a row file, keeping every whole row."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)


def open_for_append(path: Path) -> RowFile:
    """Open a row file for appending: `repair` it, and write the column header if new."""
    repair(path)
    fresh = not path.is_file() or path.stat().st_size == 0
    rows = RowFile(path)
    if fresh:
        rows.append(HEADER_LINE)
    return rows


def merge(tsv: Path) -> dict[int, str]:
    """Fold the part files into the TSV, sorted by idx, atomically; returns the rows."""
    rows = read_lines(tsv)
    for part in parts(tsv):
        for idx, line in read_lines(part).items():
            rows.setdefault(idx, line)
    text = HEADER_LINE + "".join(rows[idx] for idx in sorted(rows))
    checkpoint.atomic_write_text(tsv, text)
    for part in parts(tsv):
        part.unlink()
    return rows
