"""Shared test setup: only built-in plugins load, and tiny configs for fast runs."""

from __future__ import annotations

import os

import pytest
import torch

# The suite tests dmae's own plugins; a third-party plugin installed on the machine must not
# change its results. Tests that exercise discovery set DMAE_PLUGINS themselves.
os.environ.setdefault("DMAE_PLUGINS", "builtin")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from dmae_cli.recipe import load_recipe  # noqa: E402

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
