"""The report stage: per-example certification results in, certified-accuracy tables out.

`report_inputs` reads the per-example TSV files (of `dmae certify` or Cohen et al.'s tools);
this module computes per file (PAPER.md §3):

- certified accuracy at radius r: the fraction of examples predicted correctly with a certified
  radius >= r (an abstention is never correct), with a two-sided Clopper-Pearson interval,
  because the examples are a sample of the test distribution;
- approximate certified accuracy at r = 0 (the smoothed classifier's clean accuracy), the
  average certified radius (ACR: radius of the correct predictions averaged over all examples),
  the abstention rate and the number of examples;
- optionally the radii under another confidence level `alpha` (`report_inputs.with_alpha`).

Files of one run are combined into the envelope: the best certified accuracy over sigma at each
radius, the convention of the published tables. `report_formats` turns a `Report` into a rich
table, markdown, LaTeX, CSV or JSON, optionally beside the published rows of PAPER.md §4.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import beta

from dmae_cli.report.inputs import (
    ABSTAIN,
    CertResults,
    ReportWarning,
    find_inputs,
    read_results,
    warn,
    with_alpha,
)
from dmae_cli.runtime.errors import UserError


# -- radii --------------------------------------------------------------------------------------
def parse_radii(text: str) -> tuple[float, ...]:
    """`0:3:0.25` (start:stop:step, stop included) or a comma list `0,0.5,1`."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9)  # tolerate 3.0 / 0.25 rounding
            values = [start + i * step for i in range(count + 1)]
        else:
            values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--radii {text!r}: expected START:STOP:STEP (e.g. 0:3:0.25) or a list (0,0.5,1)"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"--radii {text!r}: radii must be finite numbers >= 0")
    return tuple(sorted({round(v, 10) for v in values}))


# -- metrics ------------------------------------------------------------------------------------
def clopper_pearson(successes: int, trials: int, ci_alpha: float) -> tuple[float, float]:
    """Two-sided (1 - ci_alpha) Clopper-Pearson interval for a binomial proportion."""
    k, n = successes, trials
    low = 0.0 if k == 0 else float(beta.ppf(ci_alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - ci_alpha / 2, k + 1, n - k))
    return low, high


@dataclass(frozen=True)
class Point:
    """Certified accuracy at one radius: `certified` of `total` examples, with its interval."""

    radius: float
    certified: int
    total: int
    low: float
    high: float

    @property
    def accuracy(self) -> float:
        return self.certified / self.total


def certified_count(results: CertResults, radius: float) -> int:
    """Examples predicted correctly with a certified radius of at least `radius`."""
    return int(np.sum(results.correct & (results.radius >= radius)))


def point(results: CertResults, radius: float, ci_alpha: float) -> Point:
    k, total = certified_count(results, radius), len(results)
    return Point(radius, k, total, *clopper_pearson(k, total, ci_alpha))


@dataclass(frozen=True)
class Summary:
    """Every number the report gives for one file."""

    results: CertResults
    clean: Point  # approximate certified accuracy at r = 0
    points: tuple[Point, ...]  # one per requested radius
    acr: float
    abstentions: int

    @property
    def sigma(self) -> float:
        return self.results.sigma

    @property
    def examples(self) -> int:
        return len(self.results)

    @property
    def abstention_rate(self) -> float:
        return self.abstentions / self.examples


def summarize(results: CertResults, radii: Sequence[float], ci_alpha: float) -> Summary:
    total = len(results)
    return Summary(
        results=results,
        clean=point(results, 0.0, ci_alpha),
        points=tuple(point(results, r, ci_alpha) for r in radii),
        acr=float(np.sum(np.where(results.correct, results.radius, 0.0)) / total),
        abstentions=int(np.sum(results.predict == ABSTAIN)),
    )


@dataclass(frozen=True)
class EnvelopePoint:
    point: Point
    sigma: float  # the sigma that attains the best certified accuracy at this radius


def envelope(summaries: Sequence[Summary]) -> tuple[EnvelopePoint, ...]:
    """Best certified accuracy over sigma at each radius; ties go to the smaller sigma."""
    ordered = sorted(summaries, key=lambda s: s.sigma)
    best = []
    for i in range(len(ordered[0].points)):
        top = max(ordered, key=lambda s: (s.points[i].accuracy, -s.sigma))
        best.append(EnvelopePoint(top.points[i], top.sigma))
    return tuple(best)


