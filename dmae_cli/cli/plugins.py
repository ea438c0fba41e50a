"""`dmae plugins`: every registered backbone, dataset and certifier, and whether it loads."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dmae_cli.cli.base import app, user_errors
from dmae_cli.plugins import registry
from dmae_cli.runtime import ui


@app.command()
@user_errors
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Import every plugin, check it against its contract, exit 1 if any fails.",
        ),
    ] = False,
) -> None:
    """List every registered backbone, dataset and certifier with where it comes from.

    Each row shows the kind, name, providing distribution and its version, whether it is
    built in or third-party, and the first line of its docstring (or why it failed to load).
    DMAE_PLUGINS=builtin restricts loading to dmae's own plugins; DMAE_PLUGINS=dist1,dist2 to
    those distributions (plus dmae's). Two plugins of one kind and name from different
    distributions are marked; pick one with distribution:name.

    Examples:

      dmae plugins

      dmae plugins --check

      DMAE_PLUGINS=builtin dmae plugins --json
    """
    rows = [plugin_row(entry, reg) for reg in registry.REGISTRIES.values() for entry in reg]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        Console().print(plugin_table(rows))
    failed = [f"{r['kind']} {r['distribution']}:{r['name']}" for r in rows if not r["ok"]]
    if check and failed:
        ui.console.print(f"[bold red]{len(failed)} plugin(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)


def plugin_table(rows: list[dict[str, Any]]) -> Table:
    """The rows as a table, the status in colour."""
    table = Table(title="dmae plugins")
    for column in ("kind", "name", "distribution", "version", "origin", "status", "description"):
        table.add_column(column)
    for r in rows:
        status = "[green]ok[/]" if r["ok"] else "[red]failed[/]"
        cells = (r["kind"], r["name"], r["distribution"], r["version"], r["origin"])
        table.add_row(*cells, status, escape(r["description"]))
    return table


def plugin_row(entry: registry.PluginEntry, reg: registry.Registry[Any]) -> dict[str, Any]:
    """One plugin: where it comes from and the first line of its docstring, or why it fails."""
    ok = True
    try:
        doc = (entry.load().__doc__ or "").strip().splitlines()
        description = doc[0] if doc else ""
    except Exception as exc:  # report, never crash: one broken plugin must not hide the others
        ok, description = False, registry.describe_failure(exc)
    duplicate = sum(e.name == entry.name for e in reg) > 1
    return {
        "kind": entry.kind,
        "name": entry.qualified_name if duplicate else entry.name,
        "distribution": entry.distribution,
        "version": entry.version,
        "origin": "built-in" if entry.builtin else "third-party",
        "ok": ok,
        "description": description,
    }
