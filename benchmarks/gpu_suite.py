"""The GPU figures in one command: certification sampler, pre-training and fine-tuning steps,
and a torchrun smoke, written as one markdown table to benchmarks/RESULTS-gpu.md.

    python benchmarks/gpu_suite.py                          # on a CUDA machine, < 8 min on an H100
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/suite.md   # the test's smoke

What it measures, all with dmae's own code (no re-implementation of a hot path):

1. the sampler of `dmae certify` (`Sampler`, noise drawn on the device, votes counted there) on
   ViT-B/16 at 224 in bf16 autocast, eager and `torch.compile`d as `certify.compile: true`
   runs it: forward passes/s, TFLOP/s and the fraction of `--peak-tflops` (989: H100 SXM dense
   bf16), and certified images per GPU-hour at n0 = 100 + n = 100,000. For `cohen` that is
   3600 x passes/s / 100,100. `sequential` stops early, so its passes per image are the mean of
   the real `sequential` certifier simulated on 200 inputs whose top-class probability follows
   the digits classifier's fit (benchmarks/certify_samples.py, population digits-like) at
   sigma 0.5, alpha 0.001: a projection for a model of that accuracy, stated as such. Then
   the same sampler with the classifier behind a DMAE-B denoiser (`dmae certify --denoiser`:
   the encoder and the decoder's 8 blocks of width 512 on every patch, then the classifier),
   eager;
2. the DMAE-B pre-training step (`train_step` on the `DMAE` of `dmae pretrain`, AdamW as the
   trainer builds it, bf16 autocast, mask 0.75, the paper's decoder): images/s, TFLOP/s and
   peak memory;
3. one fine-tuning update of the ViT-B/16 classifier at sigma 0.25 with the recipe's objective
   (2 noisy copies, consistency, mixup/cutmix, layer decay): seconds, images/s, peak memory;
4. `torchrun --nproc_per_node 1 -m dmae_cli pretrain` (NCCL on CUDA, gloo on a CPU) on the
   digits recipe for one epoch: the distributed path starts, trains and exits cleanly.

Targets beside the figures: >= 400 certified images/GPU-hour (ViT-B/16, n = 100,000, cohen),
>= 3,000 pre-training images/s (DMAE-B). `--tiny`: toy sizes for a CPU smoke; figures meaningless.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    command_line,
    default_peak,
    dmae_train_flops,
    machine,
    markdown_table,
    sync,
    vit_forward_flops,
)
from certify_samples import POPULATIONS, simulate

from dmae_cli.api import CertifyRequest
from dmae_cli.config.recipe import FinetuneConfig, PretrainConfig
from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.classifier import build_classifier
from dmae_cli.models.denoiser import Denoised, Denoiser
from dmae_cli.models.dmae import DMAE
from dmae_cli.models.spec import ModelSpec
from dmae_cli.plugins import registry
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.smoothing.sampler import Sampler, example_generator
from dmae_cli.training.objective import build_objective
from dmae_cli.training.optim import build_optimizer
from dmae_cli.training.param_groups import optimisation
from dmae_cli.training.pretrain import dmae_loss
from dmae_cli.training.step import train_step

ROOT = Path(__file__).resolve().parents[1]
N0, PROJECT_N, ALPHA = 100, 100_000, 0.001
TARGET_IMAGES_PER_HOUR, TARGET_PRETRAIN_IPS = 400, 3000


@dataclass(frozen=True)
class Size:
    """How big the suite runs: the paper's ViT-B/16 at 224 on a GPU, or a toy (`--tiny`)."""

    backbone: str = "vit_base_patch16"
    options: tuple[tuple[str, int], ...] = ()
    image: int = 224
    patch: int = 16
    classes: int = 1000
    decoder: tuple[int, int, int] = (512, 8, 16)  # width, depth, heads
    sampler_batch: int = 1000
    sampler_images: int = 2
    sampler_n: int = 10_000  # timed passes per image
    pretrain_batch: int = 256
    pretrain_steps: int = 10
    finetune_batch: int = 64
    simulated_inputs: int = 200


