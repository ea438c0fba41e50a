"""Which arithmetic the models run in: the `precision` recipe key, resolved for a device.

`fp32` is plain fp32. `bf16` is bf16 autocast (matrix products in bf16, master weights, losses
and noise in fp32). `auto` is bf16 autocast on CUDA. On a CPU, `auto` certifies in bf16 when
its bf16 matrix products are native (AVX512-BF16 or AMX: about 1.9x the fp32 sampler on a
ViT-S) and trains in fp32: autocast's casts cost more than they save on small models (the
digits recipe pretrains 1.6x slower in bf16), and only they are trained on CPUs. Pass
`precision: bf16` to train a larger model in bf16 on such a CPU (ViT-S: 1.15x).

For certification a vote is an argmax, which bf16 rarely moves, and the certificate holds for
whichever classifier votes: precision changes which classifier is smoothed, never the validity
of its radius. For training, bf16 autocast is what MAE-style training uses on GPUs.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

# Instruction-set features (torch.cpu.get_capabilities / /proc/cpuinfo names) that make bf16
# matrix products native on x86; without them oneDNN emulates bf16 and fp32 is as fast.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), through oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # recent torch
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(name)) for name in NATIVE_BF16_FEATURES)
    legacy = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # older torch
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if legacy is not None and amx is not None:
        return bool(legacy() or amx())
    return bool(_cpuinfo_flags() & set(NATIVE_BF16_FEATURES))


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def autocast_dtype(
    precision: str, device: torch.device, *, training: bool = False
) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device`; None means fp32 (no autocast)."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if not training and cpu_has_native_bf16() else None


def autocast(dtype: torch.dtype | None, device: torch.device) -> Any:
    """`torch.autocast` to `dtype` on `device`, or nothing when `dtype` is None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else "bf16"
