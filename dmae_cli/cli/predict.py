"""`dmae predict`: the smoothed classifier's answer for image files, with `--certify` its radius.

Thin: files are read by `dmae_cli.data.images`, answered by the Python API's `Smoothed`
(`dmae_cli.smoothing.smoothed`), and rendered here as a table, JSON or TSV.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dmae_cli.cli.base import app, user_errors
from dmae_cli.cli.options import recipe_options
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError

if TYPE_CHECKING:
    import torch

    from dmae_cli.api import Certificate
    from dmae_cli.smoothing.smoothed import Smoothed

DEFAULT_N = 1000
DEFAULT_N0 = 100
DEFAULT_ALPHA = 0.001
CHUNK = 64  # files read and answered at a time: a multiple of certify.together's default 8


@dataclass
class Answer:
    """One image's answer: the class (ABSTAIN = -1), and with --certify its certificate."""

    file: Path
    label: int
    certificate: Certificate | None = None


@app.command()
@user_errors
@recipe_options(
    "certify.n", "certify.n0", "certify.alpha", "certify.certifier", "certify.batch_size"
)
def predict(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image files (PNG, JPEG, .npy) or directories of them.", show_default=False
        ),
    ],
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", "-c", help="A classifier from dmae finetune.", show_default=False
        ),
    ],
    typed: dict[str, Any] | None = None,  # --n, --n0, --alpha, --certifier, --batch-size
    denoiser: Annotated[
        Path | None,
        typer.Option(
            "--denoiser",
            help="A DMAE checkpoint (dmae pretrain's, or a tuned denoiser) in front of the "
            "classifier: noise, then the denoiser, then the classifier (denoised smoothing).",
            metavar="PATH",
            show_default=False,
        ),
    ] = None,
    sigma: Annotated[
        float | None,
        typer.Option(
            "--sigma", help="Noise level (default: the checkpoint's).", show_default=False
        ),
    ] = None,
    certify: Annotated[
        bool, typer.Option("--certify", help="Also certify: radius and pA lower bound.")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    as_tsv: Annotated[bool, typer.Option("--tsv", help="Tab-separated rows on stdout.")] = False,
    noise_seed: Annotated[
        int | None,
        typer.Option(
            "--noise-seed",
            help="Draw input k's noise as 'dmae certify --seed SEED' draws example "
            "FIRST+k's, not from the image's pixels (to reproduce a certification).",
            metavar="SEED",
            show_default=False,
        ),
    ] = None,
    first_index: Annotated[int, typer.Option("--first-index", help="FIRST for --noise-seed.")] = 0,
) -> None:
    """The smoothed classifier's prediction for each image, or abstain.

    Cohen et al.'s PREDICT on n noisy copies: the top class, or abstain unless
    it beats the runner-up at level alpha. With --certify, CERTIFY instead: n0
    copies select a class, n fresh ones bound its probability pA from below; the
    radius is sigma * PhiInverse(pA lower bound), or abstain when the bound is
    below 1/2. Defaults: --n 1000, --n0 100, --alpha 0.001, --certifier cohen,
    --batch-size auto (n 1000 caps the pA bound at 0.993, a radius of 2.46
    sigma; the paper takes 10^4 to 10^5).

    Images are converted to the checkpoint's channels (grayscale or RGB) and
    size: resized and centre-cropped as its data set's test images
    (docs/api.md). Each image's noise comes from a generator seeded by its
    pixels, so the same image gives the same answer in every run. A file that
    cannot be read is one line on stderr; the others are still answered, and the
    exit code is 2 at the end.

    Examples:

      dmae predict digit.png --checkpoint runs/digits/finetune/sigma-0.5/best.pth

      dmae predict photos/ -c best.pth --certify --n 10000 --json

      dmae predict a.jpg b.jpg -c best.pth --sigma 0.25 --device cpu --tsv

      dmae predict digit.png -c clean.pth --denoiser pretrain/last.pth --sigma 0.25

    With --denoiser the classifier may be one trained on clean images
    (finetune.sigma 0, or a 'dmae import'ed one): give --sigma, it has none of
    its own.
    """
    from dmae_cli.smoothing.smoothed import Smoothed, load_classifier

    if as_json and as_tsv:
        raise UserError("--json and --tsv: choose one output format")
    if first_index < 0:
        raise UserError(f"--first-index {first_index}: an example index is 0 or more")
    settings = dict(typed or {})
    classifier = load_classifier(checkpoint, device, denoiser=denoiser)
    if sigma is None and classifier.spec.sigma == 0:
        raise UserError(
            f"{checkpoint} is a clean classifier (trained without noise): give the noise level "
            f"to smooth at with --sigma"
        )
    smoothed = Smoothed(classifier, sigma, batch_size=settings.get("certify.batch_size", "auto"))
    noise = Noise(noise_seed, first_index)
    answers, failed = answer_all(smoothed, images, settings, certify, noise)
    report = {
        "checkpoint": str(checkpoint),
        "denoiser": None if denoiser is None else str(denoiser),
        "sigma": smoothed.sigma,
        "certifier": settings.get("certify.certifier", "cohen"),
        "n": settings.get("certify.n", DEFAULT_N),
        "n0": settings.get("certify.n0", DEFAULT_N0) if certify else None,
        "alpha": settings.get("certify.alpha", DEFAULT_ALPHA),
        "noise": "pixels" if noise_seed is None else f"seed {noise_seed} from {first_index}",
    }
    if as_json:
        typer.echo(json.dumps(as_document(report, answers, failed, smoothed), indent=2))
    elif as_tsv:
        typer.echo(as_rows(answers, smoothed, certify), nl=False)
    else:
        show_table(report, answers, smoothed, certify)
    if failed:
        raise typer.Exit(2)


