"""The report in the terminal: rich tables, narrow enough for 80 columns.

One table per run, a row per radius and a column per sigma, with Clopper-Pearson intervals;
when the runs were made different ways (`Report.shows_kinds`), a line above each names its
kind, and at each sigma that several runs certified one more table puts them side by side (a
column per run, the certified accuracy alone) so that the ways read as one comparison. Then,
with `--compare`, the published rows of the DMAE paper beside ours.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from dmae_cli.report.formats import comparison_rows, kind_label, pct, radius_label
from dmae_cli.report.published import PublishedTable
from dmae_cli.report.tables import Point, Report, RunReport, Summary


def rich_tables(report: Report, compare: PublishedTable | None = None) -> list[RenderableType]:
    """Terminal layout: one table per run with a row per radius and a column per sigma
    (narrow enough for a terminal), the ways side by side when they differ, then the
    comparison in the paper's layout."""
    tables: list[RenderableType] = []
    for run in report.runs:
        if report.shows_kinds:  # a line of its own: it wraps, where a title would be cut
            tables.append(Text(f"{run.run}: {kind_label(run.kind)}", style="bold"))
        tables.append(_rich_run(report, run))
    if report.shows_kinds:
        tables += side_by_side(report)
    if compare is not None:
        table = Table(title=compare.title, caption=f"Source: {compare.source}")
        table.add_column("method")
        table.add_column("params")
        for r in report.radii:
            table.add_column(f"r={radius_label(r)}", justify="right")
        rows = comparison_rows(report, compare)
        last_published = len(compare.rows) - 1
        for i, (method, params, cells) in enumerate(rows):
            style = "bold" if i > last_published else None  # ours, below the published rows
            table.add_row(method, params, *cells, style=style, end_section=i == last_published)
        tables.append(table)
    return tables


def _rich_run(report: Report, run: RunReport) -> Table:
    level = f"{100 * (1 - report.ci_alpha):g}%"
    title = f"{run.run}: certified accuracy (%)"
    table = Table(title=title, caption=f"[dim]in brackets: {level} Clopper-Pearson interval[/]")
    table.add_column("radius", justify="right")
    for s in run.summaries:
        table.add_column(f"σ={s.sigma:g}", justify="right")
    if run.has_envelope:
        table.add_column("best (σ)", justify="right", style="bold")
    for i, r in enumerate(report.radii):
        cells = [_rich_cell(s.points[i]) for s in run.summaries]
        if run.has_envelope:
            e = run.envelope[i]
            cells.append(f"{pct(e.point.accuracy)} ({e.sigma:g})")
        table.add_row(radius_label(r), *cells, end_section=i == len(report.radii) - 1)
    extra = [""] if run.has_envelope else []
    table.add_row("clean", *[_rich_cell(s.clean) for s in run.summaries], *extra)
    table.add_row("ACR", *[f"{s.acr:.3f}" for s in run.summaries], *extra)
    table.add_row("abstained", *[f"{pct(s.abstention_rate)}%" for s in run.summaries], *extra)
    table.add_row("examples", *[str(s.examples) for s in run.summaries], *extra)
    return table


def _rich_cell(p: Point) -> str:
    return f"{pct(p.accuracy)} [dim]\\[{pct(p.low)}, {pct(p.high)}][/]"


def side_by_side(report: Report) -> list[RenderableType]:
    """At each sigma that several runs certified, their certified accuracy in one table, a
    numbered column per run, and a legend line per column naming the run and its kind."""
    out: list[RenderableType] = []
    sigmas = sorted({s.sigma for run in report.runs for s in run.summaries})
    for sigma in sigmas:
        columns = [(run, _at(run, sigma)) for run in report.runs]
        columns = [(run, s) for run, s in columns if s is not None]
        if len(columns) < 2:
            continue
        table = Table(title=f"σ={sigma:g}: the runs side by side, certified accuracy (%)")
        table.add_column("radius", justify="right")
        for number in range(1, len(columns) + 1):
            table.add_column(str(number), justify="right")
        for i, r in enumerate(report.radii):
            cells = [pct(s.points[i].accuracy) for _, s in columns]
            table.add_row(radius_label(r), *cells, end_section=i == len(report.radii) - 1)
        table.add_row("ACR", *[f"{s.acr:.3f}" for _, s in columns])
        table.add_row("examples", *[str(s.examples) for _, s in columns])
        out.append(table)
        for number, (run, _) in enumerate(columns, 1):
            out.append(Text(f"{number}: {run.run}, {kind_label(run.kind)}"))
    return out


def _at(run: RunReport, sigma: float) -> Summary | None:
    return next((s for s in run.summaries if s.sigma == sigma), None)
