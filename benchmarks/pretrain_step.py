"""Pre-training step throughput: our training loop against a naive one, same model, same data.

Ours: `dmae_cli.training.trainer.Trainer` built as `dmae pretrain` builds it
(`build_loader`, the DMAE loss, AdamW on `param_groups_weight_decay`, the recipe's
precision): timm's fused SDPA attention, on CUDA bf16 autocast and fused AdamW, one host sync
per `log_every` updates, the progress bar and the per-epoch bookkeeping. Its figure is the
Trainer's own `images_per_s` for the epoch (the checkpoint written after each epoch is not
timed).

Naive: the same DMAE, written like the official MAE/DMAE `engine_pretrain.py` with the speed-ups
removed: fp32, timm attention unfused, for-loop AdamW (`foreach=False`) on the same parameter
groups, and per step a learning-rate update, `loss.item()` with a finiteness check, the gradient
norm as MAE's loss scaler computes it (a Python loop of per-tensor norms) and a device sync.

Both read the same in-memory images through a DataLoader with the same worker settings, run
`--steps` updates per epoch, and are timed epoch by epoch, interleaved (naive, ours, ours,
naive, ...) for `--repeats` epochs each after one untimed warm-up epoch each, so a noisy
neighbour cannot decide the comparison: the medians, the spread and the median of the paired
per-repeat ratios are printed, with a markdown table for benchmarks/RESULTS.md.

    python benchmarks/pretrain_step.py --device cpu
    python benchmarks/pretrain_step.py --device cpu --steps 2 --repeats 2 --batch-size 8  # smoke
    python benchmarks/pretrain_step.py --device cuda --model vit_base_patch16 --img-size 224

`--model vit_base_patch16 --img-size 224` is DMAE-B: patch 16 and, at 224 pixels, the paper's
decoder (512 wide, 8 blocks, 16 heads); mask ratio 0.75. On CUDA the achieved TFLOP/s (model
FLOPs: encoder on the visible tokens, decoder on all, backward = 2 x forward) and the fraction
of `--peak-tflops` are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from _common import (
    PEAK_HELP,
    Spread,
    command_line,
    default_peak,
    dmae_train_flops,
    machine,
    markdown_table,
    peak_note,
    sync,
    tflops_line,
)
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, Dataset, RandomSampler

from dmae_cli.config.recipe import DataConfig, PretrainConfig
from dmae_cli.data.loading import build_loader
from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.dmae import DMAE
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.training.pretrain import dmae_loss
from dmae_cli.training.trainer import Trainer

UNIQUE_IMAGES = 512  # distinct random images; an epoch cycles through them
LR = 1.5e-4


class Images(Dataset):
    """`length` (image, label) pairs cycling over `UNIQUE_IMAGES` random images in [0, 1]."""

    def __init__(self, length: int, size: int, channels: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(
            min(length, UNIQUE_IMAGES), channels, size, size, generator=generator
        )
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index % len(self.images)], 0


def build_model(args: argparse.Namespace, fused_attention: bool | None) -> DMAE:
    """The benchmark's DMAE; `fused_attention` None keeps timm's default (SDPA unless the
    environment sets TIMM_FUSED_ATTN=0), which is what `dmae pretrain` runs."""
    torch.manual_seed(0)
    size = args.img_size
    encoder = build_backbone(
        args.model, img_size=size, patch_size=args.patch_size, in_chans=3, **args.encoder_options
    )
    model = DMAE(
        encoder,
        InputAdapter(size, size, [0.5] * 3, [0.25] * 3),
        decoder_embed_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_heads,
    )
    for module in model.modules():
        if hasattr(module, "fused_attn") and fused_attention is not None:
            module.fused_attn = fused_attention  # timm's Attention: SDPA or explicit softmax
    return model.to(args.device)


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        num_workers=args.num_workers,
        pin_memory=args.pin_memory,
        persistent_workers=args.num_workers > 0,
    )


def loss_fn(args: argparse.Namespace) -> Callable[[nn.Module, Any], torch.Tensor]:
    return lambda m, b: dmae_loss(m, b, sigma=args.sigma, mask_ratio=args.mask_ratio)


class Ours:
    """The Trainer of `dmae pretrain`, advanced one epoch per `epoch()` call."""

    name = "ours"

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.model = build_model(args, fused_attention=None)
        cfg = PretrainConfig(
            epochs=args.repeats + 1 + (1 if args.profile else 0),  # + warm-up (+ profile)
            batch_size=args.batch_size,
            lr=LR,
            warmup_epochs=0,
            sigma=args.sigma,
            mask_ratio=args.mask_ratio,
        )
        data = Images(args.steps * args.batch_size, args.img_size, 3)
        self.trainer = Trainer(
            self.model,
            loss_fn(args),
            build_loader(data, data_config(args), args.batch_size, 0),
            cfg,
            run_dir,
            torch.device(args.device),
            precision=args.precision,
            description="ours",
        )
        self.epochs = 0

    def epoch(self) -> float:
        self.trainer.start_epoch = self.epochs  # what `resume` sets; one more epoch per call
        self.epochs += 1
        history = self.trainer.fit(stop_after=self.epochs)
        if len(history) != self.epochs:
            raise RuntimeError(f"the Trainer ran {len(history)} epochs, expected {self.epochs}")
        return float(history[-1]["images_per_s"])

    def describe(self, short: bool = False) -> str:
        precision = "bf16 autocast" if self.trainer.amp_dtype else "fp32"
        optimizer = optimizer_kind(self.trainer.optimizer)
        if short:
            return f"`Trainer` ({precision}, {attention(self.model)}, AdamW {optimizer.split()[0]})"
        return (
            f"Trainer as `dmae pretrain` runs it: {precision}, {attention(self.model)} "
            f"attention, AdamW {optimizer}, a host sync every {self.trainer.log_every} updates"
        )


class Naive:
    """An official-style loop: fp32, unfused attention, for-loop AdamW, a sync every step."""

    name = "naive"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = build_model(args, fused_attention=False)
        self.optimizer = torch.optim.AdamW(
            param_groups_weight_decay(self.model, 0.05), lr=LR, betas=(0.9, 0.95), foreach=False
        )
        data = Images(args.steps * args.batch_size, args.img_size, 3)
        cfg = data_config(args)
        self.loader = DataLoader(
            data,
            sampler=RandomSampler(data, generator=torch.Generator().manual_seed(0)),
            batch_size=args.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory,
            persistent_workers=cfg.persistent_workers,
            drop_last=True,
        )
        self.loss = loss_fn(args)
        self.epochs = 0

    def epoch(self) -> float:
        device, steps = self.args.device, len(self.loader)
        self.model.train()
        seen, start = 0, time.perf_counter()
        for step, (samples, _) in enumerate(self.loader):
            progress = self.epochs + step / steps  # MAE's lr_sched: cosine, per iteration
            lr = LR * 0.5 * (1.0 + math.cos(math.pi * progress / (self.args.repeats + 1)))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            samples = samples.to(device, non_blocking=True)
            loss = self.loss(self.model, (samples, None))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                sys.exit(f"naive: loss is {loss_value}, stopping training")
            loss.backward()
            grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
            torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)  # MAE's scaler
            self.optimizer.step()
            self.optimizer.zero_grad()
            sync(device)
            seen += samples.shape[0]
        sync(device)
        self.epochs += 1
        return seen / (time.perf_counter() - start)

    def describe(self, short: bool = False) -> str:
        if short:
            return f"naive (fp32, {attention(self.model)}, AdamW for-loop, sync every step)"
        return (
            f"official-style loop: fp32, {attention(self.model)} attention, AdamW "
            f"{optimizer_kind(self.optimizer)}, loss.item() + grad norm + sync every step"
        )


def attention(model: nn.Module) -> str:
    fused = {m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    return {frozenset({True}): "fused SDPA", frozenset({False}): "unfused"}.get(
        frozenset(fused), "mixed"
    )


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """Which AdamW implementation torch will actually run for these parameters."""
    fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is None:  # torch's default: foreach only when every parameter is on a GPU
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if all(p.device.type == "cuda" for p in params):
            return "foreach (torch default on CUDA)"
        return "for-loop (foreach=None: torch has no foreach default on CPU)"
    return "for-loop (foreach=False)"


def profile(args: argparse.Namespace, runners: list[Any]) -> None:
    """Top operators by self time over one epoch of each path (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    for runner in runners:
        with torch_profile(activities=activities) as prof:
            runner.epoch()
        print(f"\n## profile: {runner.name} ({runner.describe()}), one epoch\n")
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", "--backbone", default="vit_small", help="a dmae backbone")
    parser.add_argument(
        "--img-size",
        "--image-size",
        type=int,
        default=None,
        help="224 for *_patch* models, else 32",
    )
    parser.add_argument(
        "--encoder-options",
        type=json.loads,
        default={},
        help='backbone overrides as JSON, e.g. \'{"embed_dim": 96, "depth": 4, "num_heads": 3}\'',
    )
    parser.add_argument("--patch-size", type=int, help="16 for *_patch16, 14 for *_patch14, else 4")
    parser.add_argument("--decoder-dim", type=int, help="512 at >= 224 pixels, else 128")
    parser.add_argument("--decoder-depth", type=int, help="8 at >= 224 pixels, else 2")
    parser.add_argument("--decoder-heads", type=int, default=16)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, help="64 on CPU, 256 on CUDA")
    parser.add_argument("--steps", type=int, default=20, help="updates per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per path")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--num-workers", type=int, help="loader workers: 0 on CPU, 8 on CUDA")
    parser.add_argument(
        "--pin-memory", action=argparse.BooleanOptionalAction, default=None, help="on with CUDA"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, help=PEAK_HELP)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="also profile one epoch per path"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.img_size = args.img_size or (224 if "patch" in args.model else 32)
    if args.patch_size is None:
        args.patch_size = next(
            (p for p in (16, 14) if f"patch{p}" in args.model), 16 if args.img_size >= 224 else 4
        )
    paper = args.img_size >= 224
    args.decoder_dim = args.decoder_dim or (512 if paper else 128)
    args.decoder_depth = args.decoder_depth or (8 if paper else 2)
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if cuda else 0)
    args.pin_memory = cuda if args.pin_memory is None else args.pin_memory
    if args.threads:
        torch.set_num_threads(args.threads)

    naive = Naive(args)
    with tempfile.TemporaryDirectory() as tmp:
        ours = Ours(args, Path(tmp))
        naive.epoch()  # warm-up epochs: allocator, kernels, loader workers
        ours.epoch()
        rates: dict[str, list[float]] = {"naive": [], "ours": []}
        for repeat in range(args.repeats):
            order = (naive, ours) if repeat % 2 == 0 else (ours, naive)
            for runner in order:
                rates[runner.name].append(runner.epoch())
                print(
                    f"repeat {repeat + 1}/{args.repeats} {runner.name}: "
                    f"{rates[runner.name][-1]:.1f} images/s",
                    file=sys.stderr,
                )
        if args.profile:
            profile(args, [naive, ours])

    report(args, naive, ours, rates)


