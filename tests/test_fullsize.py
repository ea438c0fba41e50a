"""The paper's full-size models run on a CPU: ViT-B/16 and ViT-L/16 at 224, from the recipes.

Every other test shrinks the model; this one runs recipes/vitb.yaml as written (ViT-B/16, the
8-block 512-wide decoder, mask 0.75, the fine-tuning augmentations: RandAugment, mixup, cutmix,
random erasing, layer decay) through `dmae pretrain` (2 updates), `dmae finetune` (2 updates),
`dmae certify` (2 images, n = 32) and `dmae report`, and recipes/vitl.yaml through one
pre-training update, on a generated ImageNet-style folder (16 RGB 256x256 images, 2 classes).
Only sizes of the run change (epochs, batch, n, the number of images), through `--set`.

Each stage is a child process started as the `dmae` command starts (`python -m dmae_cli`);
its peak resident memory, wall and CPU time are printed (`pytest -s`), for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "device=cpu",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.persistent_workers=false",
    "pretrain.epochs=1",
    "pretrain.accum_iter=1",
]


def imagenet_folder(root: Path, per_class_and_split: int = 4) -> Path:
    """root/{train,val}/{class_a,class_b}/*.png: 16 noisy 256x256 RGB images, 2 classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(("class_a", "class_b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class_and_split):
                base = np.full((256, 256, 3), 60 + 120 * label, dtype=np.int16)
                pixels = np.clip(base + rng.integers(-50, 50, (256, 256, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def dmae(*args: str, sets: list[str]) -> tuple[float, float, float, str]:
    """Run one `dmae` command: (peak RSS in GiB, wall seconds, CPU seconds, output).

    Fails with the command's output."""
    command = [sys.executable, "-m", "dmae_cli", *args] + [x for s in sets for x in ("--set", s)]
    started = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert child.stdout is not None
    with child.stdout:
        output = child.stdout.read()  # to the end: the child has exited or closed its output
    _, status, usage = os.wait4(child.pid, 0)  # reaped here, with its resource usage
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    assert child.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    cpu = usage.ru_utime + usage.ru_stime
    return usage.ru_maxrss / 2**20, seconds, cpu, output  # ru_maxrss: KiB on Linux


@pytest.mark.skipif(sys.platform != "linux", reason="peak memory read from Linux's wait4")
def test_vitb_and_vitl_recipes_run_on_a_cpu(tmp_path: Path) -> None:
    data = imagenet_folder(tmp_path / "imagenet")
    runs = tmp_path / "runs"
    base = [*COMMON, f"data.root={data}", f"runs_dir={runs}"]
    vitb = [
        *base,
        "pretrain.batch_size=4",  # 8 training images: 2 updates
        "finetune.sigma=[0.25]",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.accum_iter=1",
        "certify.sigma=[0.25]",
        "certify.n0=16",
        "certify.n=32",
        "certify.batch_size=16",
        "certify.interval=1",
        "certify.max_examples=2",
    ]
    measured: dict[str, tuple[float, float, float, str]] = {}
    try:
        measured["ViT-B/16 pretrain, 2 updates"] = dmae("pretrain", "recipes/vitb.yaml", sets=vitb)
        measured["ViT-B/16 finetune, 2 updates"] = dmae("finetune", "recipes/vitb.yaml", sets=vitb)
        measured["ViT-B/16 certify, 2 images"] = dmae("certify", "recipes/vitb.yaml", sets=vitb)
        measured["report"] = dmae("report", str(runs / "vitb"), sets=[])
        tsv = (runs / "vitb" / "certify" / "sigma-0.25.tsv").read_text().splitlines()
        assert len(tsv) == 3 and tsv[0].startswith("idx\tlabel\tpredict\tradius")
        assert "σ=0.25" in measured["report"][3]  # the certified-accuracy table
        shutil.rmtree(runs / "vitb")  # 3 GB of checkpoints: gone before ViT-L writes its 4
        vitl = [*base, "pretrain.batch_size=8"]  # 1 update
        measured["ViT-L/16 pretrain, 1 update"] = dmae("pretrain", "recipes/vitl.yaml", sets=vitl)
        metrics = (runs / "vitl" / "pretrain" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1 and '"update": 1' in metrics[0]
    finally:
        shutil.rmtree(runs, ignore_errors=True)  # pytest keeps tmp dirs of recent sessions
    print()
    for stage, (rss, seconds, cpu, _) in measured.items():
        print(f"| {stage} | {rss:.2f} GiB | {seconds:.1f} s | {cpu:.1f} s |")
    wall, cpu = (sum(m[i] for m in measured.values()) for i in (1, 2))
    print(f"| total | | {wall:.1f} s | {cpu:.1f} s |")
