"""The device a command runs on: CUDA when present, else the CPU, or what the recipe names.

A device the machine lacks (`cuda` without a GPU, `cuda:3` with two, `mps` off Apple silicon)
stops the stage before it builds anything, with one line naming the recipe key `device`.
"""

from __future__ import annotations

import torch

from dmae_cli.runtime.errors import UserError

KNOWN = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device: unknown device '{name}'; use {KNOWN}") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device: '{name}' requested but CUDA is not available on this machine; "
                "use auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"device: '{name}' requested but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(
                f"device: '{name}' requested but MPS (Apple silicon) is not available on this "
                "machine; use auto or cpu"
            )
        return device
    raise UserError(f"device: '{name}' is not supported; use {KNOWN}")
