"""The report's file formats: a `Report` as markdown, LaTeX, CSV or JSON, optionally beside the
published rows of the DMAE paper (the comparison rows); the terminal's tables are
`report.terminal`'s.

When a run was made another way than the paper's (`Report.shows_kinds`, `report.kinds`), every
format names each run's kind, so that runs side by side read as a comparison of the ways: a
column after the row's name in markdown and LaTeX, the name of our rows beside the published
ones, and a `kind` column (CSV) or field (JSON) appended after those of before. Otherwise the
output is what it was before kinds.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from dmae_cli.report.kinds import NOT_RECORDED, Kind
from dmae_cli.report.published import PublishedTable
from dmae_cli.report.tables import Point, Report, RunReport, Summary
from dmae_cli.runtime.errors import UserError

FORMATS = ("table", "markdown", "latex", "csv", "json")
SUFFIX = {"markdown": ".md", "latex": ".tex", "csv": ".csv", "json": ".json"}


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def radius_label(radius: float) -> str:
    return f"{radius:g}"


def kind_label(kind: Kind | None) -> str:
    return NOT_RECORDED if kind is None else kind.label


def kind_short(kind: Kind | None) -> str:
    return NOT_RECORDED if kind is None else kind.short


SeriesRow = tuple[str, Summary | None, list[str], list[str], str]


def series_rows(report: Report) -> list[SeriesRow]:
    """(name, summary or None for an envelope, accuracy cells, interval cells, kind) per table
    row; the kind is the file's, or the run's for its envelope."""
    rows = []
    for run in report.runs:
        prefix = f"{run.run} " if len(report.runs) > 1 else ""
        for s in run.summaries:
            cells = [pct(p.accuracy) for p in s.points]
            ci = [f"[{pct(p.low)}, {pct(p.high)}]" for p in s.points]
            rows.append((f"{prefix}σ={s.sigma:g}", s, cells, ci, kind_label(s.results.kind)))
        if run.has_envelope:
            cells = [f"{pct(e.point.accuracy)} (σ={e.sigma:g})" for e in run.envelope]
            ci = [f"[{pct(e.point.low)}, {pct(e.point.high)}]" for e in run.envelope]
            rows.append((f"{prefix}best over σ", None, cells, ci, kind_label(run.kind)))
    return rows


def headline_rows(report: Report) -> list[tuple[str, list[float]]]:
    """Our rows for a comparison: the envelope of each run (or its only sigma), in %."""
    rows = []
    for run in report.runs:
        name = (
            f"ours: {run.run}, {kind_short(run.kind)}" if report.shows_kinds else f"ours: {run.run}"
        )
        if run.has_envelope:
            values = [100 * e.point.accuracy for e in run.envelope]
            rows.append((f"{name} (best over σ)", values))
        else:
            s = run.summaries[0]
            rows.append((f"{name} (σ={s.sigma:g})", [100 * p.accuracy for p in s.points]))
    return rows


def comparison_rows(report: Report, table: PublishedTable) -> list[tuple[str, str, list[str]]]:
    """(method, params, cells at our radii) for the published rows, then ours; — where none."""
    rows = []
    for row in table.rows:
        values = [row.at(r) for r in report.radii]
        rows.append((row.method, row.params, ["—" if v is None else f"{v:.1f}" for v in values]))
    for name, values in headline_rows(report):
        rows.append((name, "", [f"{v:.1f}" for v in values]))
    return rows


def _summary_cells(s: Summary | None) -> list[str]:
    if s is None:
        return ["", "", "", ""]
    return [str(s.examples), pct(s.abstention_rate), f"{s.acr:.3f}", pct(s.clean.accuracy)]


SUMMARY_HEADS = ["examples", "abstained %", "ACR", "clean %"]


def _heads(report: Report) -> list[str]:
    """The columns after the row's name: the kind when shown, then the summary."""
    return (["kind"] if report.shows_kinds else []) + SUMMARY_HEADS


def _kind_cells(report: Report, kind: str) -> list[str]:
    return [kind] if report.shows_kinds else []


def markdown(report: Report, compare: PublishedTable | None = None) -> str:
    radii = [f"r={radius_label(r)}" for r in report.radii]
    heads = _heads(report)
    lines = [
        "| | " + " | ".join(heads + radii) + " |",
        "|---" * (1 + len(heads) + len(radii)) + "|",
    ]
    for name, s, cells, ci, kind in series_rows(report):
        values = [f"{c} {i}" for c, i in zip(cells, ci, strict=True)]
        row = _kind_cells(report, kind) + _summary_cells(s) + values
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", _caption(report)]
    if compare is not None:
        lines += ["", f"**{compare.title}**", ""]
        lines.append("| method | params | " + " | ".join(radii) + " |")
        lines.append("|---" * (2 + len(radii)) + "|")
        for method, params, cells in comparison_rows(report, compare):
            lines.append(f"| {method} | {params} | " + " | ".join(cells) + " |")
        lines += ["", f"Source: {compare.source}."]
    return "\n".join(lines) + "\n"


def _caption(report: Report) -> str:
    level = f"{100 * (1 - report.ci_alpha):g}%"
    text = (
        f"Certified accuracy (%) at L2 radius r; [{level} Clopper-Pearson interval]. "
        "ACR: average certified radius; clean: approximate certified accuracy at r = 0."
    )
    if report.alpha is not None:
        text += f" Radii recomputed at alpha = {report.alpha:g}."
    if report.shows_kinds:
        text += (
            " Kind: how the classifier was made; a clean classifier alone was trained without "
            "noise and is not a smoothing model (a baseline)."
        )
    return text