def image_list(paths: list[Path], failed: dict[str, str]) -> list[Path]:
    """The files to answer, directories expanded; an empty directory goes to `failed`."""
    from dmae_cli.data.images import IMAGE_SUFFIXES, image_files

    files: list[Path] = []
    for given in paths:
        found = image_files([given])
        if given.is_dir() and not found:
            failed[str(given)] = f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory"
            problem(f"{given}: {failed[str(given)]}")
        files += found
    return files


def answer_all(
    smoothed: Smoothed, paths: list[Path], settings: dict[str, Any], certify: bool, noise: Noise
) -> tuple[list[Answer], dict[str, str]]:
    """The answers for the readable files, `CHUNK` files read at a time (a directory of
    photographs need not fit in memory), and the problems by file, each also one line on
    stderr as it is met."""
    from dmae_cli.data.images import read_image

    failed: dict[str, str] = {}
    files = image_list(paths, failed)
    spec = smoothed.classifier.spec
    answers: list[Answer] = []
    for start in range(0, len(files), CHUNK):
        pixels: list[torch.Tensor | None] = []
        for path in files[start : start + CHUNK]:
            try:
                pixels.append(read_image(path, spec.channels, spec.input_size))
            except UserError as exc:
                pixels.append(None)
                failed[str(path)] = str(exc).removeprefix(f"{path}: ")
                problem(str(exc))
        chunk = files[start : start + CHUNK]
        answers += answer(smoothed, chunk, pixels, settings, certify, noise.shifted(start))
    return answers, failed


def problem(line: str) -> None:
    ui.console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Noise:
    """--noise-seed and --first-index: None draws each image's noise from its pixels."""

    seed: int | None
    first: int = 0

    def shifted(self, files: int) -> Noise:
        return Noise(self.seed, self.first + files)

    def generators(self, positions: list[int], device: torch.device) -> list[torch.Generator]:
        """The generators `dmae certify --seed SEED` gives examples first + position."""
        from dmae_cli.smoothing.noise import example_generator

        assert self.seed is not None
        return [example_generator(self.seed, self.first + k, device) for k in positions]


