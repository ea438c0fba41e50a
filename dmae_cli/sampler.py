"""The hot path of certification: class counts of a classifier on noisy copies of one image.

A certifier asks for `counts(num)` several times per image; each call draws `num` copies of
the image plus N(0, sigma^2 I) noise, generated in fp32 in [0, 1] pixel space at the image's
native resolution directly on the model's device (the model's `InputAdapter` then resizes and
normalises), forwards them in batches (bf16 autocast under `precision: auto` on CUDA and on a
CPU with native bf16 arithmetic, see `dmae_cli.precision`), and votes with argmax. Predictions are
written into one preallocated device tensor and counted by a single `bincount` at the end, so
the batches run back to back with no host synchronisation between them (CUDA's `bincount`
synchronises to size its output: once per call, together with the copy of the counts to the
host, instead of once per batch). Inputs stay in the default NCHW layout: channels-last buys a
ViT nothing, its only convolution is the patch embedding.

Every example draws its noise from its own stream (`NoiseStream`): a generator seeded from
(seed, example index), called for `NOISE_CHUNK` copies at a time, the unused rest of a call
kept for the next request. So noisy copy number i of an example is the same whatever came
before it (other examples, another process's share of the work, a resume) and however the
copies are asked for: the batch size, the sizes of a certifier's requests, the packing of
several examples into one forward pass (`dmae_cli.interleave`) and the out-of-memory back-off
(which halves the copies per forward pass, `forward_size`) leave the noise unchanged. Two
certifiers run with one seed therefore see the same noise, copy for copy: a sequential
certifier's votes are a prefix of `cohen`'s, which makes their comparison a paired one.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
import torch.nn as nn

from dmae_cli import distributed, ui
from dmae_cli.api import CountsFn
from dmae_cli.errors import UserError
from dmae_cli.precision import autocast, autocast_dtype, precision_name

# Recent torch names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class.
OUT_OF_MEMORY: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Fixed, not probed: CPU throughput levels off at small batches (not measured beyond the
# digits model). The batch size no longer changes the noise (`NoiseStream`).
AUTO_CPU_BATCH = 256
AUTO_CUDA_MAX = 4096  # a cap on probing: a busy GPU gains nothing from larger batches
# Copies per generator call: large enough that a call costs little next to a forward pass,
# small enough that the rest kept per example (8 examples interleaved) is a small buffer.
NOISE_CHUNK = 64


def example_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for example `index` of a run seeded with `seed`.

    Hashed rather than `seed + index` so that runs with neighbouring seeds do not share noise.
    """
    digest = hashlib.sha256(f"dmae-certify/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(example_seed(seed, index))


class NoiseStream:
    """The standard normal noise of one example: copy i is the same however it is asked for.

    The generator is called for `NOISE_CHUNK` copies of `shape` at a time, and what a request
    leaves of a call serves the next, so the stream of copies does not depend on the sizes of
    the requests (see the module docstring).
    """

    def __init__(self, generator: torch.Generator, shape: tuple[int, ...]) -> None:
        self.generator = generator
        self.shape = shape
        self.left = torch.empty((0, *shape), device=generator.device)

    def take(self, size: int) -> torch.Tensor:
        """The next `size` copies, (size, *shape), in fp32 on the generator's device."""
        parts = []
        while size > 0:
            if not len(self.left):
                self.left = torch.randn(
                    (NOISE_CHUNK, *self.shape), generator=self.generator, device=self.left.device
                )
            part, self.left = self.left[:size], self.left[size:]
            parts.append(part)
            size -= len(part)
        if not parts:
            return self.left[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# -- batch size -------------------------------------------------------------------------------
def is_auto_batch(setting: Any) -> bool:
    """`certify.batch_size: auto` (or 0)."""
    return setting == "auto" or setting == 0


def auto_batch_size(
    model: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype | None,
    most: int,
) -> int:
    """The batch size `certify.batch_size: auto` picks for images of `shape` (C, H, W).

    A CPU gets AUTO_CPU_BATCH. A GPU gets the largest power of two, up to AUTO_CUDA_MAX and the
    first power of two >= `most` (no call draws more), whose forward pass fits in the memory
    free now: tried on the eager model, halving on every out-of-memory error.
    """
    if device.type != "cuda":
        return AUTO_CPU_BATCH
    size = min(AUTO_CUDA_MAX, 1 << max(0, most - 1).bit_length())
    while size >= 1:
        if _forward_fits(model, (size, *shape), device, dtype):
            return size
        size //= 2
    raise UserError(f"out of memory on {device} with a single image; free memory on the device")


def _forward_fits(
    model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None
) -> bool:
    try:
        with torch.inference_mode(), autocast(dtype, device):
            model(torch.rand(shape, device=device))
        return True
    except OUT_OF_MEMORY:
        pass  # leaving the handler releases the failed attempt's tensors
    torch.cuda.empty_cache()
    return False


# -- the sampler ------------------------------------------------------------------------------
class Sampler:
    """Counts the votes of `model` on noisy copies of an image, `batch_size` copies at a time.

    Copies are made `batch_size` at a time and forwarded `forward_size` at a time (equal,
    until the device runs out of memory); their noise comes from each example's
    `NoiseStream`. `compile=True` runs the model through `torch.compile`; call `warm_up`
    first so that compiling happens, or fails, up front.
    `drawn` counts every noisy copy classified so far (for throughput displays).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        if sigma <= 0 or batch_size < 1 or num_classes < 1:
            raise ValueError(
                f"sampler: need sigma > 0, batch_size >= 1 and num_classes >= 1, got "
                f"{sigma}, {batch_size} and {num_classes}"
            )
        self.model = model.eval()
        self.sigma = float(sigma)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.forward_size = batch_size
        self.device = torch.device(device)
        self.amp = autocast_dtype(precision, self.device)
        self.compiled = compile
        # A dynamic batch dimension: one compilation serves the n0 copies of the selection,
        # the full batches and every call's last, partial one. Padding to one static shape
        # would classify up to a whole batch of padding per call (n0 = 100 in a batch of 1000
        # is ten times the work), and a static shape per size would compile once per size.
        self.forward: Any = torch.compile(self.model, dynamic=True) if compile else self.model
        self.compile_seconds = 0.0
        self.drawn = 0

    @property
    def precision(self) -> str:
        """The resolved precision, "bf16" or "fp32" (what the certification header records)."""
        return precision_name(self.amp)

    def counts(self, image: torch.Tensor, generator: torch.Generator) -> CountsFn:
        """The `counts(num)` function of one (C, H, W) image in [0, 1], for a certifier."""
        clean = image.to(self.device, torch.float32).unsqueeze(0)
        stream = NoiseStream(generator, tuple(clean.shape[1:]))
        return lambda num: self._count(clean, num, stream)

    def warm_up(self, image: torch.Tensor) -> None:
        """Classify one batch of noisy copies of `image` and forget it: compiles the model.

        A compiler that cannot work here (no C++ compiler for the CPU, no Triton for CUDA)
        becomes one line, while the model itself still runs eagerly; a model that fails
        eagerly too keeps its own error.
        """
        drawn, tick = self.drawn, time.perf_counter()
        try:
            self.counts(image, torch.Generator(device=self.device).manual_seed(0))(self.batch_size)
        except (UserError, OUT_OF_MEMORY):
            raise
        except Exception as exc:
            if not self.compiled:
                raise
            self._raise_compile_failure(image, exc)
        finally:
            self.drawn = drawn
        self.compile_seconds = time.perf_counter() - tick if self.compiled else 0.0

    def _raise_compile_failure(self, image: torch.Tensor, exc: Exception) -> None:
        with torch.inference_mode(), autocast(self.amp, self.device):
            self.model(image.to(self.device, torch.float32).unsqueeze(0))  # eager: a model bug?
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        need = "Triton for CUDA" if self.device.type == "cuda" else "a C++ compiler, e.g. g++"
        raise UserError(
            f"--compile: torch.compile cannot compile the classifier on {self.device} "
            f"({lines[0]}); it needs {need}: install it, or certify without --compile"
        ) from exc

    @torch.inference_mode()
    def _count(self, clean: torch.Tensor, num: int, stream: NoiseStream) -> torch.Tensor:
        votes = torch.empty(num, dtype=torch.int64, device=self.device)
        for start in range(0, num, self.batch_size):
            size = min(self.batch_size, num - start)
            votes[start : start + size] = self.classify(self.noisy(clean, size, stream))
        self.drawn += num
        return torch.bincount(votes, minlength=self.num_classes).cpu()

    def noisy(self, clean: torch.Tensor, size: int, stream: NoiseStream) -> torch.Tensor:
        """The next `size` copies of `clean` (1, C, H, W) plus sigma times `stream`, in fp32."""
        return stream.take(size).mul(self.sigma).add_(clean)

    @torch.inference_mode()
    def classify(self, noisy: torch.Tensor) -> torch.Tensor:
        """The model's votes on `noisy`, `forward_size` copies per forward pass.

        Out of memory, the same copies are classified again in halves, so the votes are those
        of a run that never ran out of memory.
        """
        while True:
            try:
                return self._try_classify(noisy)
            except OUT_OF_MEMORY:
                pass  # leaving the handler releases the failed attempt's tensors
            self._back_off()

    def _try_classify(self, noisy: torch.Tensor) -> torch.Tensor:
        votes = torch.empty(len(noisy), dtype=torch.int64, device=self.device)
        for start in range(0, len(noisy), self.forward_size):
            stop = min(start + self.forward_size, len(noisy))
            chunk = noisy[start:stop]
            if self.compiled and len(chunk) == 1:
                # torch.compile specialises a batch of one: doubling the row costs less than
                # compiling again mid-run, and only the first vote is kept.
                chunk = chunk.repeat(2, 1, 1, 1)
            with autocast(self.amp, self.device):
                logits = self.forward(chunk)
            votes[start:stop] = logits[: stop - start].argmax(dim=1)
        return votes

    def _back_off(self) -> None:
        """Halve the copies per forward pass after an out-of-memory error; below 1, stop."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.forward_size == 1:
            raise UserError(
                f"out of memory on {self.device} with one noisy copy per forward pass (and "
                f"{self.batch_size} drawn at a time); free memory on the device or lower "
                f"--batch-size"
            )
        old, self.forward_size = self.forward_size, self.forward_size // 2
        where = f"rank {distributed.rank()}: " if distributed.is_distributed() else ""
        ui.console.print(
            f"[yellow]warning:[/] {where}out of memory on {self.device} at {old} noisy copies "
            f"per forward pass; continuing with {self.forward_size} (the same noise, the same "
            f"counts)",
            highlight=False,
            soft_wrap=True,
        )
