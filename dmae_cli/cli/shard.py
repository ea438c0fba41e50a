"""`dmae shard`: write a dataset as webdataset tar shards plus a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmae_cli.cli.base import app, check_output_dir, user_errors
from dmae_cli.config.fields import MAX_SEED
from dmae_cli.runtime import ui
from dmae_cli.runtime.errors import UserError


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
    """Write a dataset as webdataset tar shards and a manifest (dataset webdataset).

    Each sample is the image (PNG by default) and its class label, exactly as
    the dataset delivers it without augmentation. Running the same command again
    after an interruption resumes after the last finished shard.

    Examples:

      dmae shard imagefolder --root /data/imagenet --out /shards/train --workers 8

      dmae shard imagefolder --root /data/imagenet --split val --out /shards/val

      dmae shard digits --out shards/digits-train --max-count 200

    Then train with --set data.dataset=webdataset --set data.root=/shards
    """
    from dmae_cli.data.shard import ShardConfig, parse_options, parse_size, run_shard, summary

    check_output_dir(Path(out).expanduser(), prefix=True)
    if not 0 <= seed <= MAX_SEED:  # numpy refuses a negative seed
        raise UserError(f"--seed: expected an integer from 0 to 2**63 - 1, got {seed}")
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
