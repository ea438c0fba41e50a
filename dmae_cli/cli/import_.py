"""`dmae import`: a classifier trained elsewhere, made a self-describing dmae checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from dmae_cli.cli.base import app, user_errors
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError

MAX_NAMES_BYTES = 64 << 20  # a class-name file: one name a line, a million classes at most


@app.command("import")
@user_errors
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            help="The classifier: an official DMAE/MAE fine-tuned checkpoint (.pth), a timm "
            "ViT state dict or a .safetensors file.",
            show_default=False,
        ),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", help="The dmae checkpoint to write.", show_default=False)
    ],
    sigma: Annotated[
        float,
        typer.Option("--sigma", help="The noise level it was fine-tuned for.", show_default=False),
    ],
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean",
            help="Per-channel mean its inputs were normalised with, e.g. 0.485,0.456,0.406 "
            "(the official DMAE's, ImageNet's) or 0.5,0.5,0.5 (timm's augreg ViTs).",
            show_default=False,
        ),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.", show_default=False),
    ] = None,
    backbone: Annotated[
        str,
        typer.Option(
            "--backbone", help="The backbone it was built as (model.backbone; `dmae plugins`)."
        ),
    ] = "vit_base_patch16",
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", help="Check the head's class count.", show_default=False),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="The model's input side (default: its position table's grid x patch size).",
            show_default=False,
        ),
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size",
            help="The data's native side, where noise is added, e.g. 32 for CIFAR-10 resized "
            "to 224 (default: --image-size).",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="The data set plugin it classifies (data.dataset), for `dmae certify "
            "--checkpoint` without a recipe.",
            show_default=False,
        ),
    ] = None,
    class_names: Annotated[
        Path | None,
        typer.Option("--class-names", help="A text file, one class name a line, in label order."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", help="A backbone option, KEY=VALUE (YAML scalar), e.g. num_heads=12."
        ),
    ] = None,
) -> None:
    """Import a classifier trained elsewhere as a dmae checkpoint that certify reads.

    The weights give the ViT's width, depth, patch size, channels, classes,
    prefix tokens and pooling; you give what they do not: the noise level, the
    normalisation and, where it is not ViT-B/16, the backbone. Every tensor must
    fit the model exactly.

    Examples:

      dmae import dmae-ft.pth --out clf.pth --sigma 0.5 --mean .485,.456,.406 --std .229,.224,.225

      dmae import vit.safetensors --out clf.pth --sigma 0.25 --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5

      dmae certify recipes/vitb.yaml --checkpoint clf.pth --sigma 0.5

    A CIFAR-10 model fine-tuned at 224 pixels: add --input-size 32 --dataset
    cifar10 (noise is added at the data's own 32 pixels).
    """
    from dmae_cli.models.foreign import Foreign, import_classifier

    if mean is None or std is None:
        raise UserError(
            "give --mean and --std: the statistics its inputs were normalised with in training "
            "(the official DMAE's are ImageNet's, 0.485,0.456,0.406 and 0.229,0.224,0.225)"
        )
    given = Foreign(
        sigma=sigma,
        mean=numbers(mean, "--mean"),
        std=numbers(std, "--std"),
        backbone=backbone,
        num_classes=num_classes,
        image_size=image_size,
        input_size=input_size,
        class_names=read_names(class_names) if class_names is not None else (),
        dataset=dataset,
        options=backbone_options(option or []),
    )
    written = import_classifier(source, out_file, given)
    ui.info(f"imported {source} -> {written}; certify it with: dmae certify RECIPE --checkpoint "
            f"{written} --sigma {sigma}")  # fmt: skip


def numbers(text: str, flag: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406); one line for anything else."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers, one per channel")
    return values


def read_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise UserError(f"--class-names {path}: not a file")
    if path.stat().st_size > MAX_NAMES_BYTES:
        raise UserError(f"--class-names {path}: larger than {MAX_NAMES_BYTES >> 20} MB")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"--class-names {path}: not UTF-8 text ({exc.reason})") from exc
    return tuple(line.strip() for line in lines if line.strip())


def backbone_options(items: list[str]) -> dict[str, Any]:
    """['num_heads=12', 'qkv_bias=false'] -> {'num_heads': 12, 'qkv_bias': False}."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. num_heads=12")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--option {item!r}: the value is not a YAML scalar") from None
    return options
