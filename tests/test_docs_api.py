"""docs/api.md cannot drift: its ```python blocks run in order, as a reader would run them,
in a folder holding the `best.pth`, `last.pth` and `digit.png` they name (a tiny digits
classifier, a tiny DMAE and a digits test image)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dmae_cli.config.recipe import load_recipe
from dmae_cli.data.loading import load_dataset
from tests.conftest import save_classifier
from tests.test_denoiser import save_dmae

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_python_block_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = BLOCK.findall(DOCS.read_text())
    assert len(blocks) >= 6
    save_classifier(tmp_path / "best.pth")
    save_dmae(tmp_path / "last.pth")  # a tiny DMAE as `dmae pretrain` writes one
    digit = load_dataset(load_recipe("recipes/digits.yaml"), "test", augment=False)[0][0]
    Image.fromarray((digit[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_api_md"}
    for number, source in enumerate(blocks):
        exec(compile(source, f"{DOCS}:block {number + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "arguments: certify.n: expected a number > 0, got 0" in printed  # as the page says
