"""Certified-accuracy curves: certified accuracy against L2 radius, one line per sigma plus the
envelope over sigma, as in Cohen et al. and the DMAE paper's figures; each line names its
run's kind (`report.kinds`) when the report shows kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dmae_cli.report.inputs import CertResults
from dmae_cli.report.kinds import NOT_RECORDED
from dmae_cli.report.tables import Report, RunReport
from dmae_cli.runtime.checkpoint import atomic_write
from dmae_cli.runtime.errors import UserError

GRID_POINTS = 400  # dense enough that each curve's steps are drawn where they are
FORMATS = (".png", ".pdf")


def accuracy_curve(results: CertResults, grid: np.ndarray) -> np.ndarray:
    """Certified accuracy at every radius of `grid` (correct and radius >= r, over all)."""
    radii = np.sort(results.radius[results.correct])
    below = np.searchsorted(radii, grid, side="left")  # certified radii < r
    return (len(radii) - below) / len(results)


def radius_grid(report: Report) -> np.ndarray:
    """From 0 to a little past the largest certified radius (or the largest radius asked for)."""
    largest = max(
        [max(report.radii, default=0.0)]
        + [float(s.results.radius[s.results.correct].max(initial=0.0)) for s in _all(report)]
    )
    return np.linspace(0.0, max(largest * 1.05, 0.1), GRID_POINTS)


def _all(report: Report) -> list:
    return [s for run in report.runs for s in run.summaries]


def curves_figure(report: Report) -> Figure:
    """The figure: a solid line per sigma and a dashed envelope per run with several sigmas."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    grid = radius_grid(report)
    many = len(report.runs) > 1
    colour = 0
    for run in report.runs:
        prefix = _prefix(report, run) if many else ""
        curves = []
        for s in run.summaries:
            curve = 100 * accuracy_curve(s.results, grid)
            curves.append(curve)
            ax.plot(grid, curve, color=f"C{colour % 10}", lw=1.6, label=f"{prefix}σ = {s.sigma:g}")
            colour += 1
        if run.has_envelope:
            best = np.max(curves, axis=0)
            ax.plot(grid, best, color="black", ls="--", lw=1.2, label=f"{prefix}best over σ")
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    title = "" if many else f": {_prefix(report, report.runs[0]).rstrip()}"
    ax.set_title(f"Certified accuracy{title}")
    ax.set_xlim(0, grid[-1])
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _prefix(report: Report, run: RunReport) -> str:
    """The run's name in a label, and its kind when the report shows kinds."""
    if not report.shows_kinds:
        return f"{run.run} "
    return f"{run.run} ({NOT_RECORDED if run.kind is None else run.kind.short}) "


def save_curves(report: Report, path: Path) -> list[Path]:
    """Write the curves as PNG and PDF: `path` with its own suffix, and its sibling in the other."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--plot {path}: expected a .png or .pdf file name")
    fig = curves_figure(report)
    written = []
    for suffix in sorted(FORMATS, key=lambda s: s != path.suffix.lower()):
        target = path.with_suffix(suffix)
        fmt = suffix.lstrip(".")
        atomic_write(target, lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=150))
        written.append(target)
    return written
