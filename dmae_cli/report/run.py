"""The report stage: per-example certification results in, certified-accuracy tables out.

`run_report` is what `dmae report` does: `report.inputs` reads the per-example TSV files (of
`dmae certify` or Cohen et al.'s tools; row by row into compact columns, `report.rows`),
`report.tables` computes certified accuracy per file and the envelope over sigma per run,
`report.formats` renders the rich table, markdown, LaTeX, CSV or JSON (optionally beside the
published rows of `report/published.yaml`) and `report.plots` draws the curves.
This module holds the options and writes the files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dmae_cli.report.rows import ReportWarning
from dmae_cli.report.tables import Report, build_report
from dmae_cli.runtime.errors import UserError

# -- radii --------------------------------------------------------------------------------------
MAX_RADII = 10_000  # a table column and a Clopper-Pearson interval per file each


def parse_radii(text: str) -> tuple[float, ...]:
    """`0:3:0.25` (start:stop:step, stop included) or a comma list `0,0.5,1`; at most
    `MAX_RADII` radii."""
    shown = repr(text) if len(text) <= 40 else repr(text[:37] + "...")
    try:
        if ":" in text:
            values = _radius_range(shown, *(float(part) for part in text.split(":")))
        else:
            values = [float(part) for part in text.split(",") if part.strip()]
    except (TypeError, ValueError):
        raise UserError(
            f"--radii {shown}: expected START:STOP:STEP (e.g. 0:3:0.25) or a list (0,0.5,1)"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"--radii {shown}: radii must be finite numbers >= 0")
    if len(values) > MAX_RADII:
        raise UserError(f"--radii {shown}: {len(values)} radii; at most {MAX_RADII}")
    return tuple(sorted({round(v, 10) for v in values}))


def _radius_range(shown: str, start: float, stop: float, step: float) -> list[float]:
    if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start:
        raise ValueError
    count = (stop - start) / step + 1e-9  # tolerate 3.0 / 0.25 rounding
    if not count < MAX_RADII:  # an infinite or huge count is refused before it is built
        many = math.floor(count) + 1 if math.isfinite(count) else "infinitely many"
        raise UserError(
            f"--radii {shown}: {many} radii; at most {MAX_RADII} (a larger step or a shorter range)"
        )
    return [start + i * step for i in range(math.floor(count) + 1)]


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

    from dmae_cli.report.formats import RENDERERS, SUFFIX
    from dmae_cli.report.published import published_table
    from dmae_cli.report.terminal import rich_tables
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
