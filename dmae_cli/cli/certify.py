"""`dmae certify`: certify the smoothed classifier, or estimate what that would cost."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dmae_cli.cli.base import OutOpt, SetOpt, app, user_errors
from dmae_cli.cli.options import recipe_options
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError

if TYPE_CHECKING:
    from dmae_cli.config.recipe import CertifyConfig
    from dmae_cli.smoothing.certify import SigmaResult
    from dmae_cli.smoothing.estimate import SigmaEstimate

SIGMA = "certify.sigma"


@app.command(context_settings={"allow_extra_args": True})
@user_errors
@recipe_options("certify", "seed")
def certify(
    ctx: typer.Context,
    recipe: Annotated[
        Path | None,
        typer.Argument(
            help="Recipe YAML file (default: the latest fine-tuned run under ./runs, with the "
            "config.yaml saved next to its model).",
            show_default=False,
        ),
    ] = None,
    typed: dict[str, Any] | None = None,  # --sigma, --n, ...: the flagged fields of the recipe
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Time a short sample of noisy forward passes on the real model, device, batch "
            "size and precision, print the projected passes and wall time of what is left to "
            "certify, and exit, writing nothing.",
            show_default=False,
        ),
    ] = False,
    out: OutOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Certify the Gaussian-smoothed classifier by randomized smoothing.

    Per example, n0 noisy copies select a class and n fresh copies bound its
    probability; the certifier turns the bound into an L2 radius or abstains.
    Writes runs/<name>/certify/sigma-<s>.tsv (Cohen's columns, then raw counts)
    and sigma-<s>.json (checkpoint hash, settings, versions). Running the same
    command again resumes; under torchrun the examples are split across ranks.
    Options override the recipe's certify section (the key in parentheses).

    Examples:

      dmae certify --sigma 1.0 --n 100000

      dmae certify recipes/digits.yaml --sigma 0.5 --n 1000

      dmae certify recipes/digits.yaml --sigma 0.25 0.5 --certifier sequential

      dmae certify recipes/vitb.yaml --sigma 0.5 --interval 50 --skip-wrong

      torchrun --nproc_per_node 8 -m dmae_cli certify recipes/vitl.yaml --sigma 1

      dmae certify recipes/vitb.yaml --sigma 0.5 --batch-size auto --estimate

      dmae certify --checkpoint clean.pth --denoiser runs/digits/pretrain/last.pth

    --denoiser certifies a classifier trained on clean images (any dmae
    classifier checkpoint, or one made with 'dmae import') behind a DMAE
    denoiser (denoised smoothing): noise, then the DMAE without a mask, then the
    classifier. The radius is Cohen's for that composed classifier. Its files go
    to runs/<name>/certify-denoised/ (not certify/), and the header records both
    checkpoints' sha256; resuming refuses another denoiser.

    --estimate times a short sample and prints the projected noisy passes and
    wall time of what is left to certify, writing nothing. Precision auto is
    bf16 autocast on CUDA and on a CPU with native bf16 (AVX512-BF16 or AMX),
    else fp32. --compile compiles the classifier first (minutes). Out of GPU
    memory, a batch is forwarded in halves (the same noise, the same counts).

    Under torchrun write -n, not --n, and --set certify.start=K, not --start:
    torchrun takes those for abbreviations of its own options.
    """
    from dmae_cli.runtime import distributed
    from dmae_cli.smoothing.certify import run_certify
    from dmae_cli.smoothing.estimate import estimate_certify
    from dmae_cli.smoothing.found import resolve_recipe

    settings = dict(typed or {})
    path, sigmas = recipe_and_sigmas(recipe, ctx.args, list(settings.get(SIGMA) or []))
    if sigmas:
        settings[SIGMA] = sigmas
    found = resolve_recipe(path, overrides or [], settings)
    cfg = found.recipe
    if estimate:
        estimates = estimate_certify(cfg, out=out, loaded=found.loaded)
        if distributed.is_main():
            show_estimate(estimates, cfg.certify)
        return
    results = run_certify(cfg, out=out, loaded=found.loaded)
    if distributed.is_main():
        show_certified(results, cfg.certify)


def recipe_and_sigmas(
    recipe: Path | None, extra: list[str], sigmas: list[float]
) -> tuple[Path | None, list[float]]:
    """Click gives --sigma one value per use, so in `--sigma 0.25 0.5` the 0.5 arrives as a
    positional argument (or as the recipe when none is given): numbers join the sigmas."""
    path, more = None, []
    for token in [*([str(recipe)] if recipe is not None else []), *extra]:
        try:
            value = float(token)
        except ValueError:
            value = None
        if value is not None and not Path(token).is_file():
            more.append(value)
        elif path is None:
            path = Path(token)
        else:
            raise UserError(f"unexpected argument '{token}' (one recipe file at most)")
    if more and not sigmas:
        raise UserError(
            f"unexpected argument '{more[0]:g}'; noise levels follow --sigma, e.g. --sigma 0.25 0.5"
        )
    return path, [*sigmas, *more]


def show_estimate(estimates: list[SigmaEstimate], cfg: CertifyConfig) -> None:
    """The projected noisy passes and wall time per sigma (stdout); how they were measured."""
    from dmae_cli.smoothing.estimate import estimate_notes, format_duration

    def cells(todo: str, passes: int, rate: str, seconds: float | None, exact: bool) -> list[str]:
        at_most = "" if exact else "<= "  # a certifier that may stop early
        wall = "-" if seconds is None else f"{at_most}{format_duration(seconds)}"
        return [todo, f"{at_most}{passes:,}", rate, wall]

    table = Table(title="projected cost of what is left to certify (nothing written)")
    for name in ("sigma", "to do", "noisy passes", "copies/s", "wall time"):
        table.add_column(name, justify="right")
    for e in estimates:
        rate = f"{e.throughput.copies_per_second:,.0f}" if e.throughput else "-"
        seconds = e.seconds if e.throughput else None
        todo = f"{e.todo} of {e.selected}"
        table.add_row(f"{e.sigma:g}", *cells(todo, e.passes, rate, seconds, e.exact))
    table.add_section()
    total = cells(
        str(sum(e.todo for e in estimates)),
        sum(e.passes for e in estimates),
        "",
        sum(e.seconds for e in estimates),
        all(e.exact for e in estimates),
    )
    table.add_row("all", *total)
    console = Console()
    console.print(f"{cfg.certifier}: n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha:g}", highlight=False)
    console.print(table)
    for line in estimate_notes(estimates):
        console.print(line, highlight=False, soft_wrap=True)


def show_certified(results: list[SigmaResult], cfg: CertifyConfig) -> None:
    """Certified accuracy by radius, one column per sigma (stdout); the files (stderr)."""
    table = Table(title="certified accuracy (%)")
    table.add_column("radius", justify="right")
    for res in results:
        table.add_column(f"sigma {res.sigma:g}", justify="right")
    for r in cfg.radii:
        table.add_row(f"{r:g}", *(f"{100 * res.accuracy(r):.1f}" for res in results))
    table.add_section()
    table.add_row("images", *(f"{len(res.rows)}" for res in results))
    table.add_row("samples/image", *(f"{res.mean_samples():,.0f}" for res in results))
    console = Console()
    console.print(f"{cfg.certifier}: n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha:g}", highlight=False)
    console.print(table)
    for res in results:
        ui.info(f"sigma {res.sigma:g}: {res.tsv} (header {res.header.name}); model {res.model}")
