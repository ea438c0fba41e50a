"""A third-party plugin package (tests/plugin_pkgs/acme-dmae-plugins), written only against
`dmae_cli.api`, driven through every stage; and its broken plugins, each ending in one line
that names it while dmae's own plugins keep working.

The package is registered without `pip install`: a throw-away `.dist-info` carrying the entry
points of its pyproject.toml, on a temporary sys.path entry beside the package's folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.plugins import registry
from tests.conftest import one_line_error

tomllib = pytest.importorskip("tomllib")

PACKAGE = Path(__file__).parent / "plugin_pkgs" / "acme-dmae-plugins"
DIST = "acme-dmae-plugins"
runner = CliRunner()

# Every stage shrunk to seconds: blobs of 8x8 pixels, a 2-block width-32 ViT, one epoch.
TINY = [
    "data.dataset=blobs",
    "data.image_size=8",
    "model.backbone=vit_pico",
    "model.image_size=8",
    "model.patch_size=4",
    "model.options={}",
    "pretrain.epochs=1",
    "pretrain.batch_size=16",
    "pretrain.warmup_epochs=0",
    "pretrain.decoder_embed_dim=32",
    "pretrain.decoder_depth=1",
    "pretrain.decoder_num_heads=2",
    "pretrain.reconstructions=0",
    "finetune.sigma=[0.25]",
    "finetune.epochs=1",
    "finetune.batch_size=16",
    "finetune.warmup_epochs=0",
    "finetune.eval_every=1",
    "finetune.eval_noise_copies=1",
    "certify.sigma=[0.25]",
    "certify.n0=4",
    "certify.n=16",
    "certify.batch_size=16",
    "certify.max_examples=3",
]


def refresh_all() -> None:
    for reg in registry.REGISTRIES.values():
        reg.refresh()


def write_dist_info(where: Path, pyproject: Path) -> None:
    """A .dist-info for the package at `pyproject`: its name, version, summary, entry points."""
    project = tomllib.loads(pyproject.read_text())["project"]
    info = where / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        f"Summary: {project['description']}\n"
    )
    groups = project["entry-points"]
    text = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
        for group, entries in groups.items()
    )
    (info / "entry_points.txt").write_text(text)


def forget_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "acme_dmae_plugins"]:
        del sys.modules[name]


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The acme package registered (not installed) for this test; the runs directory."""
    write_dist_info(tmp_path / "site", PACKAGE / "pyproject.toml")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PACKAGE))
    monkeypatch.setenv("DMAE_PLUGINS", DIST)
    forget_modules()
    refresh_all()
    yield tmp_path / "runs"
    forget_modules()
    refresh_all()  # monkeypatch undoes sys.path and DMAE_PLUGINS after this; lookups are lazy


def stage(runs: Path, command: str, *args: str) -> object:
    sets = [item for override in [*TINY, f"runs_dir={runs}"] for item in ("--set", override)]
    return runner.invoke(app, [command, "recipes/digits.yaml", *sets, *args])


def test_third_party_dataset_and_backbone_run_every_stage(acme: Path) -> None:
    for command in ("pretrain", "finetune", "certify"):
        result = stage(acme, command)
        assert result.exit_code == 0, f"{command}: {result.output}"
    run = acme / "digits"
    assert (run / "pretrain" / "last.pth").is_file()
    assert (run / "finetune" / "sigma-0.25" / "best.pth").is_file()
    rows = (run / "certify" / "sigma-0.25.tsv").read_text().splitlines()
    assert len(rows) == 4  # the header and three examples
    result = runner.invoke(app, ["report", str(run), "--out", str(acme / "report")])
    assert result.exit_code == 0, result.output
    assert "σ=0.25" in result.stdout
    for certifier, expected in [
        ("raising", "factory() raised RuntimeError: licence file not found"),
        ("buggy", "certifier 'buggy' failed: ZeroDivisionError: division by zero (a bug in"),
    ]:
        out = ["--out", str(acme / certifier), "--certifier", certifier]
        line = one_line_error(stage(acme, "certify", *out))
        assert f"certifier '{certifier}'" in line and expected in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.dataset=idx", "data.root=nowhere"],
            f"dataset 'idx' from {DIST}: data.root nowhere is not a directory",
        ),
        (
            ["data.dataset=blobs_hwc"],
            f"dataset 'blobs_hwc' from {DIST}: an image has shape (8, 8, 1); expected (1, 8, 8)",
        ),
        (
            ["data.dataset=blobs_buggy"],
            f"dataset 'blobs_buggy' from {DIST} failed: KeyError: 'train' (a bug in the plugin",
        ),
        (
            ["data.dataset=blobs_missing"],
            f"dataset 'blobs_missing' from {DIST} failed to load: ModuleNotFoundError: No module "
            "named 'acme_dmae_plugins_native'",
        ),
        (
            ["model.backbone=vit_raising"],
            f"backbone 'vit_raising' from {DIST} failed: RuntimeError: CUDA kernels for "
            "vit_raising are not compiled (a bug in the plugin",
        ),
        (
            ["data.options={size: 0}"],
            f"dataset 'blobs' from {DIST}: blobs: size must be at least 1, not 0",
        ),
        (
            ["data.options={colour: red}"],
            f"dataset 'blobs' from {DIST} rejected its options",
        ),
    ],
    ids=["user-mistake", "hwc-item", "bug", "import-error", "backbone-bug", "option", "unknown"],
)
def test_a_broken_plugin_is_one_line_naming_it(
    acme: Path, overrides: list[str], expected: str
) -> None:
    line = one_line_error(stage(acme, "pretrain", *[x for o in overrides for x in ("--set", o)]))
    assert expected in line


