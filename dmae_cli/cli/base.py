"""What every command shares: the Typer app, the one error exit, the common option types.

Every command is thin: it parses, loads the recipe, calls one stage function and renders. A
mistake the user can fix (`UserError`) ends with one line on stderr and exit code 2;
`DMAE_DEBUG=1` shows its traceback. So does an output path blocked by the file system (`--out`
naming a file, a file where a run directory goes): `user_errors` checks a command's `--out`
before it runs, and turns the OSErrors that mean "a file is in the way" into that line too. Any
other exception is a bug and keeps its traceback.

The command modules import this one and register on `app`; `dmae_cli.cli.app` imports them all.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from dmae_cli import __version__
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import Interrupted

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
            if isinstance(kwargs.get("out"), Path):  # every command's --out DIR
                check_output_dir(kwargs["out"])
            try:
                return command(*args, **kwargs)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                raise UserError(blocked_path(exc)) from exc
        except UserError as exc:
            if os.environ.get("DMAE_DEBUG"):
                raise
            ui.console.print(f"{_label(exc)} {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def check_output_dir(path: Path, option: str = "--out", *, prefix: bool = False) -> None:
    """`path` can be an output directory (with `prefix`, a prefix of file names in one): it and
    its existing parents are directories, or one line naming the file in the way."""
    for folder in (*path.parents,) if prefix else (path, *path.parents):
        if os.path.lexists(folder):  # a dangling link is in the way too
            if folder.is_dir():
                return
            if folder == path:
                raise UserError(f"{option} {path} is a file; give a directory")
            raise UserError(f"{option} {path}: {folder} is a file, not a directory")


def blocked_path(exc: OSError) -> str:
    """The one line for an output the file system refuses: which path, and what is wrong."""
    where = exc.filename2 or exc.filename or "a path"  # a rename's target is what is in the way
    if isinstance(exc, IsADirectoryError):
        return f"{where} is a directory; give a file name"
    if isinstance(exc, NotADirectoryError):
        return f"{where}: a part of this path is a file, not a directory"
    return (
        f"{where} already exists and is in the way of an output; remove it or choose another path"
    )


def _label(exc: UserError) -> str:
    return "[bold yellow]stopped:[/]" if isinstance(exc, Interrupted) else "[bold red]error:[/]"


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