TINY = Size(
    backbone="vit_tiny",
    options=(("embed_dim", 32), ("depth", 2), ("num_heads", 2)),
    image=32,
    patch=8,
    classes=10,
    decoder=(32, 1, 2),
    sampler_batch=64,
    sampler_n=128,
    pretrain_batch=8,
    pretrain_steps=2,
    finetune_batch=4,
    simulated_inputs=5,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-gpu.md")
    parser.add_argument("--peak-tflops", type=float, help="device peak (default 989 on CUDA)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile rows")
    return parser.parse_args(argv)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocations, or the process's peak RSS on a CPU
    (which never resets: the largest of everything run so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def classifier(size: Size, device: torch.device, sigma: float, drop_path: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone=size.backbone,
        image_size=size.image,
        patch_size=size.patch,
        input_size=size.image,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        num_classes=size.classes,
        backbone_options=dict(size.options),
        sigma=sigma,
    )
    return build_classifier(spec, drop_path=drop_path).to(device)


def denoised(size: Size, device: torch.device, sigma: float) -> nn.Module:
    """The classifier behind a DMAE-B denoiser (`dmae certify --denoiser`): f(D(x + noise))."""
    model = classifier(size, device, sigma=0.0)  # a clean classifier; `sigma` is certify's
    return Denoised(Denoiser(dmae_model(size, norm_pix_loss=False), size.image), model).to(device)


def sampler_rate(
    size: Size, device: torch.device, precision: str, compile: bool, denoise: bool = False
) -> dict:
    """Forward passes/s of `dmae certify`'s sampler, after a warm-up (and compilation)."""
    model = (denoised if denoise else classifier)(size, device, sigma=0.25).eval()
    sampler = Sampler(
        model,
        sigma=0.25,
        num_classes=size.classes,
        batch_size=size.sampler_batch,
        device=device,
        precision=precision,
        compile=compile,
    )
    images = torch.rand(size.sampler_images, 3, size.image, size.image)
    sampler.warm_up(images[0])
    sync(device)
    tick = time.perf_counter()
    for index, image in enumerate(images):
        sampler.counts(image, example_generator(0, index, device))(size.sampler_n)
    sync(device)
    rate = size.sampler_images * size.sampler_n / (time.perf_counter() - tick)
    return {
        "rate": rate,
        "flop": vit_forward_flops(model.classifier.vit if denoise else model.vit),
        "compile_s": sampler.compile_seconds,
        "precision": sampler.precision,
    }


def sequential_passes(size: Size) -> float:
    """Mean passes per image (n0 included) of the real `sequential` certifier at n = 100,000."""
    radii = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
    request = CertifyRequest(0.5, ALPHA, N0, PROJECT_N, radii)
    population = POPULATIONS["digits-like"](np.random.default_rng(0), size.simulated_inputs)
    return simulate(registry.certifiers.get("sequential")(), population, request, seed=0).samples


def dmae_model(size: Size, norm_pix_loss: bool = True) -> DMAE:
    """DMAE-B (or the toy) with the paper's decoder, as `dmae pretrain` builds it."""
    torch.manual_seed(0)
    encoder = build_backbone(
        size.backbone, img_size=size.image, patch_size=size.patch, in_chans=3, **dict(size.options)
    )
    width, depth, heads = size.decoder
    adapter = InputAdapter(size.image, size.image, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return DMAE(
        encoder,
        adapter,
        decoder_embed_dim=width,
        decoder_depth=depth,
        decoder_num_heads=heads,
        norm_pix_loss=norm_pix_loss,
    )


def pretrain_step(size: Size, device: torch.device, precision: str) -> dict:
    """Images/s of the DMAE pre-training update (`train_step`), after 2 warm-up updates."""
    model = dmae_model(size).to(device)
    cfg = PretrainConfig(batch_size=size.pretrain_batch, lr=1.5e-4, warmup_epochs=0)

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return dmae_loss(m, batch, sigma=cfg.sigma, mask_ratio=cfg.mask_ratio)

    batch = (torch.rand(size.pretrain_batch, 3, size.image, size.image), torch.zeros(1))
    seconds = _timed_updates(model, loss, cfg, None, batch, device, precision, size.pretrain_steps)
    return {
        "ips": size.pretrain_batch * size.pretrain_steps / seconds,
        "flop": dmae_train_flops(model, cfg.mask_ratio),
        "memory": peak_memory_gib(device),
    }


def finetune_step(size: Size, device: torch.device, precision: str) -> dict:
    """One fine-tuning update of the classifier with the ViT-B recipe's objective."""
    model = classifier(size, device, sigma=0.25, drop_path=0.1)  # as recipes/vitb.yaml
    cfg = FinetuneConfig(
        batch_size=size.finetune_batch, mixup=0.8, cutmix=1.0, label_smoothing=0.1, lr=5e-4
    )
    groups, make_optimizer = optimisation(model, cfg)
    loss = build_objective(cfg, 0.25, size.classes)
    images = torch.rand(size.finetune_batch, 3, size.image, size.image)
    batch = (images, torch.arange(size.finetune_batch) % size.classes)
    optimizer = build_optimizer(model, cfg, groups, make_optimizer)
    seconds = _timed_updates(model, loss, cfg, optimizer, batch, device, precision, 1)
    return {
        "seconds": seconds,
        "ips": size.finetune_batch / seconds,
        "memory": peak_memory_gib(device),
    }


def _timed_updates(
    model: nn.Module,
    loss: Any,
    cfg: Any,
    optimizer: torch.optim.Optimizer | None,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    precision: str,
    steps: int,
) -> float:
    """Seconds of `steps` timed updates by `train_step`, after 2 untimed ones.

    The batch is put on the device once: the trainer's pinned, non-blocking copies overlap
    with compute, so a copy from the host inside the timing would count what training hides."""
    optimizer = optimizer or build_optimizer(model, cfg)
    batch = (batch[0].to(device), batch[1].to(device))
    amp = autocast_dtype(precision, device, training=True)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(2 + steps):
        if step == 2:
            sync(device)
            tick = time.perf_counter()
        micro = [(batch[0].clone(), batch[1].clone())]  # mixup mixes its batch in place
        train_step(
            model, loss, micro, optimizer, accum=1, clip_grad=None, amp_dtype=amp, device=device
        )
    sync(device)
    return time.perf_counter() - tick


def torchrun_smoke(device: torch.device, tiny: bool) -> dict:
    """`torchrun --nproc_per_node 1 -m dmae_cli pretrain` on the digits recipe, one epoch."""
    with tempfile.TemporaryDirectory(prefix="dmae-suite-") as runs:
        sets = [f"runs_dir={runs}", f"device={device.type}", "pretrain.epochs=1"]
        sets += ["pretrain.reconstructions=0"]
        if tiny:
            sets += ["model.options={embed_dim: 32, depth: 1, num_heads: 2}"]
            sets += ["pretrain.decoder_embed_dim=32", "pretrain.decoder_depth=1"]
            sets += ["pretrain.decoder_num_heads=2", "pretrain.batch_size=256"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", "1", "-m", "dmae_cli", "pretrain", "recipes/digits.yaml"]
        command += [x for s in sets for x in ("--set", s)]
        tick = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ)
        ok = done.returncode == 0 and (Path(runs) / "digits" / "pretrain" / "last.pth").is_file()
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return {"ok": ok, "seconds": time.perf_counter() - tick, "tail": tail}


def sampler_rows(label: str, run: dict, peak: float | None, sequential: float) -> list[list[str]]:
    """The rows of one sampler measurement: rate, TFLOP/s, images per GPU-hour per certifier."""
    achieved = run["rate"] * run["flop"] / 1e12
    cohen = 3600 * run["rate"] / (N0 + PROJECT_N)
    verdict = "met" if cohen >= TARGET_IMAGES_PER_HOUR else "NOT met"
    compiled = f", compiled in {run['compile_s']:.0f} s" if run["compile_s"] else ""
    return [
        [
            f"sampler {label}: forward passes/s ({run['precision']}{compiled})",
            f"{run['rate']:,.0f}",
            "",
        ],
        [f"sampler {label}: TFLOP/s", f"{achieved:.1f}{_share(achieved, peak)}", ""],
        [
            f"sampler {label}: certified images/GPU-hour, n = 100,000, cohen",
            f"{cohen:,.0f}",
            f">= {TARGET_IMAGES_PER_HOUR} ({verdict})",
        ],
        [
            f"sampler {label}: certified images/GPU-hour, n = 100,000, sequential "
            f"({sequential:,.0f} passes/image, simulated)",
            f"{3600 * run['rate'] / sequential:,.0f}",
            "",
        ],
    ]


def _share(achieved: float, peak: float | None) -> str:
    return f" ({achieved / peak:.1%} of {peak:g})" if peak else ""


def measure(args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    """Every measurement, in order; (table rows, notes)."""
    size, device = (TINY if args.tiny else Size()), torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "auto"
    peak = default_peak(args.device, args.peak_tflops)
    sequential = sequential_passes(size)
    rows: list[list[str]] = []
    for label, compile in (("eager", False), ("compile", True)):
        if compile and args.skip_compile:
            continue
        say(f"sampler, {label}")
        rows += sampler_rows(
            label, sampler_rate(size, device, precision, compile), peak, sequential
        )
    say("sampler through a denoiser, eager")
    through = sampler_rate(size, device, precision, compile=False, denoise=True)
    images_per_hour = 3600 * through["rate"] / (N0 + PROJECT_N)
    rows += [
        [
            "sampler eager, classifier behind a DMAE-B denoiser (`--denoiser`): forward passes/s",
            f"{through['rate']:,.0f}",
            "",
        ],
        [
            "sampler eager behind the denoiser: certified images/GPU-hour, n = 100,000, cohen",
            f"{images_per_hour:,.0f}",
            "",
        ],
    ]
    say("pre-training step")
    pre = pretrain_step(size, device, precision)
    achieved = pre["ips"] * pre["flop"] / 1e12
    target = "met" if pre["ips"] >= TARGET_PRETRAIN_IPS else "NOT met"
    rows += [
        [
            f"DMAE pre-training, batch {size.pretrain_batch}: images/s",
            f"{pre['ips']:,.0f}",
            f">= {TARGET_PRETRAIN_IPS:,} ({target})",
        ],
        ["DMAE pre-training: TFLOP/s", f"{achieved:.1f}{_share(achieved, peak)}", ""],
        ["DMAE pre-training: peak memory", f"{pre['memory']:.1f} GiB", ""],
    ]
    say("fine-tuning step")
    fine = finetune_step(size, device, precision)
    rows += [
        [
            f"fine-tuning update, batch {size.finetune_batch} x 2 copies: seconds",
            f"{fine['seconds']:.3f} ({fine['ips']:,.0f} images/s)",
            "",
        ],
        ["fine-tuning: peak memory", f"{fine['memory']:.1f} GiB", ""],
    ]
    say("torchrun smoke")
    smoke = torchrun_smoke(device, args.tiny)
    backend = "nccl" if device.type == "cuda" else "gloo"
    result = "ok" if smoke["ok"] else "FAILED: " + " / ".join(smoke["tail"])
    rows.append(
        [
            f"torchrun, 1 process ({backend}), digits pre-training epoch",
            result,
            f"{smoke['seconds']:.0f} s",
        ]
    )
    notes = [
        f"model: {size.backbone} {dict(size.options) or ''} at {size.image}px, patch "
        f"{size.patch}, {size.classes} classes; precision {precision}"
    ]
    return rows, notes


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here; use --device cpu --tiny", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows, notes = measure(args)
    minutes = (time.perf_counter() - started) / 60
    text = "\n".join(
        [
            "# GPU suite",
            "",
            f"`{command_line()}`, {time.strftime('%Y-%m-%d')}, {minutes:.1f} min in all",
            "",
            f"machine: {machine(args.device)}",
            *notes,
            "",
            markdown_table(["measurement", "value", "target"], rows),
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0 if all("FAILED" not in row[1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