@pytest.mark.parametrize("command", ["finetune", "certify"])
def test_every_stage_contains_the_plugin(acme: Path, command: str) -> None:
    """The same boundary in the stages that build a dataset before a model is found."""
    args = ["--set", "data.dataset=idx", "--set", "data.root=nowhere", "--init", "none"]
    if command == "certify":
        args = args[:4]
    line = one_line_error(stage(acme, command, *args))
    assert line.endswith(f"dataset 'idx' from {DIST}: data.root nowhere is not a directory")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["idx", "--root", "nowhere"],
            "dataset 'idx' from {}: data.root nowhere is not a directory",
        ),
        (["blobs_hwc"], "dataset 'blobs_hwc' from {}: an image has shape (8, 8, 1)"),
    ],
)
def test_dmae_shard_contains_the_plugin(acme: Path, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["shard", *args, "--out", str(acme / "shards" / "x")])
    assert expected.format(DIST) in one_line_error(result)


def test_debug_shows_the_plugins_traceback(acme: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMAE_DEBUG", "1")
    result = stage(acme, "pretrain", "--set", "data.dataset=blobs_buggy")
    assert result.exit_code != 0
    assert isinstance(result.exception.__cause__, KeyError)  # the plugin's own exception


def test_builtins_keep_working_beside_broken_plugins(acme: Path) -> None:
    assert registry.datasets.get("digits") is not None
    line = one_line_error(stage(acme, "pretrain", "--set", "data.dataset=blobs_missing"))
    assert "blobs_missing" in line
    dataset = registry.datasets.get("blobs")("train", root=None, augment=False)
    assert len(dataset) == 64


def test_check_builds_each_dataset_and_names_what_is_wrong(acme: Path) -> None:

    result = runner.invoke(app, ["plugins", "--check", "--json"])
    assert result.exit_code == 1, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["blobs"]["status"] == "ok" and rows["digits"]["status"] == "ok"
    assert rows["idx"]["status"] == "not checked: needs data"  # does not fail the check
    assert rows["idx"]["error"] == "data.root None is not a directory"
    assert rows["blobs_hwc"]["status"] == "failed"
    assert "an image has shape (8, 8, 1); expected (1, 8, 8)" in rows["blobs_hwc"]["error"]
    assert "failed: KeyError: 'train'" in rows["blobs_buggy"]["error"]
    assert rows["blobs_missing"]["error"].startswith("failed to load: ModuleNotFoundError")
    # dmae's own: cifar10 and imagefolder on the tiny data their synthetic_root writes
    assert rows["cifar10"]["status"] == "ok" and rows["imagefolder"]["status"] == "ok"
    assert rows["webdataset"]["status"] == "not checked: needs data"
    assert rows["blobs"]["description"] == "Dark and bright blobs: two classes, no files needed."
    failed = {name for name, r in rows.items() if r["status"] == "failed"}
    assert failed == {"blobs_hwc", "blobs_buggy", "blobs_missing", "raising"}
    assert "factory() raised RuntimeError: licence file not found" in rows["raising"]["error"]
    assert rows["buggy"]["status"] == "ok" and rows["buggy"]["api"] == 2  # fails only when run
    assert "4 plugin(s) failed" in result.stderr


def test_checking_the_first_item_leaves_the_random_generators_alone() -> None:
    """An augmenting dataset draws from the global generators for its first item; the check
    must not shift them, or building a dataset would change what a run trains on (it did:
    the digits pretraining loss moved from 2.0325 to 1.9108 at the same seed)."""
    import random

    import numpy as np
    import torch

    from dmae_cli.plugins.boundary import build_dataset

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    build_dataset("digits", "train", root=None, image_size=8, augment=True, options={})
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
