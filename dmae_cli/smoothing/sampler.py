"""The hot path of certification: class counts of a classifier on noisy copies of one image.

A certifier asks for noisy copies several times per image (API 2: `yield num`, answered by
`dmae_cli.smoothing.drive`, which packs several images' requests into one pass; API 1: this
sampler's `counts(num)`); each request draws `num` copies of the image plus N(0, sigma^2 I)
noise, generated in fp32 in [0, 1] pixel space at the image's native resolution directly on
the model's device (the model's `InputAdapter` then resizes and normalises), forwards them in
batches (bf16 autocast under `precision: auto` on CUDA and on a CPU with native bf16
arithmetic, see `dmae_cli.runtime.precision`), and votes with argmax. The votes of each
forward pass are added to the call's class counts on the device as they arrive (`tally`, a
`scatter_add_` into a tensor of `num_classes` counts), so memory does not grow with the number
of copies a call draws, and the batches run back to back with no host synchronisation between
them (one per call: the copy of the counts to the host). Inputs stay in the default NCHW
layout: channels-last buys a ViT nothing, its only convolution is the patch embedding.

On a CPU, `parallel` forward passes run at once, each on a thread whose torch ops use one core
(`forward_pool`, certification's only threads: a sampler strategy, kept in this module): a
small model's passes are too short for torch to spread one of them over several cores
efficiently (the digits classifier classifies 1.4-1.9x more copies per second as two
single-core passes than as one pass on two cores), and two passes keep both cores busy.

Every example draws its noise from its own stream (`dmae_cli.smoothing.noise.NoiseStream`), so
noisy copy number i of an example is the same however the copies are asked for: the batch
size, the sizes of a certifier's requests, the packing of several examples into one forward
pass and the out-of-memory back-off (which halves the copies per forward pass, `forward_size`)
leave the noise, and so the counts, unchanged.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.api import CountsFn
from dmae_cli.runtime import distributed, ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.precision import autocast, autocast_dtype, precision_name
from dmae_cli.smoothing.noise import NOISE_CHUNK as NOISE_CHUNK
from dmae_cli.smoothing.noise import NoiseStream
from dmae_cli.smoothing.noise import example_generator as example_generator
from dmae_cli.smoothing.noise import example_seed as example_seed

# Recent torch names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class.
OUT_OF_MEMORY: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Fixed, not probed: CPU throughput levels off at small batches (not measured beyond the
# digits model). The batch size no longer changes the noise (`NoiseStream`).
AUTO_CPU_BATCH = 256
AUTO_CUDA_MAX = 4096  # a cap on probing: a busy GPU gains nothing from larger batches


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: CUDA's out-of-memory error, the CPU
    allocator's (a RuntimeError from `DefaultCPUAllocator`), or Python's MemoryError."""
    if isinstance(exc, OUT_OF_MEMORY | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc)


def tally(counts: torch.Tensor, votes: torch.Tensor) -> None:
    """Add `votes` (class indices) to `counts` (one per class), on their device, in place.

    No host synchronisation (CUDA's `bincount` would synchronise to size its output)."""
    counts.scatter_add_(0, votes, torch.ones_like(votes))


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


# -- parallel forward passes on a CPU --------------------------------------------------------
def auto_parallel(device: torch.device, compile: bool = False) -> int:
    """`certify.parallel: auto`: on a CPU one pass per core torch would use; 1 on a GPU, and
    for a compiled model (torch.compile'd passes in several threads at once deadlock)."""
    return torch.get_num_threads() if device.type == "cpu" and not compile else 1


@functools.cache
def forward_pool(size: int) -> ThreadPoolExecutor:
    """`size` threads whose torch ops run on one core each, shared by every sampler.

    `torch.set_num_threads` sets the calling thread's count and the default that every thread
    takes at its first torch op; each pool thread takes it while the default is 1, and the
    caller's count from before is set again afterwards, which restores that default.
    """
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(size, thread_name_prefix="dmae-forward")
    started = threading.Barrier(size + 1)

    def one_core() -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # the thread's first torch call: its count is now fixed at 1
        started.wait()

    for _ in range(size):  # each waits at the barrier, so every one gets its own thread
        pool.submit(one_core)
    started.wait()
    torch.set_num_threads(threads)
    return pool


# -- the sampler ------------------------------------------------------------------------------
class EqualParts(Sequence[int]):
    """`total` cut into `count` parts of equal sizes within one, the larger ones first."""

    def __init__(self, total: int, count: int) -> None:
        self.total, self.count = total, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:  # type: ignore[override]  # no slices
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self.total // self.count + (i % self.count < self.total % self.count)

    def __iter__(self) -> Iterator[int]:
        if self.count:
            size, larger = divmod(self.total, self.count)
            yield from itertools.repeat(size + 1, larger)
            yield from itertools.repeat(size, self.count - larger)


