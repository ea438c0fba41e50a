"""The `dmae` command line: parse, load the recipe, call one stage function, render.

Every command is thin. A mistake the user can fix (`UserError`) ends with one line on stderr and
exit code 2; `DMAE_DEBUG=1` shows its traceback. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dmae_cli import __version__, registry, ui
from dmae_cli.errors import UserError
from dmae_cli.recipe import load_recipe

app = typer.Typer(
    name="dmae",
    help="Denoising Masked AutoEncoders: pretrain, finetune, certify, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[
    Path, typer.Argument(help="Recipe YAML file, e.g. recipes/digits.yaml.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe value, KEY.PATH=VALUE (YAML scalar rules); repeatable."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Output directory (default: runs/<recipe name>/<stage>/)."),
]


def user_errors(command: F) -> F:
    """Turn a `UserError` into one line on stderr and exit code 2 (traceback with DMAE_DEBUG=1)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("DMAE_DEBUG"):
                raise
            ui.console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dmae {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Denoising Masked AutoEncoders (DMAE, ICLR 2023) for certified robustness.

    Example: [bold]dmae pretrain recipes/digits.yaml[/]
    """


@app.command()
@user_errors
def pretrain(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Resume from this checkpoint (default: the run's last.pth, if any)."),
    ] = None,
    pictures_only: Annotated[
        bool,
        typer.Option(
            "--pictures-only",
            help="Only redraw reconstructions.png from the run's last checkpoint.",
        ),
    ] = False,
) -> None:
    """DMAE pre-training: reconstruct clean images from noisy, masked ones (PAPER.md §1).

    Resumes automatically when the run directory holds a checkpoint. Writes config.yaml,
    metrics.jsonl, last.pth, checkpoint-NNNN.pth and reconstructions.png.

    Examples:

      dmae pretrain recipes/digits.yaml

      dmae pretrain recipes/vitl.yaml --set data.root=/data/imagenet --set pretrain.epochs=1600
    """
    from dmae_cli.pretrain import redraw_reconstructions, run_pretrain

    cfg = load_recipe(recipe, overrides or [])
    if pictures_only:
        path = redraw_reconstructions(cfg, out, resume)
        ui.info(f"reconstructions: {path}")
        return
    result = run_pretrain(cfg, out=out, resume=resume)
    if result.history:
        last = result.history[-1]
        ui.info(f"epoch {last['epoch']}: loss {last['loss']:.4f}")
    ui.info(
        f"outputs in {result.run_dir}/ (last.pth, metrics.jsonl, config.yaml"
        + (f", {result.picture.name})" if result.picture else ")")
    )


def _not_yet(stage: str) -> None:
    raise UserError(f"'dmae {stage}' is not available in dmae {__version__} yet")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def finetune() -> None:
    """Fine-tune the noise-robust base classifier (not available yet in this version).

    Example: dmae finetune recipes/digits.yaml
    """
    _not_yet("finetune")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def certify() -> None:
    """Certify the smoothed classifier by randomized smoothing (not available yet in this version).

    Example: dmae certify recipes/digits.yaml --sigma 0.5 --n 1000
    """
    _not_yet("certify")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def report() -> None:
    """Certified-accuracy tables and curves (not available yet in this version).

    Example: dmae report runs/digits
    """
    _not_yet("report")


@app.command()
@user_errors
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List every registered backbone, dataset and certifier with where it comes from.

    DMAE_PLUGINS=builtin restricts loading to dmae's own plugins; DMAE_PLUGINS=dist1,dist2 to
    those distributions (plus dmae's).

    Example: dmae plugins --json
    """
    rows = [_plugin_row(entry) for reg in registry.REGISTRIES.values() for entry in reg.entries()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="dmae plugins")
    for column in ("kind", "name", "distribution", "version", "origin", "description"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["kind"],
            r["name"],
            r["distribution"],
            r["version"],
            r["origin"],
            escape(r["description"]),
        )
    Console().print(table)


def _plugin_row(entry: registry.PluginEntry) -> dict[str, str]:
    try:
        doc = (entry.load().__doc__ or "").strip().splitlines()
        description = doc[0] if doc else ""
    except Exception as exc:  # report, never crash: one broken plugin must not hide the others
        description = f"failed to load: {type(exc).__name__}: {exc}"
    return {
        "kind": entry.kind,
        "name": entry.name,
        "distribution": entry.distribution,
        "version": entry.version,
        "origin": "built-in" if entry.builtin else "third-party",
        "description": description,
    }


def main() -> None:
    app()
