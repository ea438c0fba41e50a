"""Certification sampler throughput: our `Sampler` against the official evaluation loop.

Both classify the same noisy copies' worth of work (n forward passes per image, the same
images) with the same randomly initialised classifier built by `build_classifier`.

Ours: `dmae_cli.sampler.Sampler` as `dmae certify` uses it (noise drawn in fp32 on the device
from the per-example generator, scaled and added in place, bf16 autocast when `--precision`
resolves to it, votes kept on the device and counted by one `bincount` per call). `auto` means
bf16 on CUDA and fp32 on CPU; pass `--precision bf16` for bf16 autocast on a CPU that has it.

Naive: Cohen et al.'s `core.py` `_sample_noise`: fp32, and for each batch
`batch = x.repeat((this_batch_size, 1, 1, 1))`, `noise = torch.randn_like(batch) * sigma`,
`predictions = model(batch + noise).argmax(1)`, counts accumulated on the host with
`np.bincount(predictions.cpu().numpy())`, a fresh Python loop per image and no early exit.

    python benchmarks/certify_sampler.py --device cpu --precision bf16
    python benchmarks/certify_sampler.py --device cuda --n 10000 --batch-size 400

On CUDA the defaults become ViT-B/16 at 224; the TFLOP/s printed is an estimate,
2 x parameters x tokens per forward pass (attention's quadratic term ignored).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dmae_cli.models import build_classifier
from dmae_cli.sampler import Sampler, example_generator
from dmae_cli.train import autocast_dtype

SIGMA = 0.5


def build(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    meta: dict[str, Any] = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "input_size": args.image_size,
        "channels": args.channels,
        "mean": [0.5] * args.channels,
        "std": [0.25] * args.channels,
        "num_classes": args.num_classes,
        "sigma": SIGMA,
    }
    return build_classifier(meta).to(args.device).eval()


def images(args: argparse.Namespace) -> torch.Tensor:
    shape = (args.images, args.channels, args.image_size, args.image_size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def naive_counts(
    model: nn.Module, x: torch.Tensor, n: int, batch_size: int, num_classes: int
) -> np.ndarray:
    """Cohen's `_sample_noise`, verbatim in behaviour."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = n
        for _ in range(int(np.ceil(n / batch_size))):
            this_batch_size = min(batch_size, remaining)
            remaining -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch, device=x.device) * SIGMA
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts


def naive(args: argparse.Namespace, model: nn.Module, data: torch.Tensor) -> float:
    def run(n: int) -> None:
        for image in data:  # a fresh Python loop per image, as the official certify.py
            x = image.to(args.device)
            naive_counts(model, x, n, args.batch_size, args.num_classes)

    return forward_passes_per_second(run, args)


def ours(args: argparse.Namespace, model: nn.Module, data: torch.Tensor, precision: str) -> float:
    device = torch.device(args.device)
    sampler = Sampler(
        model,
        sigma=SIGMA,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        device=device,
        precision=precision,
    )

    def run(n: int) -> None:
        for index, image in enumerate(data):
            counts = sampler.counts(image, example_generator(0, index, device))
            counts(n)

    return forward_passes_per_second(run, args)


def forward_passes_per_second(run: Callable[[int], None], args: argparse.Namespace) -> float:
    """Time `run(n)` over every image after a `run(warmup)` that is not counted."""
    run(args.warmup)
    _sync(args.device)
    start = time.perf_counter()
    run(args.n)
    _sync(args.device)
    return args.images * args.n / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", help="vit_small on CPU, vit_base_patch16 on CUDA")
    parser.add_argument("--image-size", type=int, help="32 on CPU, 224 on CUDA")
    parser.add_argument("--patch-size", type=int, help="4 on CPU, 16 on CUDA")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--n", type=int, default=2000, help="noisy forward passes per image")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--warmup", type=int, help="passes per image before timing (1 batch)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="device peak for the fraction printed"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("vit_base_patch16" if cuda else "vit_small")
    args.image_size = args.image_size or (224 if cuda else 32)
    args.patch_size = args.patch_size or (16 if cuda else 4)
    args.warmup = args.warmup or args.batch_size

    model = build(args)
    data = images(args)
    base = naive(args, model, data)
    fast = ours(args, model, data, args.precision)
    amp = autocast_dtype(args.precision, torch.device(args.device))

    params = sum(p.numel() for p in model.parameters())
    tokens = (args.image_size // args.patch_size) ** 2 + 1
    flop = 2 * params * tokens
    threads = "" if cuda else f" threads={torch.get_num_threads()}"
    print(
        f"device={args.device}{threads} torch={torch.__version__} backbone={args.backbone} "
        f"image={args.image_size} patch={args.patch_size} channels={args.channels} "
        f"classes={args.num_classes} params={params / 1e6:.1f}M tokens={tokens}"
    )
    print(
        f"n={args.n} batch={args.batch_size} images={args.images} warmup={args.warmup} "
        f"sigma={SIGMA} precision={args.precision} (ours autocast: {amp or 'none, fp32'})"
    )
    print(f"naive (Cohen core.py, fp32): {base:10.1f} forward passes/s")
    print(f"ours (Sampler):              {fast:10.1f} forward passes/s")
    print(f"ratio:                       {fast / base:10.2f}x")
    est = "estimate, 2 x params x tokens per forward"
    for name, rate in (("naive", base), ("ours", fast)):
        tflops = rate * flop / 1e12
        share = f", {tflops / args.peak_tflops:.1%} of {args.peak_tflops:g}" if cuda else ""
        print(f"{name} TFLOP/s ({est}): {tflops:.3f}{share}")


if __name__ == "__main__":
    main()
