"""`dmae plugins`: every registered backbone, dataset and certifier, read from metadata; with
`--check`, imported and checked."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dmae_cli.cli.base import app, user_errors
from dmae_cli.plugins import registry
from dmae_cli.plugins.describe import describe
from dmae_cli.plugins.verify import NEEDS_DATA, verify
from dmae_cli.runtime import ui

UNCHECKED = "-"
STATUS_STYLE = {"ok": "green", "failed": "red", NEEDS_DATA: "yellow", UNCHECKED: "dim"}
PLURAL = {"backbone": "backbones", "dataset": "datasets", "certifier": "certifiers"}


@app.command()
@user_errors
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Import every plugin and check it (datasets are built without a root); "
            "exit 1 if any fails.",
        ),
    ] = False,
) -> None:
    """List every registered backbone, dataset and certifier, and where it is from.

    Listing reads metadata only (entry points, distribution, version, the first
    line of the plugin's docstring read from its source): no plugin is imported.
    --check imports each one, checks its contract, builds each dataset without a
    root and checks its first item (or reports "not checked: needs data"), and
    marks each certifier's API (1 or 2). DMAE_PLUGINS=builtin restricts loading
    to dmae's own plugins; DMAE_PLUGINS=dist1,dist2 to those distributions (plus
    dmae's). Two plugins of one kind and name from different distributions are
    marked; pick one with distribution:name.

    Examples:

      dmae plugins

      dmae plugins --check

      DMAE_PLUGINS=builtin dmae plugins --json
    """
    rows = [plugin_row(entry, reg, check) for reg in registry.REGISTRIES.values() for entry in reg]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        console = Console()
        for kind, plural in PLURAL.items():
            kind_rows = [r for r in rows if r["kind"] == kind]
            table = plugin_table(plural, kind_rows, console.width)
            # below the names' own width the terminal wraps the lines; names are never cut
            least = sum(c.width or 0 for c in table.columns[:4]) + 2 * 3
            wide = console if least <= console.width else Console(width=least)
            wide.print(table)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        ui.console.print(
            f"[red]failed:[/] {r['kind']} {r['distribution']}:{r['name']}: {escape(r['error'])}",
            highlight=False,
            soft_wrap=True,
        )
    if check and failed:
        ui.console.print(f"[bold red]{len(failed)} plugin(s) failed[/]", highlight=False)
        raise typer.Exit(1)


def plugin_table(title: str, rows: list[dict[str, Any]], width: int) -> Table:
    """One kind's rows in `width` columns. Names, distributions, versions and statuses are
    never cut or wrapped; the description takes the width left, shortened with an ellipsis
    (--json has it whole), and is left out when nothing is left."""
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    cells = [(r["name"], r["distribution"], r["version"], _status(r)) for r in rows]
    headers = ("name", "distribution", "version", "status")
    widths = [max(cell_len(c) for c in column) for column in zip(headers, *cells, strict=False)]
    for header, column_width in zip(headers, widths, strict=True):
        table.add_column(header, no_wrap=True, width=column_width)
    room = width - sum(widths) - 2 * len(widths)  # a padding of 1 on each inner side
    if room >= 8:  # else no room for a description: the names come first
        table.add_column("description", no_wrap=True, max_width=room)
    for r, (name, distribution, version, status) in zip(rows, cells, strict=True):
        style = STATUS_STYLE.get(r["status"], "")
        status_cell = Text(status, style=style)
        description = Text(r["error"] if r["status"] == "failed" else r["description"] or "")
        description.truncate(max(room, 0), overflow="ellipsis")
        row = [Text(name), Text(distribution), Text(version), status_cell, description]
        table.add_row(*row[: len(table.columns)])
    return table


def _status(row: dict[str, Any]) -> str:
    if row["status"] == NEEDS_DATA:
        return "needs data"
    return f"{row['status']} (API {row['api']})" if row["api"] is not None else row["status"]


def plugin_row(
    entry: registry.PluginEntry, reg: registry.Registry[Any], check: bool
) -> dict[str, Any]:
    """One plugin: where it comes from, its description and, when checked, its verdict."""
    duplicate = sum(e.name == entry.name for e in reg) > 1
    verdict = verify(entry) if check else None
    return {
        "kind": entry.kind,
        "name": entry.qualified_name if duplicate else entry.name,
        "distribution": entry.distribution,
        "version": entry.version,
        "origin": "built-in" if entry.builtin else "third-party",
        "target": entry.target,
        "description": describe(entry),
        "status": verdict.status if verdict else UNCHECKED,
        "error": verdict.error if verdict else None,
        "api": verdict.api if verdict else None,
    }
