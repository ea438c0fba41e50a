"""docs/plugins.md cannot drift: every ```python block in it runs as it stands, and its example
backbone and dataset, registered as plugins, go through pretrain, finetune and certify."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.plugins import registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall(DOCS.read_text())


def block_id(source: str) -> str:
    """The first name a block defines, else its first line: a readable test id."""
    found = re.search(r"^(?:def|class) (\w+)", source, re.MULTILINE)
    return found.group(1) if found else source.splitlines()[0][:40]


def run_block(source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_plugins_md"}
    exec(compile(source, f"{DOCS}:{block_id(source)}", "exec"), namespace)
    return namespace


def defining(name: str) -> dict[str, Any]:
    """The namespace of the one block that defines `name`."""
    [source] = [s for s in python_blocks() if re.search(rf"^(def|class) {name}\b", s, re.M)]
    return run_block(source)


def test_the_page_has_python_blocks() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("source", python_blocks(), ids=block_id)
def test_every_python_block_runs(source: str) -> None:
    run_block(source)


@pytest.fixture
def docs_plugins() -> Iterator[None]:
    """The page's `vit_micro` backbone and `noise_blobs` dataset, registered for one test."""
    registry.backbones.add("vit_micro", defining("vit_micro")["vit_micro"], "dmae-my-plugins")
    registry.datasets.add("noise_blobs", defining("noise_blobs")["noise_blobs"], "dmae-my-plugins")
    yield
    registry.backbones.remove("vit_micro")
    registry.datasets.remove("noise_blobs")


TINY = [
    "data.dataset=noise_blobs",
    "data.image_size=8",
    "data.options={size: 32}",
    "model.backbone=vit_micro",
    "model.image_size=8",
    "model.patch_size=4",
    "model.options={embed_dim: 32, depth: 2, num_heads: 2}",
    "pretrain.epochs=1",
    "pretrain.batch_size=16",
    "pretrain.decoder_embed_dim=32",
    "pretrain.decoder_depth=1",
    "pretrain.decoder_num_heads=2",
    "pretrain.reconstructions=0",
    "finetune.sigma=[0.5]",
    "finetune.epochs=1",
    "finetune.batch_size=16",
    "finetune.eval_noise_copies=1",
    "certify.sigma=[0.5]",
    "certify.n0=4",
    "certify.n=8",
    "certify.max_examples=2",
]


def test_the_example_backbone_and_dataset_run_every_stage(
    docs_plugins: None, tmp_path: Path
) -> None:
    """The page's backbone takes what dmae passes at each stage (num_classes, global_pool and
    drop_path_rate when it builds a classifier), and its dataset passes the item checks."""
    sets = [x for o in [*TINY, f"runs_dir={tmp_path}"] for x in ("--set", o)]
    for command in ("pretrain", "finetune", "certify"):
        result = CliRunner().invoke(app, [command, "recipes/digits.yaml", *sets])
        assert result.exit_code == 0, f"{command}: {result.output}"
    assert (tmp_path / "digits" / "certify" / "sigma-0.5.tsv").is_file()


def test_the_synthetic_root_example_passes_the_check() -> None:
    """`dmae plugins --check` builds the page's `folder_blobs` on what its synthetic_root writes."""
    registry.datasets.add("folder_blobs", defining("folder_blobs")["folder_blobs"], "dmae-my")
    try:
        result = CliRunner().invoke(app, ["plugins", "--check", "--json"])
    finally:
        registry.datasets.remove("folder_blobs")
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "folder_blobs"]
    assert (row["status"], row["error"]) == ("ok", None)
    assert row["description"] == "Blobs saved as tensors in `root`, one file per split."
