"""Hostile and careless recipes, overrides and output paths end with one line, never a traceback.

Each case was a traceback, a MemoryError or minutes of work before this file: a YAML alias bomb,
thousands of nested brackets, a 47 MB recipe; a device the machine lacks, a patch size that does
not tile the image, a head count that does not split the width, a seed torch refuses, a
100,000-pixel side; a run name that leaves runs/; a sigma whose radii overflow; an --out that
names a file. Every CLI case goes through `one_line_error`: exit code 2, one line on stderr.
Nothing here trains or certifies: every mistake stops before a model is built.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.config import fields
from dmae_cli.config.reading import MAX_RECIPE_BYTES, MAX_VALUES
from dmae_cli.config.recipe import RecipeError, load_recipe, recipe_to_yaml
from dmae_cli.models import spec
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.errors import UserError
from tests.conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
runner = CliRunner()


def cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs": `width**levels` strings from a few hundred bytes of YAML aliases."""
    lines = [f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    for k in range(1, levels):
        lines.append(f"    l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    return "data:\n  options:\n" + "\n".join(lines) + f"\nname: *l{levels - 1}\n"


def flow_bomb(levels: int = 9, width: int = 9) -> str:
    """The same bomb on one line, for `--set`."""
    items = [f"&l0 [{', '.join(['lol'] * width)}]"]
    items += [f"&l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# -- 1. recipe files that would exhaust memory, the stack or the clock ------------------------
RECIPE_FILES = {
    "alias bomb": (alias_bomb(), f"more than {MAX_VALUES:,} values (each use of a YAML alias"),
    "alias cycle": ("data:\n  options: &o {self: *o}\n", "a value that contains it (a cycle)"),
    "3000 nested brackets": ("name: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "100 nested brackets": ("name: " + "[" * 100 + "]" * 100 + "\n", "nested more than 32"),
    "a date that is not one": ("seed: 2024-13-45\n", "malformed YAML: month must be in 1..12"),
    "an int of 5000 digits": ("seed: " + "9" * 5000 + "\n", "malformed YAML: Exceeds the limit"),
    "too large": (
        "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1),
        f"larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few kilobytes",
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_FILES))
def test_hostile_recipe_file_is_one_line(tmp_path: Path, case: str) -> None:
    text, message = RECIPE_FILES[case]
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    line = one_line_error(cli("pretrain", path, "--set", f"runs_dir={tmp_path / 'runs'}"))
    assert f"{path}" in line and message in line, line
    assert len(line) < 400
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "runs").exists()


def test_a_large_value_is_shown_in_a_few_characters(tmp_path: Path) -> None:
    """Messages show a bounded repr: a 50,000-item value costs no memory to name."""
    path = tmp_path / "r.yaml"
    path.write_text("name: [" + ", ".join(["123456789"] * 50_000) + "]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "name: expected a string, got [123456789, 123456789" in text and len(text) < 200


def test_aliases_within_the_bounds_still_work(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("finetune: {sigma: &s [0.25, 0.5]}\ncertify: {sigma: *s}\n")
    recipe = load_recipe(path)
    assert recipe.certify.sigma == recipe.finetune.sigma == (0.25, 0.5)
    assert "0.25" in recipe_to_yaml(recipe)


# -- 2-4. values the recipe now refuses, from --set -----------------------------------------
SETS = {
    "patch size not tiling the image": (
        "model.patch_size=5",
        "model.patch_size: expected a divisor of model.image_size (16), got 5",
    ),
    "patch size larger than the image": (
        "model.patch_size=32",
        "model.patch_size: expected a divisor of model.image_size (16), got 32",
    ),
    "heads not splitting the width": (
        "model.options.num_heads=5",
        "model.options.num_heads: expected a divisor of model.options.embed_dim (96), got 5",
    ),
    "decoder heads not splitting the decoder width": (
        "pretrain.decoder_num_heads=3",
        "pretrain.decoder_num_heads: expected a divisor of pretrain.decoder_embed_dim (64), got 3",
    ),
    "seed beyond 64 bits": (
        "seed=99999999999999999999",
        "seed: expected an integer from 0 to 2**63 - 1 (9223372036854775807), got 9999999999",
    ),
    "negative seed": ("seed=-1", "seed: expected an integer from 0 to 2**63 - 1"),
    "model side of 100000": (
        "model.image_size=100000",
        "model.image_size: expected an integer from 1 to 16384, got 100000",
    ),
    "a grid of 4096 x 4096 patches": (
        "model.image_size=16384",
        "model.patch_size: expected patches of 64 pixels or more (a grid of at most 256 x 256",
    ),
    "data side of 100000": (
        "data.image_size=100000",
        "data.image_size: expected an integer from 1 to 16384, got 100000",
    ),
    "integer beyond int64": (
        "certify.n=100000000000000000000",
        "certify.n: expected an integer below 2**63 in size",
    ),
    "unknown device": ("device=tpu", "device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    "device in capitals": ("device=CUDA", "device: expected auto, cpu, cuda, cuda:N or mps"),
    "name leaving runs/": ("name=../../escaped", "name: expected a plain name (no '/', '\\', '..'"),
    "name with a separator": ("name=a/b", "name: expected a plain name"),
    "name that is ..": ("name=..", "name: expected a plain name"),
    "name too long for a directory": ("name=" + "n" * 300, "at most 255 bytes"),
    "certify sigma whose radii overflow": (
        "certify.sigma=[1.0e+308]",
        "certify.sigma: expected one or more numbers > 0 and <= 10, got (1e+308,)",
    ),
    "finetune sigma above 10": (
        "finetune.sigma=[0.5, 11.0]",
        "finetune.sigma: expected one or more numbers >= 0 and <= 10",
    ),
    "pretrain sigma above 10": (
        "pretrain.sigma=1.0e+308",
        "pretrain.sigma: expected a number > 0 and <= 10, got 1e+308",
    ),
    "infinite sigma": ("certify.sigma=[.inf]", "certify.sigma[0]: expected a finite number"),
    "nan sigma": ("finetune.sigma=.nan", "finetune.sigma[0]: expected a finite number"),
    "infinite float field": ("finetune.mixup=.inf", "finetune.mixup: expected a finite number"),
    "nan float field": ("certify.radii=[0.0, .nan]", "certify.radii[1]: expected a finite number"),
    "alias bomb in --set": ("data.options=" + flow_bomb(), "more than 100,000 values"),
    "deep --set": ("data.options=" + "[" * 3000 + "]" * 3000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(SETS))
def test_hostile_set_is_one_line(tmp_path: Path, case: str) -> None:
    item, message = SETS[case]
    runs = tmp_path / "a" / "b" / "runs"
    short = ["pretrain.epochs=1", "pretrain.reconstructions=0"]  # should the check ever go
    args = [x for s in [f"runs_dir={runs}", *short, item] for x in ("--set", s)]
    line = one_line_error(cli("pretrain", RECIPE, *args))
    assert message in line, line
    assert len(line) < 400
    assert list(tmp_path.rglob("*")) == []  # nothing written, not even outside runs_dir


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigma", "1e308"], "certify.sigma: expected one or more numbers > 0 and <= 10"),
        (["--sigma", "inf"], "certify.sigma[0]: expected a finite number"),
        (["--sigma", "0.5", "--seed", "99999999999999999999"], "seed: expected an integer from 0"),
        (["--sigma", "0.5", "--seed", "-3"], "seed: expected an integer from 0"),
    ],
)
def test_hostile_typed_certify_option_is_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    line = one_line_error(cli("certify", RECIPE, "--set", f"runs_dir={tmp_path}", *args))
    assert message in line, line


def test_hostile_typed_finetune_sigma_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(
        cli("finetune", RECIPE, "--set", f"runs_dir={tmp_path}", "--sigma", "100")
    )
    assert "finetune.sigma: expected one or more numbers >= 0 and <= 10" in line
    assert "got (100.0,)" in line


def test_the_bounds_are_the_model_descriptions() -> None:
    """A recipe accepts no side or grid a checkpoint's description would refuse."""
    assert fields.MAX_SIDE == spec.MAX_SIDE
    assert getattr(spec, "MAX_TOKENS", fields.MAX_TOKENS) == fields.MAX_TOKENS


def test_bounds_still_accept_every_shipped_setting() -> None:
    recipe = load_recipe(
        RECIPE,
        [
            "seed=9223372036854775807",
            "name=digits_v2.final-run",
            "device=cuda:1",
            "certify.sigma=[0.12, 1.0, 10.0]",
            "model.image_size=32",
            "model.patch_size=8",
            "model.options={embed_dim: 96, num_heads: 6}",
        ],
    )
    assert recipe.seed == 2**63 - 1 and recipe.certify.sigma == (0.12, 1.0, 10.0)
    # a seed at the bound still seeds every generator the stages derive from it
    torch.Generator().manual_seed(recipe.seed + 1_000_003 * 8 + 100_000)


# -- the device: named right, but is the machine's? ------------------------------------------
MISSING_DEVICES = [
    pytest.param(
        "mps",
        "device: 'mps' requested but MPS (Apple silicon) is not available",
        marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is here"),
    ),
    pytest.param(
        "cuda",
        "device: 'cuda' requested but CUDA is not available on this machine",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
    ),
    pytest.param("cuda:999", "device: 'cuda:999' requested but"),
]


@pytest.mark.parametrize(("device", "message"), MISSING_DEVICES)
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_missing_device_is_one_line(tmp_path: Path, command: str, device: str, message: str):
    result = cli(command, RECIPE, "--set", f"runs_dir={tmp_path}", "--set", f"device={device}")
    assert message in one_line_error(result)
    assert list(tmp_path.iterdir()) == []  # the run's lock and folders are gone again


def test_resolve_device_refuses_what_dmae_does_not_run_on() -> None:
    with pytest.raises(UserError, match="'meta' is not supported; use auto, cpu"):
        resolve_device("meta")
    assert resolve_device("cpu") == torch.device("cpu")


# -- 5. --out naming a file ----------------------------------------------------------------
OUT_COMMANDS = {
    "pretrain": ["pretrain", RECIPE],
    "finetune": ["finetune", RECIPE],
    "certify": ["certify", RECIPE, "--sigma", "0.5"],
    "report": ["report", "runs/none"],
}


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_out_naming_a_file_is_one_line(tmp_path: Path, command: str) -> None:
    file = tmp_path / "taken.txt"
    file.write_text("not a directory")
    args = [*OUT_COMMANDS[command], "--out", file]
    line = one_line_error(cli(*args))
    assert line.endswith(f"--out {file} is a file; give a directory"), line
    line = one_line_error(cli(*[*OUT_COMMANDS[command], "--out", file / "sub"]))
    assert line.endswith(f"--out {file / 'sub'}: {file} is a file, not a directory"), line
    assert file.read_text() == "not a directory"


def test_shard_out_under_a_file_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "taken.txt"
    file.write_text("not a directory")
    line = one_line_error(cli("shard", "digits", "--out", file / "digits-train"))
    assert str(file) in line and "not a directory" in line, line


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_shard_seed_out_of_range_is_one_line(tmp_path: Path, seed: str) -> None:
    line = one_line_error(cli("shard", "digits", "--out", tmp_path / "d", "--seed", seed))
    assert f"--seed: expected an integer from 0 to 2**63 - 1, got {seed}" in line, line
    assert list(tmp_path.iterdir()) == []


def test_run_directory_blocked_by_a_file_is_one_line(tmp_path: Path) -> None:
    """The default output, runs_dir/<name>/<stage>, with a file in its way."""
    file = tmp_path / "runs"
    file.write_text("not a directory")
    line = one_line_error(cli("pretrain", RECIPE, "--set", f"runs_dir={file}"))
    assert str(file) in line and "not a directory" in line, line


def test_heads_that_do_not_divide_the_backbones_default_width_are_one_line() -> None:
    """The recipe checks num_heads against an embed_dim it is given; without one, the
    backbone's own default width decides, and timm asserts: still one line."""
    from dmae_cli.models.backbone import build_backbone

    with pytest.raises(
        UserError, match=r"backbone 'vit_tiny' from dmae rejected its options .*num_heads"
    ):
        build_backbone("vit_tiny", img_size=16, patch_size=4, in_chans=1, num_heads=5)