def answer(
    smoothed: Smoothed,
    files: list[Path],
    pixels: list[torch.Tensor | None],
    settings: dict[str, Any],
    certify: bool,
    noise: Noise,
) -> list[Answer]:
    """The answers for the readable files of `files`, in order."""
    good = [k for k, x in enumerate(pixels) if x is not None]
    batch = [pixels[k] for k in good]
    device = smoothed.classifier.device
    streams = None if noise.seed is None else noise.generators(good, device)
    n = settings.get("certify.n", DEFAULT_N)
    alpha = settings.get("certify.alpha", DEFAULT_ALPHA)
    certifier = settings.get("certify.certifier", "cohen")
    if certify:
        n0 = settings.get("certify.n0", DEFAULT_N0)
        certs = smoothed.certify(batch, n0, n, alpha, certifier, noise=streams)
        return [Answer(files[k], c.prediction, c) for k, c in zip(good, certs, strict=True)]
    labels = smoothed.predict(batch, n, alpha, certifier=certifier, noise=streams)
    return [Answer(files[k], label) for k, label in zip(good, labels, strict=True)]


def pa_lower(cert: Certificate) -> float | None:
    value = cert.extra.get("pa_lower")
    return float(value) if isinstance(value, int | float) else None


def as_document(
    report: dict[str, Any], answers: list[Answer], failed: dict[str, str], smoothed: Smoothed
) -> dict[str, Any]:
    """The --json output: the settings, one entry per answered image, the failed files."""
    entries = []
    for a in answers:
        entry: dict[str, Any] = {
            "file": str(a.file),
            "label": a.label,
            "prediction": smoothed.classifier.class_name(a.label),
            "abstained": a.label < 0,
        }
        if a.certificate is not None:
            entry["radius"] = a.certificate.radius
            entry["pa_lower"] = pa_lower(a.certificate)
        entries.append(entry)
    errors = [{"file": f, "error": e} for f, e in failed.items()]
    return {**report, "images": entries, "failed": errors}


def cell(text: str) -> str:
    """A TSV cell: tabs, newlines and backslashes escaped, so every row is one line."""
    return text.translate({92: "\\\\", 9: "\\t", 10: "\\n", 13: "\\r"})


def as_rows(answers: list[Answer], smoothed: Smoothed, certify: bool) -> str:
    """The --tsv output: a header line, then file, label (-1: abstain), prediction[, radius,
    pa_lower]."""
    lines = ["file\tlabel\tprediction" + ("\tradius\tpa_lower" if certify else "")]
    for a in answers:
        row = [cell(str(a.file)), str(a.label), cell(smoothed.classifier.class_name(a.label))]
        if a.certificate is not None:
            bound = pa_lower(a.certificate)
            row += [repr(a.certificate.radius), "" if bound is None else repr(bound)]
        lines.append("\t".join(row))
    return "\n".join(lines) + "\n"


def show_table(
    report: dict[str, Any], answers: list[Answer], smoothed: Smoothed, certify: bool
) -> None:
    """A table on stdout. Off a terminal it is as wide as the longest file name needs, in a
    terminal long names fold: a file name is never cut short."""
    table = Table(title=f"smoothed predictions, sigma {report['sigma']:g}")
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    if certify:
        table.add_column("radius", justify="right")
        table.add_column("pA lower", justify="right")
    for a in answers:
        row = [escape(str(a.file)), escape(smoothed.classifier.class_name(a.label))]
        if a.certificate is not None:
            bound = pa_lower(a.certificate)
            row += [f"{a.certificate.radius:.3f}", "-" if bound is None else f"{bound:.4f}"]
        table.add_row(*row)
    console = Console()
    if not sys.stdout.isatty():
        longest = max((len(str(a.file)) for a in answers), default=0)
        console = Console(width=max(console.width, longest + (60 if certify else 40)))
    settings = f"{report['certifier']}: n={report['n']:,}, alpha={report['alpha']:g}"
    if certify:
        settings += f", n0={report['n0']:,}"
    models = report["checkpoint"]
    if report["denoiser"] is not None:
        models = f"{models} behind the denoiser {report['denoiser']}"
    console.print(f"{models}; {settings}", highlight=False, soft_wrap=True)
    console.print(table)