def report(
    args: argparse.Namespace, naive: Naive, ours: Ours, rates: dict[str, list[float]]
) -> None:
    base, fast = Spread.of(rates["naive"]), Spread.of(rates["ours"])
    ratios = Spread.of([o / n for o, n in zip(rates["ours"], rates["naive"], strict=True)])
    flop = dmae_train_flops(ours.model, args.mask_ratio)
    peak = default_peak(args.device, args.peak_tflops)
    amp = autocast_dtype(args.precision, torch.device(args.device), training=True)
    params = sum(p.numel() for p in ours.model.parameters())
    print(f"\n{command_line()}\n")
    print(f"machine: {machine(args.device)}")
    options = f" {json.dumps(args.encoder_options)}" if args.encoder_options else ""
    print(
        f"model: DMAE {args.model}{options}, {args.img_size}px, patch {args.patch_size}, decoder "
        f"{args.decoder_dim} x {args.decoder_depth} ({args.decoder_heads} heads), mask "
        f"{args.mask_ratio}, {params / 1e6:.1f}M parameters, {flop / 1e9:.2f} GFLOP per image "
        f"per step"
    )
    print(
        f"batch {args.batch_size}, {args.steps} updates per epoch, {args.repeats} timed epochs "
        f"per path (interleaved) after one warm-up epoch each; loader workers "
        f"{args.num_workers}, pin_memory {args.pin_memory}; ours precision {args.precision} "
        f"({'bf16 autocast' if amp else 'fp32'})"
    )
    print(f"naive: {naive.describe()}")
    print(f"ours:  {ours.describe()}")
    print(f"naive images/s: {base.text()}")
    print(f"ours images/s:  {fast.text()}")
    print(f"ratio ours / naive, paired per repeat: {ratios.text('x', 2)}")
    print(f"ratio of the medians: {fast.median / base.median:.2f}x")
    print(tflops_line("naive", base.median, flop, peak))
    print(tflops_line("ours", fast.median, flop, peak))
    print(peak_note(args.device, args.peak_tflops))
    verdict = "not below" if ratios.median >= 1.0 else "BELOW"
    print(f"ours is {verdict} the naive step (median paired ratio {ratios.median:.2f}x)")
    if args.device.startswith("cuda") and args.model == "vit_base_patch16":
        target = "met" if fast.median >= 3000 else "NOT met"
        print(f"issue #9 target, DMAE-B >= 3,000 images/s per H100: {target}")
    t = "TFLOP/s" + (f" (% of {peak:g})" if peak else "")
    print()
    print(
        markdown_table(
            ["path", "images/s (median)", "min", "max", t],
            [
                [naive.describe(short=True), *_cells(base), _tf(base.median, flop, peak)],
                [ours.describe(short=True), *_cells(fast), _tf(fast.median, flop, peak)],
                ["ratio ours / naive (paired)", *_cells(ratios, "x", 2), ""],
            ],
        )
    )


def _cells(spread: Spread, unit: str = "", digits: int = 1) -> list[str]:
    return [
        f"**{spread.median:.{digits}f}{unit}**" if unit else f"{spread.median:.{digits}f}",
        f"{spread.low:.{digits}f}{unit}",
        f"{spread.high:.{digits}f}{unit}",
    ]


def _tf(rate: float, flop: float, peak: float | None) -> str:
    achieved = rate * flop / 1e12
    return f"{achieved:.3f}" + (f" ({achieved / peak:.1%})" if peak else "")


if __name__ == "__main__":
    main()
