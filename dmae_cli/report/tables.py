"""Certified accuracy from per-example results: the numbers every report format shows.

Per file (the definitions of docs/method.md, "Certification"):

- certified accuracy at radius r: the fraction of examples predicted correctly with a certified
  radius >= r (an abstention is never correct), with a two-sided Clopper-Pearson interval,
  because the examples are a sample of the test distribution;
- approximate certified accuracy at r = 0 (the smoothed classifier's clean accuracy), the
  average certified radius (ACR: radius of the correct predictions averaged over all examples),
  the abstention rate and the number of examples;
- optionally the radii under another confidence level `alpha` (`report.inputs.with_alpha`).

Files of one run are combined into the envelope: the best certified accuracy over sigma at each
radius, the convention of the published tables. Each run has the kind of its files
(`report.kinds`: how the classifier was made), and runs compared at one sigma are compared on
the examples they all certified (`report.shared`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import beta

from dmae_cli.report.inputs import (
    ABSTAIN,
    CertResults,
    find_inputs,
    read_results,
    warn,
    with_alpha,
)
from dmae_cli.report.kinds import Kind, run_kind
from dmae_cli.report.shared import on_shared_examples
from dmae_cli.runtime.errors import UserError


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
    kind: Kind | None = None  # how its classifier was made, when its files say

    @property
    def has_envelope(self) -> bool:
        return len(self.summaries) > 1


@dataclass(frozen=True)
class Report:
    radii: tuple[float, ...]
    ci_alpha: float
    alpha: float | None
    runs: tuple[RunReport, ...]

    @property
    def shows_kinds(self) -> bool:
        """Whether the formats name each run's kind: when a run was made another way than
        the paper's (fine-tuned with noise), the one way reports showed before kinds."""
        return any(run.kind is not None and not run.kind.papers_way for run in self.runs)


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
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"--sigma {sigma}: expected a finite number > 0")
    by_run: dict[str, list[CertResults]] = {}
    for path, run in find_inputs(paths):
        results = read_results(path, run, sigma)
        if alpha is not None:
            results = with_alpha(results, alpha)
        by_run.setdefault(run, []).append(results)
    runs = []
    for run, files in on_shared_examples(by_run).items():
        summaries = sorted((summarize(r, radii, ci_alpha) for r in files), key=lambda s: s.sigma)
        _check_comparable(run, summaries)
        kind = run_kind(run, [s.results.kind for s in summaries])
        runs.append(RunReport(run, tuple(summaries), envelope(summaries), kind))
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
