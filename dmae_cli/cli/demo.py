"""`dmae demo`: every stage of the digits recipe, end to end, in minutes on a laptop CPU.

It calls the functions the stage commands call (`run_pretrain`, `run_finetune`,
`run_certify`, `run_report`) on `recipes/digits.yaml` with the few settings below that make the
whole pipeline fit in about ten minutes on two CPU cores, into its own run directory
(runs/digits-demo/) so that it never collides with a full `dmae pretrain recipes/digits.yaml`.
Every stage resumes, so running the demo again reuses what is finished.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dmae_cli.cli.base import SetOpt, app, user_errors
from dmae_cli.config.recipe import Recipe, load_recipe
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError

if TYPE_CHECKING:
    from dmae_cli.report.run import ReportResult
    from dmae_cli.report.tables import Summary

RECIPE = Path("recipes/digits.yaml")
PACKAGED_RECIPE = "config/digits.yaml"  # a link to recipes/digits.yaml: the wheel holds its text
SIGMA, RADIUS = 0.5, 0.5  # the headline number: certified accuracy at radius 0.5, sigma 0.5
# The demo's departures from the recipe, and why. Applied before the user's --set items.
DEMO_OVERRIDES = (
    "name=digits-demo",  # its own run directory
    "certify.interval=2",  # 180 of the 360 test images: a 95% interval of +-7 points at most
)
REPORT_RADII = "0:1.5:0.25"  # digits at sigma <= 0.5 certify nothing much beyond 1.3


@app.command()
@user_errors
def demo(
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="Recipe to run (default: recipes/digits.yaml here, else the copy shipped "
            "with dmae).",
            show_default=False,
        ),
    ] = None,
    overrides: SetOpt = None,
) -> None:
    """The whole pipeline on the bundled digits: pretrain, finetune, certify, report.

    About ten minutes on two CPU cores; nothing is downloaded. Runs
    recipes/digits.yaml (sigma 0.25 and 0.5, every second test image certified)
    into runs/digits-demo/; shows each stage's progress and ends with the report
    table, the pictures and a one-line summary. Running it again resumes.

    Examples:

      dmae demo

      dmae demo --set pretrain.epochs=20 --set finetune.epochs=20
    """
    result = run_demo(demo_recipe(recipe, overrides or []))
    for line in closing_lines(result):  # unwrapped, so that paths can be copied
        ui.console.print(line, highlight=False, soft_wrap=True)


def find_recipe(path: Path | None = None) -> Path:
    """`path`, else recipes/digits.yaml in the working directory, else the packaged copy."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"{path}: recipe file not found")
        return Path(path)
    if RECIPE.is_file():
        return RECIPE
    packaged = resources.files("dmae_cli").joinpath(PACKAGED_RECIPE)
    if not packaged.is_file():  # pragma: no cover - a broken installation
        raise UserError(f"dmae_cli/{PACKAGED_RECIPE} is missing from this installation")
    return Path(str(packaged))


def demo_recipe(path: Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    return load_recipe(find_recipe(path), [*DEMO_OVERRIDES, *overrides])


@dataclass(frozen=True)
class DemoResult:
    recipe: Recipe
    report: ReportResult
    reconstructions: Path | None
    curves: Path | None
    headline: Summary | None  # the sigma-0.5 file, if the recipe certified that sigma
    seconds: float

    @property
    def report_dir(self) -> Path:
        return self.recipe.stage_dir("report")


def _stage(number: int, name: str, detail: str) -> None:
    ui.console.rule(f"[bold]{number}/4 {name}[/] [dim]{detail}[/]", align="left")


def run_demo(recipe: Recipe) -> DemoResult:
    """pretrain -> finetune -> certify -> report, each stage's own progress on the way."""
    from dmae_cli.report.run import ReportOptions, parse_radii, run_report
    from dmae_cli.smoothing.certify import run_certify
    from dmae_cli.training.finetune import run_finetune
    from dmae_cli.training.pretrain import run_pretrain

    start = time.perf_counter()
    p, f, c = recipe.pretrain, recipe.finetune, recipe.certify
    levels = ", ".join(f"{s:g}" for s in p.sigmas)
    _stage(1, "pretrain", f"DMAE, {p.epochs} epochs, sigma {levels}, mask {p.mask_ratio}")
    pretrained = run_pretrain(recipe)
    sigmas = ", ".join(f"{s:g}" for s in f.sigma)
    _stage(2, "finetune", f"{f.epochs} epochs per sigma, sigma {sigmas}")
    run_finetune(recipe)
    _stage(3, "certify", f"{c.certifier}, n0 {c.n0}, n {c.n}, alpha {c.alpha:g}")
    certified = run_certify(recipe)
    _stage(4, "report", str(recipe.stage_dir("report")))
    out = recipe.stage_dir("report")
    options = ReportOptions(radii=parse_radii(REPORT_RADII), out=out, formats=None)
    report = run_report([r.tsv for r in certified], options)
    summaries = [s for run in report.report.runs for s in run.summaries]
    headline = next((s for s in summaries if abs(s.sigma - SIGMA) < 1e-9), None)
    curves = next((p for p in report.files if p.suffix == ".png"), None)
    seconds = time.perf_counter() - start
    return DemoResult(recipe, report, pretrained.picture, curves, headline, seconds)


def closing_lines(result: DemoResult) -> list[str]:
    """Where the pictures and files are, then the one-line summary."""
    lines = []
    if result.curves is not None:
        lines.append(f"curves: {result.curves} (and .pdf)")
    if result.reconstructions is not None:
        lines.append(f"reconstructions: {result.reconstructions}")
    lines.append(f"report: {result.report_dir}/ (report.md, .tex, .csv, .json)")
    return [*lines, summary_line(result)]


def summary_line(result: DemoResult) -> str:
    """The demo's last line: how long, the headline number, where everything is."""
    minutes, seconds = divmod(round(result.seconds), 60)
    where = Path(result.recipe.runs_dir) / result.recipe.name
    if result.headline is None:
        return f"demo finished in {minutes}m{seconds:02d}s; outputs in {where}/"
    s = result.headline
    at_radius = next(p for p in s.points if abs(p.radius - RADIUS) < 1e-9)
    return (
        f"demo finished in {minutes}m{seconds:02d}s: certified accuracy {at_radius.accuracy:.1%} "
        f"at radius {RADIUS:g} for sigma {s.sigma:g} (clean {s.clean.accuracy:.1%}, ACR "
        f"{s.acr:.3f}, {s.examples} test images); outputs in {where}/"
    )