@dataclass(frozen=True)
class RunReport:
    run: str
    summaries: tuple[Summary, ...]  # sorted by sigma
    envelope: tuple[EnvelopePoint, ...]

    @property
    def has_envelope(self) -> bool:
        return len(self.summaries) > 1


@dataclass(frozen=True)
class Report:
    radii: tuple[float, ...]
    ci_alpha: float
    alpha: float | None
    runs: tuple[RunReport, ...]


def build_report(
    paths: Sequence[Path],
    radii: Sequence[float],
    *,
    sigma: float | None = None,
    alpha: float | None = None,
    ci_alpha: float = 0.05,
) -> Report:
    """Read every input (run directories, certify directories, TSV files) and compute it all."""
    if not paths:
        raise UserError("no inputs: pass run directories (runs/<name>) or TSV files")
    if not 0 < ci_alpha < 1 or (alpha is not None and not 0 < alpha < 1):
        raise UserError("--alpha and --ci-alpha must be in (0, 1)")
    by_run: dict[str, list[Summary]] = {}
    for path, run in find_inputs(paths):
        results = read_results(path, run, sigma)
        if alpha is not None:
            results = with_alpha(results, alpha)
        by_run.setdefault(run, []).append(summarize(results, radii, ci_alpha))
    runs = []
    for run, summaries in by_run.items():
        summaries.sort(key=lambda s: s.sigma)
        _check_comparable(run, summaries)
        runs.append(RunReport(run, tuple(summaries), envelope(summaries)))
    return Report(tuple(radii), ci_alpha, alpha, tuple(runs))


def _check_comparable(run: str, summaries: list[Summary]) -> None:
    sizes = {s.examples for s in summaries}
    if len(sizes) > 1:
        warn(
            f"run {run}: files have different numbers of examples ({', '.join(map(str, sizes))}); "
            f"the envelope compares different test subsets"
        )
    sigmas = [s.sigma for s in summaries]
    if len(set(sigmas)) < len(sigmas):
        warn(f"run {run}: several files with the same sigma; they are listed separately")


# -- the stage ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportOptions:
    radii: tuple[float, ...] = parse_radii("0:3:0.25")
    sigma: float | None = None  # for files that do not record their sigma
    alpha: float | None = None  # recompute Cohen radii at this confidence level
    ci_alpha: float = 0.05
    formats: tuple[str, ...] | None = None  # None: the table, plus every file format with `out`
    out: Path | None = None  # write report.<md|tex|csv|json> (and curves) here
    plot: Path | None = None  # curves as PNG and PDF
    compare: str | None = None  # a table of published.yaml


@dataclass(frozen=True)
class ReportResult:
    report: Report
    files: list[Path]  # the format files and pictures written


def run_report(paths: Sequence[Path], options: ReportOptions) -> ReportResult:
    """What `dmae report` does: read, compute, print the table, write the files asked for."""
    from rich.console import Console
    from rich.markup import escape

    from dmae_cli.report.formats import RENDERERS, SUFFIX, rich_tables
    from dmae_cli.report.published import published_table
    from dmae_cli.runtime import ui
    from dmae_cli.runtime.checkpoint import atomic_write_text

    compare = published_table(options.compare) if options.compare else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        report = build_report(
            paths,
            options.radii,
            sigma=options.sigma,
            alpha=options.alpha,
            ci_alpha=options.ci_alpha,
        )
    for warning in caught:
        ui.console.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False)
    formats = options.formats
    if formats is None:
        formats = ("table", *RENDERERS) if options.out is not None else ("table",)
    files = []
    stdout = Console(highlight=False)  # results go to stdout, messages to stderr
    for fmt in formats:
        if fmt == "table":
            for table in rich_tables(report, compare):
                stdout.print(table)
            continue
        text = RENDERERS[fmt](report, compare)
        if options.out is None:
            stdout.out(text, end="", highlight=False)
        else:
            files.append(atomic_write_text(options.out / f"report{SUFFIX[fmt]}", text))
    plot = options.plot
    if plot is None and options.out is not None:
        plot = options.out / "curves.png"
    if plot is not None:
        from dmae_cli.report.plots import save_curves

        files += save_curves(report, plot)
    return ReportResult(report, files)
