"""Certification sampler throughput: our `Sampler` against the official evaluation loop.

Both classify the same noisy copies' worth of work (n forward passes per image, the same
images) with the same randomly initialised classifier built by `build_classifier`.

Ours: `dmae_cli.smoothing.sampler.Sampler` as `dmae certify` uses it (noise drawn in fp32
on the device from the per-example generator, scaled and added in place, bf16 autocast when
`--precision` resolves to it, votes added into class counts on the device as each pass ends,
one copy to the host per call). `--precision auto` resolves as `dmae certify` resolves it
(bf16 on CUDA; the line `ours autocast` says what it chose); pass `--precision bf16` or `fp32`
to fix it.
`--parallel auto` runs as many passes at once as `dmae certify` would (on a CPU one per core,
each on one core; 1 on CUDA).

Naive: Cohen et al.'s `core.py` `_sample_noise`: fp32, and for each batch
`batch = x.repeat((this_batch_size, 1, 1, 1))`, `noise = torch.randn_like(batch) * sigma`,
`predictions = model(batch + noise).argmax(1)`, counts accumulated on the host with
`np.bincount(predictions.cpu().numpy())`, a fresh Python loop per image and no early exit.

With `--repeats R` the two paths are timed R times each, interleaved (naive, ours, ours,
naive, ...), after one untimed warm-up each; the median, min and max are printed.

    python benchmarks/certify_sampler.py --device cpu --precision bf16
    python benchmarks/certify_sampler.py --device cpu --n 200 --batch-size 100 --images 1  # smoke
    python benchmarks/certify_sampler.py --device cuda --model vit_base_patch16 --img-size 224 \\
        --n 10000 --batch-size 1000 --repeats 3

On CUDA the defaults become ViT-B/16 at 224, and it prints the achieved TFLOP/s (model FLOPs:
every linear layer, the patch embedding and attention's T x T products), its fraction of
`--peak-tflops` (default 989, H100 SXM dense bf16), and the projected certified images per
GPU-hour at n = `--project-n` (100,000): 3600 x forward passes per second / (n0 + n).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from _common import (
    PEAK_HELP,
    Spread,
    command_line,
    default_peak,
    machine,
    markdown_table,
    naive_counts,
    peak_note,
    sync,
    tflops_line,
    vit_forward_flops,
)

from dmae_cli.models.classifier import build_classifier
from dmae_cli.models.spec import ModelSpec
from dmae_cli.smoothing.sampler import Sampler, auto_parallel, example_generator

SIGMA = 0.5
Run = Callable[[int], None]  # run(n): n noisy forward passes for every image


def build(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone=args.model,
        image_size=args.img_size,
        patch_size=args.patch_size,
        input_size=args.img_size,
        channels=args.channels,
        mean=(0.5,) * args.channels,
        std=(0.25,) * args.channels,
        num_classes=args.num_classes,
        sigma=SIGMA,
    )
    return build_classifier(spec).to(args.device).eval()


def images(args: argparse.Namespace) -> torch.Tensor:
    shape = (args.images, args.channels, args.img_size, args.img_size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def naive(args: argparse.Namespace, model: nn.Module, data: torch.Tensor) -> Run:
    def run(n: int) -> None:
        for image in data:  # a fresh Python loop per image, as the official certify.py
            x = image.to(args.device)
            naive_counts(model, x, n, args.batch_size, args.num_classes, SIGMA)

    return run


def ours(args: argparse.Namespace, sampler: Sampler, data: torch.Tensor) -> Run:
    def run(n: int) -> None:
        for index, image in enumerate(data):
            counts = sampler.counts(image, example_generator(0, index, sampler.device))
            counts(n)

    return run


def forward_passes_per_second(run: Run, args: argparse.Namespace) -> float:
    """Time `run(n)` over every image."""
    sync(args.device)
    start = time.perf_counter()
    run(args.n)
    sync(args.device)
    return args.images * args.n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", "--backbone", help="vit_small on CPU, vit_base_patch16 on CUDA")
    parser.add_argument("--img-size", "--image-size", type=int, help="32 on CPU, 224 on CUDA")
    parser.add_argument("--patch-size", type=int, help="16 for *_patch16 or at 224, else 4")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--n", type=int, default=2000, help="noisy forward passes per image")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--warmup", type=int, help="passes per image before timing (1 batch)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--n0", type=int, default=100, help="selection passes, for projections")
    parser.add_argument(
        "--project-n", type=int, default=100_000, help="n of the projected images per hour"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--parallel",
        default="auto",
        help="ours: forward passes at once on a CPU, each on one core (auto: as dmae certify)",
    )
    parser.add_argument("--peak-tflops", type=float, help=PEAK_HELP)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("vit_base_patch16" if cuda else "vit_small")
    args.img_size = args.img_size or (224 if cuda or "patch" in args.model else 32)
    if args.patch_size is None:
        args.patch_size = next(
            (p for p in (16, 14) if f"patch{p}" in args.model), 16 if args.img_size >= 224 else 4
        )
    args.warmup = args.warmup or args.batch_size
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    data = images(args)
    device = torch.device(args.device)
    parallel = auto_parallel(device) if args.parallel == "auto" else int(args.parallel)
    sampler = Sampler(
        model,
        sigma=SIGMA,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        device=device,
        precision=args.precision,
        parallel=parallel,
    )
    runs = {"naive": naive(args, model, data), "ours": ours(args, sampler, data)}
    for run in runs.values():
        run(args.warmup)  # untimed: kernels, allocator, oneDNN primitives
    rates: dict[str, list[float]] = {"naive": [], "ours": []}
    for repeat in range(args.repeats):
        for name in ("naive", "ours") if repeat % 2 == 0 else ("ours", "naive"):
            rates[name].append(forward_passes_per_second(runs[name], args))
            print(f"repeat {repeat + 1} {name}: {rates[name][-1]:.1f}/s", file=sys.stderr)
    report(args, model, sampler, rates)


def report(
    args: argparse.Namespace, model: nn.Module, sampler: Sampler, rates: dict[str, list[float]]
) -> None:
    cuda = args.device.startswith("cuda")
    base, fast = Spread.of(rates["naive"]), Spread.of(rates["ours"])
    ratios = Spread.of([o / n for o, n in zip(rates["ours"], rates["naive"], strict=True)])
    amp = getattr(sampler, "amp", None)
    flop = vit_forward_flops(model.vit)
    peak = default_peak(args.device, args.peak_tflops)
    params = sum(p.numel() for p in model.parameters())
    tokens = model.vit.patch_embed.num_patches + model.vit.num_prefix_tokens
    per_image = args.n0 + args.project_n
    hour = "per GPU-hour" if cuda else "per hour"
    print(f"\n{command_line()}\n")
    print(f"machine: {machine(args.device)}")
    print(
        f"model: {args.model}, {args.img_size}px, patch {args.patch_size}, {args.channels} "
        f"channels, {args.num_classes} classes, {params / 1e6:.1f}M parameters, {tokens} "
        f"tokens, {flop / 1e9:.2f} GFLOP per forward pass"
    )
    print(
        f"n={args.n} per image, batch {args.batch_size}, {args.images} images, warm-up "
        f"{args.warmup}, {args.repeats} timed run(s) per path, sigma {SIGMA}; precision "
        f"{args.precision} (ours autocast: {amp or 'none, fp32'}, {sampler.parallel} "
        f"pass(es) at once; naive fp32)"
    )
    unit = "forward passes/s"
    print(f"naive (Cohen core.py, fp32): {base.text(' ' + unit)}")
    print(f"ours (Sampler):              {fast.text(' ' + unit)}")
    print(f"ratio ours / naive:          {ratios.text('x', 2)}")
    for name, rate in (("naive", base.median), ("ours", fast.median)):
        print(tflops_line(name, rate, flop, peak))
        print(
            f"{name}: projected {3600 * rate / per_image:,.1f} certified images {hour} at "
            f"n0 = {args.n0:,} + n = {args.project_n:,} forward passes per image"
        )
    print(peak_note(args.device, args.peak_tflops))
    if cuda and args.model == "vit_base_patch16" and args.img_size == 224:
        target = 3600 * fast.median / per_image >= 400
        print(
            f"issue #9 target, ViT-B/16 at 224, n = 100,000: >= 400 certified images per "
            f"GPU-hour on an H100: {'met' if target else 'NOT met'} (projected)"
        )
    t = "TFLOP/s" + (f" (% of {peak:g})" if peak else "")
    print()
    print(
        markdown_table(
            ["path", unit, t, f"images {hour} at n = {args.project_n:,}"],
            [
                ["naive (Cohen `core.py`, fp32)", *_cells(base.median, flop, peak, per_image)],
                [
                    f"`Sampler`, {'bf16 autocast' if amp else 'fp32'}",
                    *_cells(fast.median, flop, peak, per_image),
                ],
                ["ratio", f"**{ratios.median:.2f}x**", "", ""],
            ],
        )
    )


def _cells(rate: float, flop: float, peak: float | None, per_image: int) -> list[str]:
    achieved = rate * flop / 1e12
    share = f" ({achieved / peak:.1%})" if peak else ""
    return [f"{rate:,.1f}", f"{achieved:.3f}{share}", f"{3600 * rate / per_image:,.1f}"]


if __name__ == "__main__":
    main()
