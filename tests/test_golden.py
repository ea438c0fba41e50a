"""Refactors change nothing: the tiny pipeline reproduces the outputs recorded before them.

`python tools/golden.py check --profile full` does the same on the real digits recipe
(about ten minutes); this test runs the tiny profile (seconds) on every CI run. After a change
that is meant to alter results, re-record with `python tools/golden.py record --profile tiny`
and say why in the commit.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_golden_tool():
    spec = importlib.util.spec_from_file_location("golden", ROOT / "tools" / "golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_pipeline_reproduces_the_recorded_outputs(tmp_path: Path) -> None:
    golden = load_golden_tool()
    expected = json.loads((ROOT / "tests" / "golden" / "tiny.json").read_text())
    if expected[golden.MACHINE] != golden.machine():  # other float kernels, other last bits
        pytest.skip(f"recorded on {expected[golden.MACHINE]}, not on {golden.machine()}")
    actual = golden.run_pipeline("tiny", tmp_path)
    assert golden.differences(expected, actual) == []


def test_the_comparison_sees_a_changed_row_and_a_drifted_loss() -> None:
    golden = load_golden_tool()
    expected = {"c/s.tsv": [["idx", "radius"], ["0", "0.5"]], "m/metrics.jsonl": [{"loss": 1.0}]}
    changed = {"c/s.tsv": [["idx", "radius"], ["0", "0.6"]], "m/metrics.jsonl": [{"loss": 1.01}]}
    found = golden.differences(expected, changed)
    assert len(found) == 2 and "row 1" in found[0] and "loss" in found[1]
    assert golden.differences(expected, expected) == []