def _tex(text: str) -> str:
    for old, new in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_")):
        text = text.replace(old, new)
    for old, new in (("#", r"\#"), ("σ", r"$\sigma$"), ("—", "--")):
        text = text.replace(old, new)
    return text


def latex(report: Report, compare: PublishedTable | None = None) -> str:
    radii = [f"${radius_label(r)}$" for r in report.radii]
    heads = ["", *(_tex(h) for h in _heads(report)), *radii]
    left = "l" * (1 + len(_kind_cells(report, "")))  # the name, and the kind when shown
    lines = [
        r"\begin{tabular}{" + left + "r" * (len(heads) - len(left)) + "}",
        r"\toprule",
        " & ".join(heads) + r" \\",
        r"\midrule",
    ]
    for name, s, cells, ci, kind in series_rows(report):
        values = [f"{_tex(c)} {{\\scriptsize {i}}}" for c, i in zip(cells, ci, strict=True)]
        kinds = [_tex(k) for k in _kind_cells(report, kind)]
        lines.append(" & ".join([_tex(name), *kinds, *_summary_cells(s), *values]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + _caption(report)]
    if compare is not None:
        lines += ["", r"\begin{tabular}{ll" + "r" * len(radii) + "}", r"\toprule"]
        lines.append(" & ".join(["method", "params", *radii]) + r" \\")
        lines.append(r"\midrule")
        for method, params, cells in comparison_rows(report, compare):
            lines.append(" & ".join(_tex(x) for x in (method, params, *cells)) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", f"% Source: {compare.source}"]
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "run",
    "series",
    "sigma",
    "file",
    "radius",
    "certified_accuracy",
    "ci_low",
    "ci_high",
    "certified",
    "examples",
    "abstention_rate",
    "acr",
    "clean_accuracy",
]


def csv_text(report: Report, compare: PublishedTable | None = None) -> str:
    """Long format, one row per (series, radius); accuracies as fractions in [0, 1]. With
    kinds shown, a last column `kind` (the file's; the run's for the envelope)."""
    buffer = io.StringIO()
    kinds = report.shows_kinds
    fields = [*CSV_FIELDS, "kind"] if kinds else CSV_FIELDS
    writer = csv.DictWriter(buffer, fields, lineterminator="\n")
    writer.writeheader()
    for run in report.runs:
        for s in run.summaries:
            common = {"run": run.run, "series": "sigma", **_summary_fields(s)}
            common |= {"kind": kind_label(s.results.kind)} if kinds else {}
            for p in s.points:
                writer.writerow({**common, **_point_fields(p)})
        for e in run.envelope if run.has_envelope else ():
            fields = {"run": run.run, "series": "envelope", "sigma": e.sigma}
            fields |= {"kind": kind_label(run.kind)} if kinds else {}
            writer.writerow({**fields, **_point_fields(e.point), "examples": e.point.total})
    for row in compare.rows if compare is not None else ():
        for r in report.radii:
            value = row.at(r)
            if value is not None:
                writer.writerow(
                    {"run": row.method, "series": f"published:{compare.name}", "radius": r}
                    | {"certified_accuracy": round(value / 100, 6)}  # 54.3 / 100 != 0.543
                )
    return buffer.getvalue()


def _summary_fields(s: Summary) -> dict[str, Any]:
    return {
        "file": str(s.results.path),
        "sigma": s.sigma,
        "examples": s.examples,
        "abstention_rate": s.abstention_rate,
        "acr": s.acr,
        "clean_accuracy": s.clean.accuracy,
    }


def _point_fields(p: Point) -> dict[str, Any]:
    return {
        "radius": p.radius,
        "certified_accuracy": p.accuracy,
        "ci_low": p.low,
        "ci_high": p.high,
        "certified": p.certified,
    }


def json_text(report: Report, compare: PublishedTable | None = None) -> str:
    """Everything, accuracies as fractions in [0, 1]; published numbers as printed (%)."""
    data: dict[str, Any] = {
        "radii": list(report.radii),
        "ci_alpha": report.ci_alpha,
        "alpha": report.alpha,
        "runs": [_run_json(run, report.shows_kinds) for run in report.runs],
    }
    if compare is not None:
        data["compare"] = {
            "table": compare.name,
            "title": compare.title,
            "source": compare.source,
            "rows": [
                {
                    "method": row.method,
                    "params": row.params,
                    "reference": row.reference,
                    "accuracy_percent": [row.at(r) for r in report.radii],
                }
                for row in compare.rows
            ],
        }
    return json.dumps(data, indent=2) + "\n"


def _run_json(run: RunReport, kinds: bool) -> dict[str, Any]:
    """A run; with `kinds`, a last field `kind` for the run and for each file (null when not
    recorded)."""
    files = [
        {**_summary_fields(s), "certified": [_point_fields(p) for p in s.points]}
        | (_kind_json(s.results.kind) if kinds else {})
        for s in run.summaries
    ]
    best = [{**_point_fields(e.point), "sigma": e.sigma} for e in run.envelope]
    data = {"run": run.run, "files": files, "envelope": best if run.has_envelope else None}
    return data | (_kind_json(run.kind) if kinds else {})


def _kind_json(kind: Kind | None) -> dict[str, Any]:
    return {"kind": None if kind is None else kind.label}


RENDERERS = {"markdown": markdown, "latex": latex, "csv": csv_text, "json": json_text}


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    aliases = {"md": "markdown", "tex": "latex", "rich": "table"}
    formats = [aliases.get(f, f) for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(formats))
