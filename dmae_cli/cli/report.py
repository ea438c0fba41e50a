"""`dmae report`: tables, intervals and curves of certification results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmae_cli.cli.base import app, user_errors
from dmae_cli.runtime import ui


@app.command()
@user_errors
def report(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories (runs/<name>: every certify/sigma-*.tsv), certify "
            "directories (runs/<name>/certify-denoised), or per-example TSV files (ours or "
            "Cohen et al.'s format).",
            show_default=False,
        ),
    ],
    radii: Annotated[
        str,
        typer.Option(help="Radii of the table: START:STOP:STEP (stop included) or a list 0,0.5,1."),
    ] = "0:3:0.25",
    sigma: Annotated[
        float | None,
        typer.Option(
            help="Sigma of files that do not record it (no sigma column or JSON header); "
            "otherwise taken from names such as sigma_0.50 or noise_0.25.",
            show_default=False,
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Recompute Cohen radii at confidence 1 - ALPHA from the files' raw counts.",
            show_default=False,
        ),
    ] = None,
    ci_alpha: Annotated[
        float,
        typer.Option(help="Two-sided Clopper-Pearson intervals at level 1 - CI_ALPHA."),
    ] = 0.05,
    formats: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar="table,markdown,latex,csv,json",
            help="What to print (or write with --out); default: the table, and with --out "
            "also every file format.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write report.md/.tex/.csv/.json and curves.png/.pdf into this folder."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Certified accuracy against radius, as PNG and PDF (e.g. curves.png)."),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            metavar="imagenet|cifar10",
            help="Print the published DMAE results on that data set beside ours, at the same "
            "radii.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Certified accuracy at each radius, ACR, abstentions, the envelope over sigma.

    Per file: certified accuracy (correct and radius >= r) with a
    Clopper-Pearson interval, clean accuracy (r = 0), average certified radius,
    abstention rate; per run: the best over sigma at each radius (as the
    published tables). A malformed file stops with one line naming the file and
    the line.

    Several runs side by side compare the ways of getting a certified
    classifier, each run named by its kind (from its files' headers): a clean
    classifier alone (not a smoothing model), a clean classifier + DMAE denoiser
    (or + a denoiser tuned for it), and the paper's way (fine-tuned with noise).
    At a sigma where the runs certified different examples, they are compared on
    the examples they share, with a warning.

    Examples:

      dmae report runs/digits

      dmae report runs/digits runs/digits-clean runs/digits/certify-*

      dmae report a.tsv b.tsv --radii 0:3:0.25 --format markdown,csv --plot c.png

      dmae report runs/vitb --compare imagenet --out reports/vitb

      dmae report noise_0.50.tsv --alpha 0.01

    The second example compares the paper's way (runs/digits), a clean
    classifier alone (runs/digits-clean, fine-tuned with finetune.sigma: 0) and
    that classifier behind a DMAE denoiser, untuned and tuned (written by 'dmae
    certify --denoiser' into runs/digits/certify-denoised, and with --out
    runs/digits/certify-tuned).
    """
    from dmae_cli.report.formats import parse_formats
    from dmae_cli.report.run import ReportOptions, parse_radii, run_report

    options = ReportOptions(
        radii=parse_radii(radii),
        sigma=sigma,
        alpha=alpha,
        ci_alpha=ci_alpha,
        formats=tuple(parse_formats(formats)) if formats is not None else None,
        out=out,
        plot=plot,
        compare=compare,
    )
    result = run_report(inputs, options)
    for path in result.files:
        ui.info(f"wrote {path}")
