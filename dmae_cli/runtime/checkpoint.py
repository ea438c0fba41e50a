"""Checkpoints: atomic writes, safe loading, and the RNG state that makes resume exact.

Every file is written to a temporary sibling, fsync'ed and renamed, so a crash at any moment
leaves either the previous file or the new one, never half of one. Every checkpoint a user hands
us is loaded with `weights_only=True` (or as safetensors), so a hostile pickle cannot run code.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmae_cli.runtime.errors import UserError


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    f = _RecordsWriteErrors(os.fdopen(fd, "wb"))
    try:
        os.chmod(tmp, _mode_for(path))
        with f.raw:
            write(f)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer reports a failed write (a full disk) as a RuntimeError of its own:
        # the OSError the file raised underneath is what the user needs to hear.
        cause = exc if isinstance(exc, OSError) else f.error
        if cause is not None:
            raise UserError(f"could not write {path}: {cause.strerror or cause}") from exc
        raise
    _fsync_dir(path.parent)
    return path


def _mode_for(path: Path) -> int:
    """The permissions `path` keeps, or those a plain `open` would give a new file: mkstemp's
    0600 would hide checkpoints and results from the colleagues a umask lets read them."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_UMASK


_UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(_UMASK)


class _RecordsWriteErrors:
    """A file whose failed writes are remembered, for callers that wrap the OSError away."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete temporaries of writes that a SIGKILL cut short (never read, only clutter)."""
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The official DMAE/MAE training scripts save their command line (`args`, an argparse
# Namespace) beside the weights. A Namespace only holds attributes: rebuilding one runs no code
# of the file's choosing, and its attributes still pass the weights-only unpickler's checks.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code: `weights_only=True`, or safetensors by suffix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"model": load_file(str(path), device=str(map_location))}
        except Exception as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_GLOBALS):
            # an old-style pickle: the one line below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: {_load_failure(path, exc)}") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _load_failure(path: Path, exc: Exception) -> str:
    """Why torch.load refused the file, in a few words. Never torch's own first line: it advises
    loading with weights_only=False, which is exactly what must not be done with this file."""
    unsafe = _unsafe_globals(path, exc)
    if unsafe:
        return (
            f"refused to load: the file contains objects other than tensors and plain data "
            f"({', '.join(unsafe[:3])}): a pickle that could run code; only weights are accepted"
        )
    reason = _reason(path, exc)
    return f"not a readable checkpoint: cut short, damaged or not a PyTorch file ({reason})"


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The functions and classes a refused pickle would have called, read from its opcodes
    (nothing is run); for a file torch cannot scan, those its error message names."""
    if not isinstance(exc, pickle.UnpicklingError):
        return []
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        return list(scan(path)) if scan is not None else []
    except Exception:  # not a zip checkpoint (an old-style pickle): fall back on the message
        return re.findall(r"\bGLOBAL ([\w.]+)", str(exc), flags=re.IGNORECASE)


def _reason(path: Path, exc: Exception) -> str:
    text = str(exc)
    if path.stat().st_size == 0:
        return "the file is empty"
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip()
        return detail.splitlines()[0] if detail else "not a pickle of weights"
    if isinstance(exc, OSError) or "zip archive" in text:
        return "its zip archive is incomplete or damaged"
    first = text.splitlines()[0] if text else ""
    if not first or "weights_only" in first:
        return "not a pickle of weights"
    return f"{type(exc).__name__}: {first}"


# -- fitting weights to a model ------------------------------------------------------------------
MISMATCH_LIMIT = 4  # keys named per kind of mismatch; the rest are counted
HEAD_SUFFIXES = ("head.weight", "head.bias")


def state_mismatch(
    model: Mapping[str, Any], weights: Mapping[str, Any], *, partial: bool = False
) -> str:
    """What keeps `weights` from loading into a model with state dict `model`, on one line.

    Tensors of another shape come first, with both shapes (another width, patch size or class
    count), then keys the checkpoint lacks and keys the model lacks, unless `partial` (weights
    loaded non-strictly, where missing and extra keys are expected): only shapes then. "" when
    they fit. Only the first few keys of each kind are named: a ViT-L against a ViT-B differs
    in hundreds.
    """
    reshaped = [
        key
        for key, value in weights.items()
        if key in model and torch.is_tensor(value) and value.shape != model[key].shape
    ]
    shapes = [
        f"{key} {_shape(weights[key])} in the checkpoint, {_shape(model[key])} in the model"
        for key in reshaped
    ]
    missing = [] if partial else [key for key in model if key not in weights]
    unexpected = [] if partial else [key for key in weights if key not in model]
    parts = []
    if shapes:
        parts.append(f"{_named(shapes)} differ in shape: {_listed(shapes)}")
    if missing:
        parts.append(f"{_named(missing)} missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        parts.append(f"{_named(unexpected)} not in the model: {_listed(unexpected)}")
    if reshaped and all(key.endswith(HEAD_SUFFIXES) for key in reshaped):
        parts.append("the checkpoint was trained for another number of classes")
    return "; ".join(parts)


def load_exact(model: torch.nn.Module, weights: Mapping[str, Any], source: str, what: str) -> None:
    """Load `weights` into `model`, every key and shape; otherwise one `UserError` line
    "`source`: `what` (the mismatched keys)" instead of torch's multi-line report."""
    problems = state_mismatch(model.state_dict(), weights)
    if problems:
        raise UserError(f"{source}: {what} ({problems})")
    model.load_state_dict(weights)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _named(keys: list[str]) -> str:
    return f"{len(keys)} tensor{'s' if len(keys) != 1 else ''}"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MISMATCH_LIMIT])
    more = len(keys) - MISMATCH_LIMIT
    return shown + (f" and {more} more" if more > 0 else "")


