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

from dmae_cli import __version__
from dmae_cli.config.recipe import load_recipe
from dmae_cli.plugins import registry
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
            return command(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("DMAE_DEBUG"):
                raise
            ui.console.print(f"{_label(exc)} {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


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
    from dmae_cli.training.pretrain import redraw_reconstructions, run_pretrain

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


@app.command()
@user_errors
def finetune(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    sigma: Annotated[
        list[float] | None,
        typer.Option(
            "--sigma",
            help="Noise level to train a model for (overrides finetune.sigma); repeatable.",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            metavar="PATH|none",
            help="Start from this checkpoint (ours, official DMAE/MAE, timm or .safetensors) "
            "or pretraining run directory (its last.pth), or 'none' for random weights "
            "(default: the recipe's pretrain run, last.pth).",
            show_default=False,
        ),
    ] = None,
    linear_probe: Annotated[
        bool,
        typer.Option(
            "--linear-probe",
            help="Train only a BatchNorm + linear head on the frozen encoder's cls token "
            "(LARS, finetune.probe settings), into runs/<name>/linprobe/.",
        ),
    ] = False,
    out: OutOpt = None,
) -> None:
    """Fine-tune the noise-robust base classifier, one model per sigma (PAPER.md §2).

    Gaussian noise in pixel space plus consistency regularisation; evaluates clean and noisy
    test accuracy every finetune.eval_every epochs. Each sigma writes
    runs/<name>/finetune/sigma-<s>/ (config.yaml, metrics.jsonl, last.pth, best.pth by noisy
    accuracy; with --out DIR, DIR/sigma-<s>/) and resumes automatically when run again.

    Examples:

      dmae finetune recipes/digits.yaml

      dmae finetune recipes/vitb.yaml --sigma 0.5 --init /ckpt/dmae-base.pth

      dmae finetune recipes/vitb.yaml --linear-probe

      dmae finetune recipes/digits.yaml --init none --set finetune.consistency=false
    """
    from dmae_cli.training.finetune import run_finetune

    items = list(overrides or [])
    if sigma:
        items.append(f"finetune.sigma={json.dumps(sigma)}")
    if init is not None:
        items.append(f"finetune.init={json.dumps(init)}")  # quoted: a path stays a string
    if linear_probe:
        items.append("finetune.linear_probe=true")
    cfg = load_recipe(recipe, items)
    for run in run_finetune(cfg, out=out):
        best = run.best
        if best:
            ui.info(
                f"sigma {run.sigma}: best noisy accuracy {best['acc_noisy']:.1%} "
                f"(clean {best['acc_clean']:.1%}, epoch {best['epoch'] + 1}) -> "
                f"{run.run_dir}/best.pth"
            )
        else:
            ui.info(f"sigma {run.sigma}: outputs in {run.run_dir}/")


def _opt(help_text: str, *names: str) -> Any:
    return typer.Option(*names, help=help_text, show_default=False)


@app.command(context_settings={"allow_extra_args": True})
@user_errors
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
    sigma: Annotated[
        list[float] | None, _opt("Noise level(s): --sigma 0.25 0.5 (certify.sigma).", "--sigma")
    ] = None,
    n: Annotated[
        int | None,
        _opt("Estimation samples per image, the budget (certify.n).", "--n", "-n"),
    ] = None,
    n0: Annotated[int | None, _opt("Selection samples per image (certify.n0).")] = None,
    alpha: Annotated[
        float | None, _opt("Failure probability of each certificate (certify.alpha).")
    ] = None,
    certifier: Annotated[
        str | None, _opt("Certifier plugin, e.g. cohen or sequential (certify.certifier).")
    ] = None,
    batch_size: Annotated[
        str | None,
        typer.Option(
            "--batch-size",
            metavar="N|auto",
            help="Noisy copies per batch, or auto: the largest that fits on the GPU, 256 on a "
            "CPU (certify.batch_size).",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str | None, _opt("Split to certify: test (= val) or train (certify.split).")
    ] = None,
    interval: Annotated[
        int | None, _opt("Every k-th example; the paper takes every 50th (certify.interval).")
    ] = None,
    max_examples: Annotated[
        int | None, _opt("At most this many examples (certify.max_examples).")
    ] = None,
    start: Annotated[int | None, _opt("First example index (certify.start).")] = None,
    end: Annotated[int | None, _opt("Stop before this example index (certify.end).")] = None,
    skip_wrong: Annotated[
        bool | None,
        _opt(
            "Skip estimation once the selected class is wrong, as the official evaluation; "
            "certified accuracy is unchanged (certify.skip_wrong).",
            "--skip-wrong/--no-skip-wrong",
        ),
    ] = None,
    seed: Annotated[int | None, _opt("Seed of the noise (seed).")] = None,
    checkpoint: Annotated[
        Path | None,
        _opt(
            "Classifier to certify (default: runs/<name>/finetune/sigma-<s>/best.pth, else "
            "last.pth) (certify.checkpoint).",
            "--checkpoint",
        ),
    ] = None,
    compile_model: Annotated[
        bool | None,
        _opt(
            "torch.compile the classifier: faster batches after a compilation of minutes; "
            "needs a C++ compiler (CPU) or Triton (CUDA) (certify.compile).",
            "--compile/--no-compile",
        ),
    ] = None,
    estimate: Annotated[
        bool,
        _opt(
            "Time a short sample of noisy forward passes on the real model, device, batch size "
            "and precision, print the projected passes and wall time of what is left to "
            "certify, and exit, writing nothing.",
            "--estimate",
        ),
    ] = False,
    out: OutOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Certify the Gaussian-smoothed classifier by randomized smoothing (PAPER.md §3).

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

      torchrun --nproc_per_node 8 -m dmae_cli certify recipes/vitl.yaml --sigma 1.0

      dmae certify recipes/vitb.yaml --sigma 0.5 --batch-size auto --compile --estimate

    --estimate times a short sample and prints the projected noisy passes and
    wall time of what is left to certify, writing nothing. Precision auto is
    bf16 autocast on CUDA and on a CPU with native bf16 (AVX512-BF16 or AMX),
    else fp32. Out of GPU memory, a batch is forwarded in halves (the same
    noise, the same counts).

    Under torchrun write -n, not --n, and --set certify.start=K, not --start: torchrun
    takes those for abbreviations of its own options.
    """
    from dmae_cli.runtime import distributed
    from dmae_cli.smoothing.certify import run_certify
    from dmae_cli.smoothing.estimate import estimate_certify
    from dmae_cli.smoothing.jobs import resolve_recipe

    path, sigmas = _recipe_and_sigmas(recipe, ctx.args, sigma or [])
    flags = {
        "certify.sigma": sigmas or None,
        "certify.n": n,
        "certify.n0": n0,
        "certify.alpha": alpha,
        "certify.certifier": certifier,
        "certify.batch_size": _batch_size_value(batch_size),
        "certify.split": split,
        "certify.interval": interval,
        "certify.max_examples": max_examples,
        "certify.start": start,
        "certify.end": end,
        "certify.skip_wrong": skip_wrong,
        "certify.checkpoint": None if checkpoint is None else str(checkpoint),
        "certify.compile": compile_model,
        "seed": seed,
    }
    items = [
        *(overrides or []),
        *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None),
    ]
    cfg = resolve_recipe(path, items)
    if estimate:
        estimates = estimate_certify(cfg, out=out)
        if distributed.is_main():
            _show_estimate(estimates, cfg.certify)
        return
    results = run_certify(cfg, out=out)
    if distributed.is_main():
        _show_certified(results, cfg.certify)


def _batch_size_value(text: str | None) -> int | str | None:
    """--batch-size 500 is a number, --batch-size auto a word; the recipe checks either."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _show_estimate(estimates: list[Any], cfg: Any) -> None:
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


def _show_certified(results: list[Any], cfg: Any) -> None:
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


def _recipe_and_sigmas(
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


@app.command()
@user_errors
def report(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories (runs/<name>: every certify/sigma-*.tsv), certify "
            "directories, or per-example TSV files (ours or Cohen et al.'s format).",
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
            help="Print the published rows of PAPER.md §4 beside ours, at the same radii.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Certified accuracy at each radius, ACR, abstentions, the envelope over sigma.

    Per file: certified accuracy (correct and radius >= r) with a Clopper-Pearson
    interval, clean accuracy (r = 0), average certified radius, abstention rate;
    per run: the best over sigma at each radius (as the published tables). A
    malformed file stops with one line naming the file and the line.

    Examples:

      dmae report runs/digits

      dmae report a.tsv b.tsv --radii 0:3:0.25 --format markdown,csv --plot c.png

      dmae report runs/vitb --compare imagenet --out reports/vitb

      dmae report noise_0.50.tsv --alpha 0.01
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
    recipes/digits.yaml (sigma 0.25 and 0.5, every second test image
    certified) into runs/digits-demo/; shows each stage's progress and ends
    with the report table, the pictures and a one-line summary. Running it
    again resumes.

    Examples:

      dmae demo

      dmae demo --set pretrain.epochs=20 --set finetune.epochs=20
    """
    from dmae_cli.cli.demo import closing_lines, demo_recipe, run_demo

    result = run_demo(demo_recipe(recipe, overrides or []))
    for line in closing_lines(result):  # unwrapped, so that paths can be copied
        ui.console.print(line, highlight=False, soft_wrap=True)


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
    rows = [_plugin_row(entry, reg) for reg in registry.REGISTRIES.values() for entry in reg]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        table = Table(title="dmae plugins")
        columns = ("kind", "name", "distribution", "version", "origin", "status", "description")
        for column in columns:
            table.add_column(column)
        for r in rows:
            status = "[green]ok[/]" if r["ok"] else "[red]failed[/]"
            table.add_row(
                r["kind"],
                r["name"],
                r["distribution"],
                r["version"],
                r["origin"],
                status,
                escape(r["description"]),
            )
        Console().print(table)
    failed = [f"{r['kind']} {r['distribution']}:{r['name']}" for r in rows if not r["ok"]]
    if check and failed:
        ui.console.print(f"[bold red]{len(failed)} plugin(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)


@app.command()
@user_errors
def shard(
    dataset: Annotated[
        str,
        typer.Argument(
            help="A registered dataset (see dmae plugins), e.g. imagefolder.", show_default=False
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            metavar="PREFIX",
            help="Shard prefix: writes PREFIX-000000.tar ... and PREFIX-manifest.json "
            "(an existing directory gets DIR/<dataset>-<split>).",
            show_default=False,
        ),
    ],
    root: Annotated[
        str | None, typer.Option("--root", help="The dataset's local directory (data.root).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, test or val.")] = "train",
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", min=1, help="Side the images are stored at (default: the dataset's)."
        ),
    ] = None,
    max_count: Annotated[
        int, typer.Option("--max-count", min=1, help="Most samples per shard.")
    ] = 10_000,
    max_size: Annotated[
        str,
        typer.Option("--max-size", help="Most bytes per shard, e.g. 1GB, 500MB, 2GiB or 1e9."),
    ] = "1GB",
    shuffle: Annotated[
        bool | None,
        typer.Option(
            "--shuffle/--no-shuffle",
            help="Write the samples in a seeded random order (default: on for the train split, "
            "whose folders are sorted by class).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffle.")] = 0,
    image_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="png (8-bit, lossless for 8-bit sources), jpeg (quality 95) or npy (float32, "
            "bit-exact).",
        ),
    ] = "png",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Dataset option KEY=VALUE (data.options); repeatable."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Processes decoding and encoding images.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace shards written with other settings.")
    ] = False,
) -> None:
    """Write a dataset as webdataset tar shards plus a manifest, for the webdataset dataset.

    Each sample is the image (PNG by default) and its class label, exactly as the dataset
    delivers it without augmentation. Running the same command again after an interruption
    resumes after the last finished shard.

    Examples:

      dmae shard imagefolder --root /data/imagenet --out /shards/in1k-train --workers 8

      dmae shard imagefolder --root /data/imagenet --split val --out /shards/in1k-val

      dmae shard digits --out shards/digits-train --max-count 200

    Then train with --set data.dataset=webdataset --set data.root=/shards
    """
    from dmae_cli.data.shard import ShardConfig, parse_options, parse_size, run_shard, summary

    cfg = ShardConfig(
        dataset=dataset,
        out=out,
        root=root,
        split=split,
        image_size=image_size,
        max_count=max_count,
        max_size=parse_size(max_size),
        shuffle=shuffle,
        seed=seed,
        format=image_format,
        options=parse_options(option or []),
        workers=workers,
        overwrite=overwrite,
    )
    for line in summary(run_shard(cfg)):
        ui.info(line)


def _plugin_row(entry: registry.PluginEntry, reg: registry.Registry[Any]) -> dict[str, Any]:
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


def main() -> None:
    app()
