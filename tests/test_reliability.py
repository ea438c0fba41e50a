"""SIGKILL at random moments loses at most the work since the last checkpoint; nothing corrupt."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dmae_cli.checkpoint import load_checkpoint
from tests.conftest import TINY_OVERRIDES

EPOCHS = 8


def pretrain_command(out: Path) -> list[str]:
    sets = [x for item in [*TINY_OVERRIDES, f"pretrain.epochs={EPOCHS}"] for x in ("--set", item)]
    return [
        sys.executable,
        "-m",
        "dmae_cli",
        "pretrain",
        "recipes/digits.yaml",
        *sets,
        "--out",
        str(out),
    ]


def _epochs_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


ENV = {**os.environ, "DMAE_PLUGINS": "builtin", "OMP_NUM_THREADS": "1"}


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    subprocess.run(pretrain_command(straight), env=ENV, check=True, capture_output=True)

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(pretrain_command(killed), env=ENV, stderr=subprocess.DEVNULL)
        # Kill after a random number of finished epochs plus a random fraction of the next one,
        # so the kill lands mid-epoch or mid-write whatever the machine's speed.
        target = attempt + rng.randint(1, 2)
        while proc.poll() is None and _epochs_done(killed) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (killed / "last.pth").exists():
            state = load_checkpoint(killed / "last.pth")  # never half-written
            assert 0 <= state["epoch"] < EPOCHS
    assert kills >= 1
    subprocess.run(pretrain_command(killed), env=ENV, check=True, capture_output=True)
    assert not list(killed.glob(".*.tmp"))  # a killed write's temporary is cleaned on resume

    a = load_checkpoint(straight / "last.pth")
    b = load_checkpoint(killed / "last.pth")
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS  # metrics of repeated epochs are not duplicated