# -- random number generator state --------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG training touches, as tensors and plain data (loadable with weights_only)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved; a `ValueError` saying which part is not such a state
    (`rng_problem`), before any generator is touched."""
    problem = rng_problem(state)
    if problem is not None:
        raise ValueError(problem)
    torch.set_rng_state(state["torch"].cpu())  # checkpoints may be mapped to a GPU
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def rng_problem(state: object, name: str = "rng") -> str | None:
    """Why `state` is not what `rng_state` returns ("rng.numpy.keys: expected ..."), or None."""
    if not isinstance(state, Mapping):
        return f"{name}: expected a mapping of random generator states, got {type(state).__name__}"
    if not _is_bytes(state.get("torch"), torch.get_rng_state().numel()):
        return f"{name}.torch: expected the byte tensor of torch.get_rng_state()"
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list | tuple) or not all(_is_bytes(s) for s in cuda):
        return f"{name}.cuda: expected a list of byte tensors"
    mt, py = state.get("numpy"), state.get("python")
    if not isinstance(mt, Mapping) or not isinstance(py, Mapping):
        return f"{name}.{'numpy' if not isinstance(mt, Mapping) else 'python'}: expected a mapping"
    keys = mt.get("keys")
    if not torch.is_tensor(keys) or keys.dtype != torch.int64 or tuple(keys.shape) != (624,):
        return f"{name}.numpy.keys: expected a tensor of 624 integers"
    if not _is_int(mt.get("pos"), 0, 624) or not _is_int(mt.get("has_gauss"), 0, 1):
        return f"{name}.numpy.pos, numpy.has_gauss: expected integers from 0 to 624, and 0 or 1"
    if not _is_float(mt.get("gauss")) or not (py.get("gauss") is None or _is_float(py["gauss"])):
        return f"{name}.numpy.gauss, python.gauss: expected numbers"
    words = py.get("state")
    if (
        py.get("version") != random.getstate()[0]
        or not isinstance(words, list | tuple)
        or len(words) != 625
        or not all(_is_int(w, 0, 2**32 - 1) for w in words)
        or words[-1] > 624
    ):
        return f"{name}.python: expected the state of random.getstate() (version 3, 625 integers)"
    return None


def _is_bytes(value: object, size: int | None = None) -> bool:
    return (
        torch.is_tensor(value)
        and value.dtype == torch.uint8
        and value.dim() == 1
        and (size is None or value.numel() == size)
    )


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_float(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numpy_state_to_plain(st: tuple) -> dict[str, Any]:
    return {
        "keys": torch.from_numpy(st[1].astype(np.int64)),
        "pos": int(st[2]),
        "has_gauss": int(st[3]),
        "gauss": float(st[4]),
    }


def _numpy_state_from_plain(d: dict[str, Any]) -> tuple:
    keys = d["keys"].cpu().numpy().astype(np.uint32)  # checkpoints may be mapped to a GPU
    return ("MT19937", keys, d["pos"], d["has_gauss"], d["gauss"])


def _python_state_to_plain(st: tuple) -> dict[str, Any]:
    return {"version": st[0], "state": list(st[1]), "gauss": st[2]}


def _python_state_from_plain(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(d["state"]), d["gauss"])
