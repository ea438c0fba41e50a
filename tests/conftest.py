"""Shared test setup: only built-in plugins load, and tiny configs for fast runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The suite tests dmae's own plugins; a third-party plugin installed on the machine must not
# change its results. Tests that exercise discovery set DMAE_PLUGINS themselves.
os.environ.setdefault("DMAE_PLUGINS", "builtin")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from dmae_cli.config.recipe import load_recipe  # noqa: E402

TINY_OVERRIDES = [
    "model.options={embed_dim: 32, depth: 2, num_heads: 2}",
    "pretrain.decoder_embed_dim=32",
    "pretrain.decoder_depth=1",
    "pretrain.decoder_num_heads=2",
    "pretrain.reconstructions=0",
]


@pytest.fixture
def tiny_recipe(tmp_path):
    """The digits recipe shrunk to a width-32, depth-2 model writing under tmp_path."""

    def make(*overrides: str):
        return load_recipe(
            "recipes/digits.yaml", [*TINY_OVERRIDES, f"runs_dir={tmp_path}", *overrides]
        )

    return make


def one_line_error(result) -> str:
    """The CLI contract for a user mistake: exit code 2 and exactly one line on stderr."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: a second OpenMP thread costs more in synchronisation than it computes.

    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_classifier_meta(width: int = 32, num_classes: int = 10, sigma: float = 0.5) -> dict:
    """The self-description `dmae finetune` writes, for a tiny (depth 2) 16x16 digits model."""
    from dmae_plugins.datasets.digits import train_statistics

    mean, std = train_statistics(0)
    return {
        "backbone": "vit_tiny",
        "backbone_options": {"embed_dim": width, "depth": 2, "num_heads": 2},
        "image_size": 16,
        "patch_size": 4,
        "input_size": 16,
        "channels": 1,
        "mean": [mean],
        "std": [std],
        "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)],
        "dataset": "digits",
        "data_fingerprint": "",
        "sigma": sigma,
        "stage": "finetune",
    }


def save_classifier(
    path: Path,
    sigma: float = 0.5,
    num_classes: int = 10,
    seed: int = 0,
    width: int = 32,
    **state: object,
) -> Path:
    """A tiny digits classifier saved as `dmae finetune` saves one (plus `state` entries)."""
    from dmae_cli.models.classifier import build_classifier
    from dmae_cli.runtime import checkpoint

    meta = tiny_classifier_meta(width, num_classes, sigma)
    torch.manual_seed(seed)
    model = build_classifier(meta)
    checkpoint.save_checkpoint(path, {"model": model.state_dict(), "meta": meta, **state})
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A random classifier (tmp_path/best.pth) whose head leans to classes 3 and 5: some
    images certify, some not (the Python API's and `dmae predict`'s tests)."""
    path = save_classifier(tmp_path / "best.pth")
    state = torch.load(path, weights_only=True)
    state["model"]["vit.head.bias"][[3, 5]] = torch.tensor([1.0, 0.8])
    torch.save(state, path)
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A runs directory holding a sigma-0.5 model of the digits recipe."""
    save_classifier(tmp_path / "runs" / "digits" / "finetune" / "sigma-0.5" / "best.pth")
    return tmp_path / "runs"


def as_torchrun_rank(rank: int, port: int, world: int = 2) -> None:
    """Make this process rank `rank` of `world` as torchrun would: its environment (the
    built-in plugins only, as the suite) and one torch thread per rank."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        DMAE_PLUGINS="builtin",
    )
    torch.set_num_threads(1)
