"""benchmarks/denoised_smoothing.py runs the four ways of the README's "Certify a classifier you
already have" end to end (tiny models, few examples): the commands a user types, in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_OVERRIDES,
    "pretrain.epochs=2",
    "finetune.epochs=1",
    "finetune.eval_every=1",
    "denoiser.epochs=1",
    "certify.n0=20",
]


def test_the_four_ways_are_certified_on_the_same_examples(tmp_path: Path) -> None:
    sets = [x for override in TINY for x in ("--set", override)]
    command = [sys.executable, "benchmarks/denoised_smoothing.py", "--out", str(tmp_path)]
    command += ["--n", "40", "--max-examples", "6", *sets]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    ways = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert ways[1:5] == [
        "clean classifier alone (not a smoothing model)",
        "clean classifier + DMAE denoiser",
        "clean classifier + tuned DMAE denoiser",
        "classifier fine-tuned with noise (the paper's way)",
    ]
    assert all(row.split(" | ")[1] == "6" for row in rows[1:5])  # the same 6 test images
    for way in ("clean", "clean+denoiser", "clean+tuned", "noise-trained"):
        assert (tmp_path / "ways" / way / "sigma-0.25.tsv").is_file()
    assert (tmp_path / "digits" / "denoiser" / "sigma-0.25" / "best.pth").is_file()
    assert "denoiser over clean alone" in done.stdout
