"""benchmarks/gpu_suite.py, the GPU figures in one command, runs end to end on a CPU.

`--device cpu --tiny` shrinks every model and count; the figures mean nothing, but every
measurement runs through the same code as on CUDA: the sampler of `dmae certify`, the
`sequential` certifier's simulation, the pre-training and fine-tuning updates (`train_step`)
and `torchrun -m dmae_cli pretrain` (gloo here, NCCL on CUDA). torch.compile is skipped: on a
CPU it compiles C++ for minutes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")]


def test_tiny_suite_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS-gpu.md"
    done = subprocess.run(
        [*SUITE, "--device", "cpu", "--tiny", "--skip-compile", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = out.read_text()
    assert table == done.stdout.rstrip("\n") + "\n"
    for row in (
        "| sampler eager: forward passes/s (",
        "| sampler eager: TFLOP/s |",
        "| sampler eager: certified images/GPU-hour, n = 100,000, cohen |",
        "| sampler eager: certified images/GPU-hour, n = 100,000, sequential (",
        "| DMAE pre-training, batch 8: images/s |",
        "| DMAE pre-training: peak memory |",
        "| fine-tuning update, batch 4 x 2 copies: seconds |",
        "| torchrun, 1 process (gloo), digits pre-training epoch | ok |",
    ):
        assert row in table, row
    assert ">= 400 (" in table and ">= 3,000 (" in table  # the targets beside the figures
    assert "sampler compile" not in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the suite runs here: nothing to refuse")
def test_cuda_requested_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*SUITE, "--out", str(tmp_path / "x.md")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA device here; use --device cpu --tiny"
    ]
    assert not (tmp_path / "x.md").exists()
