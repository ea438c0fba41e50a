"""Helpers shared by the benchmark scripts: the naive baseline's pieces, model FLOPs, timing
statistics, the machine line and markdown tables. Not a benchmark itself.

FLOP counts are the matrix products of the model as built (every `nn.Linear`, the patch
embedding's convolution, and attention's two T x T products, 4 * T^2 * D per block), two
FLOPs per multiply-add; layer norms, softmax, GELU and the optimizer are left out, so an
achieved TFLOP/s computed from them is a slight underestimate of the work done.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from dmae_cli.smoothing.sampler import NoiseStream

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (no sparsity)
PEAK_HELP = (
    "device peak in TFLOP/s for the fraction printed (default on CUDA: 989, H100 SXM dense "
    "bf16; H100 PCIe: 756, H200: 989); on CPU no fraction unless given"
)


# -- the naive certification loop (Cohen et al.'s core.py) -------------------------------------
def naive_counts(
    model: nn.Module,
    x: torch.Tensor,
    num: int,
    batch_size: int,
    num_classes: int,
    sigma: float,
    stream: NoiseStream | None = None,
) -> np.ndarray:
    """Cohen et al.'s `Smooth._sample_noise`, in behaviour: fp32, `x.repeat` per batch,
    `randn_like * sigma` from the global RNG, argmax, and the counts accumulated on the host
    batch by batch (`np.bincount` where the original loops over the array in Python: the
    same counts, never slower). With `stream`, the noise is read from it instead of the global
    RNG: an example's `NoiseStream` gives the noise `dmae certify` draws for it, copy for copy."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(int(np.ceil(num / batch_size))):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            if stream is None:
                noise = torch.randn_like(batch, device=x.device) * sigma
            else:
                noise = stream.take(this_batch_size) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts


# -- FLOPs ----------------------------------------------------------------------------------
def linear_flops(module: nn.Module, tokens: int) -> float:
    """2 x in x out per token for every `nn.Linear` inside `module` (itself included)."""
    return float(
        sum(
            2 * tokens * m.in_features * m.out_features
            for m in module.modules()
            if isinstance(m, nn.Linear)
        )
    )


def blocks_flops(blocks: Iterable[nn.Module], tokens: int) -> float:
    """Forward FLOPs of transformer blocks (timm `Block`) on `tokens` tokens each."""
    total = 0.0
    for block in blocks:
        total += linear_flops(block, tokens)
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if isinstance(qkv, nn.Linear):
            total += 4 * tokens * tokens * (qkv.out_features // 3)  # q k^T and attn v
    return total


def patch_embed_flops(patch_embed: nn.Module) -> float:
    """The patch embedding's convolution over every patch of the image."""
    weight = patch_embed.proj.weight  # (D, C, p, p)
    return float(2 * patch_embed.num_patches * weight.numel())


def vit_forward_flops(vit: nn.Module) -> float:
    """One forward pass of a timm `VisionTransformer` classifier on one image."""
    tokens = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1)
    head = linear_flops(vit.head, 1) if isinstance(vit.head, nn.Module) else 0.0
    return patch_embed_flops(vit.patch_embed) + blocks_flops(vit.blocks, tokens) + head


def dmae_train_flops(model: nn.Module, mask_ratio: float) -> float:
    """One DMAE training step per image: the encoder on the cls token plus the visible
    patches, the decoder on all of them; backward counted as twice the forward (3x in all)."""
    encoder = model.encoder
    patches = encoder.patch_embed.num_patches
    visible = 1 + int(patches * (1 - mask_ratio))
    everything = 1 + patches
    forward = (
        patch_embed_flops(encoder.patch_embed)
        + blocks_flops(encoder.blocks, visible)
        + linear_flops(model.decoder_embed, visible)
        + blocks_flops(model.decoder_blocks, everything)
        + linear_flops(model.decoder_pred, everything)
    )
    return 3 * forward


def tflops_line(name: str, per_second: float, flop_each: float, peak: float | None) -> str:
    """`name: X TFLOP/s (Y% of the assumed peak P)` for `per_second` units of `flop_each`."""
    achieved = per_second * flop_each / 1e12
    share = f", {achieved / peak:.1%} of the assumed peak {peak:g} TFLOP/s" if peak else ""
    return f"{name}: {achieved:.3f} TFLOP/s achieved{share}"


def default_peak(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return H100_BF16_DENSE_TFLOPS if device.startswith("cuda") else None


def peak_note(device: str, given: float | None) -> str:
    """Which peak the fractions assume, in words."""
    peak = default_peak(device, given)
    if peak is None:
        return "peak: none assumed on CPU (pass --peak-tflops for a fraction)"
    if given is None:
        return (
            f"peak assumed: {peak:g} TFLOP/s = H100 SXM dense bf16 (--peak-tflops to change; "
            f"fp32 paths are measured against the same number)"
        )
    return f"peak assumed: {peak:g} TFLOP/s (--peak-tflops)"


# -- timing ---------------------------------------------------------------------------------
def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of repeated measurements."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, unit: str = "", digits: int = 1) -> str:
        return (
            f"{self.median:.{digits}f}{unit} (min {self.low:.{digits}f}, "
            f"max {self.high:.{digits}f}, {self.count} runs)"
        )


# -- output ---------------------------------------------------------------------------------
def machine(device: str | torch.device) -> str:
    """One line naming the hardware and software a figure was measured with."""
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    import timm

    return (
        f"{hardware}; torch {torch.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}"
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that ran this script, for pasting next to its results."""
    import shlex
    import sys

    return "python " + " ".join(shlex.quote(a) for a in sys.argv)
