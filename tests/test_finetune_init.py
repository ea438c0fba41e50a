"""benchmarks/finetune_init.py compares DMAE's initialisation with fair random-init baselines.

The README once compared DMAE init with a random init fine-tuned under the recipe's layer
decay (0.75, meant for a pre-trained encoder) at one learning rate: a crippled baseline. The
benchmark must run random init with layer decay 1.0 over a learning-rate sweep, and at the
pre-training's compute added as fine-tuning epochs, beside the recipe's row.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_OVERRIDES,
    "pretrain.epochs=3",
    "finetune.epochs=1",
    "finetune.eval_every=1",
    "finetune.batch_size=128",
    "pretrain.batch_size=128",
]


def test_random_init_gets_layer_decay_one_a_sweep_and_equal_compute(tmp_path: Path) -> None:
    sets = [x for override in TINY for x in ("--set", override)]
    command = [sys.executable, "benchmarks/finetune_init.py", "--blr", "1e-3", "4e-3"]
    command += ["--certify-n", "0", "--jobs", "1", "--out", str(tmp_path), *sets]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    by_name: dict[str, list[list[str]]] = {}
    for row in rows[1:]:
        by_name.setdefault(row[0].lstrip("| "), []).append(row)
    assert [r[3] for r in by_name["random init, recipe"]] == ["0.75"]  # the recipe's decay
    sweep = by_name["random init, ld 1.0"]
    assert sorted(r[2] for r in sweep) == ["0.001", "0.004"] and {r[3] for r in sweep} == {"1"}
    [equal] = by_name["random init, equal FLOPs"]
    extra = re.search(r"FLOPs = (\d+) fine-tuning epochs", done.stdout)
    assert extra is not None, done.stdout  # the pre-training's FLOPs, counted as epochs
    assert equal[3] == "1" and int(equal[1]) == 1 + int(extra.group(1))