class Sampler:
    """Counts the votes of `model` on noisy copies of an image, `batch_size` copies at a time.

    A call's copies are cut into passes of at most `batch_size` copies, of equal sizes and as
    many as a multiple of `parallel` (`pass_sizes`), and `parallel` passes run at once (CPU
    only, see the module docstring); each pass is forwarded `forward_size` copies at a time
    (`batch_size`, until the device runs out of memory). The noise comes from each example's
    `NoiseStream`. `compile=True` runs the model through `torch.compile`; call `warm_up`
    first so that compiling happens, or fails, up front. `drawn` counts every noisy copy
    classified so far (for throughput displays).
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
        parallel: int = 1,
    ) -> None:
        if sigma <= 0 or batch_size < 1 or num_classes < 1 or parallel < 1:
            raise ValueError(
                f"sampler: need sigma > 0, batch_size >= 1, num_classes >= 1 and parallel >= 1, "
                f"got {sigma}, {batch_size}, {num_classes} and {parallel}"
            )
        if parallel > 1 and torch.device(device).type != "cpu":
            raise UserError(
                f"certify.parallel {parallel}: parallel forward passes are for a CPU; a GPU "
                f"runs one at a time (set certify.parallel to 1 or auto)"
            )
        if parallel > 1 and compile:
            raise UserError(
                f"certify.parallel {parallel}: a compiled classifier runs one pass at a time "
                f"(set certify.parallel to 1 or auto, or certify without --compile)"
            )
        self.model = model.eval()
        self.sigma = float(sigma)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.forward_size = batch_size
        self.parallel = parallel
        self._backing_off = threading.Lock()
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
        """The `counts(num)` function of one (C, H, W) image in [0, 1], for an API-1 certifier."""
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
        except UserError:
            raise
        except Exception as exc:
            if not self.compiled or out_of_memory(exc):
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
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        passes = (self.noisy(clean, size, stream) for size in self.pass_sizes(num))
        self.vote_passes(passes, lambda votes: tally(counts, votes))
        self.drawn += num
        return counts.cpu()

    def pass_sizes(self, total: int) -> EqualParts:
        """How `total` copies are cut into forward passes: at most `batch_size` each, as many
        as a multiple of `parallel` (so that every thread gets a share) but never empty, and
        of equal sizes (within one). Computed as they are read: no list of a billion sizes."""
        count = math.ceil(total / self.batch_size)
        return EqualParts(total, min(math.ceil(count / self.parallel) * self.parallel, total))

    def classify_passes(self, passes: Iterable[torch.Tensor]) -> torch.Tensor:
        """The votes on every pass's copies, in order, in one tensor (see `vote_passes`)."""
        votes: list[torch.Tensor] = []
        self.vote_passes(passes, votes.append)
        if not votes:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return votes[0] if len(votes) == 1 else torch.cat(votes)

    def vote_passes(
        self, passes: Iterable[torch.Tensor], receive: Callable[[torch.Tensor], None]
    ) -> None:
        """Classify every pass and hand its votes to `receive`, in order, as they come.

        `parallel` passes run at a time. `passes` is consumed lazily and each pass's votes are
        dropped once received: at most two passes per thread exist at once, so a long call
        holds neither all its noise nor all its votes in memory.
        """
        if self.parallel == 1:
            for noisy in passes:
                receive(self.classify(noisy))
            return
        pool = forward_pool(self.parallel)
        running: deque[Future[torch.Tensor]] = deque()
        threads = torch.get_num_threads()
        # This thread makes the noise meanwhile: on one core, or the threads torch keeps
        # waiting for its next parallel op would spin on the cores the passes run on.
        torch.set_num_threads(1)
        try:
            for noisy in passes:
                if len(running) == 2 * self.parallel:
                    receive(running.popleft().result())
                running.append(pool.submit(self.classify, noisy))
            while running:
                receive(running.popleft().result())
        except BaseException:
            for future in running:  # passes not started yet (the running ones just finish)
                future.cancel()
            raise
        finally:
            torch.set_num_threads(threads)

    def noisy(self, clean: torch.Tensor, size: int, stream: NoiseStream) -> torch.Tensor:
        """The next `size` copies of `clean` (1, C, H, W) plus sigma times `stream`, in fp32.

        Drawing them failing to allocate is one line: the copies of a pass are drawn at once.
        """
        try:
            return stream.take(size).mul(self.sigma).add_(clean)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
        raise UserError(  # out of the handler: the failed attempt's memory is released
            f"out of memory on {self.device} drawing {size} noisy copies of a "
            f"{'x'.join(map(str, clean.shape[1:]))} image at once; lower --batch-size"
        )

    @torch.inference_mode()
    def classify(self, noisy: torch.Tensor) -> torch.Tensor:
        """The model's votes on `noisy`, `forward_size` copies per forward pass.

        Out of memory (on a GPU, or an allocation the CPU refused), the same copies are
        classified again in halves, so the votes are those of a run that never ran out of
        memory.
        """
        while True:
            size = self.forward_size
            try:
                return self._try_classify(noisy, size)
            except Exception as exc:
                if not out_of_memory(exc):
                    raise
            self._back_off(size)  # out of the handler, which released the attempt's tensors

    def _try_classify(self, noisy: torch.Tensor, size: int) -> torch.Tensor:
        votes = torch.empty(len(noisy), dtype=torch.int64, device=self.device)
        for start in range(0, len(noisy), size):
            stop = min(start + size, len(noisy))
            chunk = noisy[start:stop]
            if self.compiled and len(chunk) == 1:
                # torch.compile specialises a batch of one: doubling the row costs less than
                # compiling again mid-run, and only the first vote is kept.
                chunk = chunk.repeat(2, 1, 1, 1)
            with autocast(self.amp, self.device):
                logits = self.forward(chunk)
            votes[start:stop] = logits[: stop - start].argmax(dim=1)
        return votes

    def _back_off(self, failed: int) -> None:
        """Halve the copies per forward pass after an out-of-memory error at `failed` copies;
        below 1, stop. Passes running side by side that fail together halve it once."""
        with self._backing_off:
            if self.forward_size < failed:  # another pass has halved it already
                return
            self._halve_forward_size()

    def _halve_forward_size(self) -> None:
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
