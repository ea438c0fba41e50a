"""Certifying several examples at once, so that their small draws share forward passes.

A sequential certifier asks for a few dozen noisy copies at a time; one forward pass per
request leaves a GPU mostly idle and costs a CPU its per-call overhead. `certify_together`
runs the certifications of a group of examples side by side, each in its own thread (a
certifier is a plain function that calls `counts(num)` and waits for the answer), and
whenever every unfinished certification is waiting, it answers all their requests with
forward passes packed from all of them.

Nothing about the result depends on the packing: each request's noise comes from its
example's own `NoiseStream`, whose copies do not depend on how they are asked for, so an
example gets exactly the noise it would get alone, and the votes are the model's
argmax on those inputs (equal up to the floating-point effect of batch composition, as any
change of batch size). The group is fixed by the caller, so a rerun over the same group packs
the same batches.

Certifier code runs in the worker threads and only waits there; the threads never touch the
model. The forward passes run from the calling thread, through `Sampler.vote_passes` (on a
CPU, `parallel` of them at once in the sampler's own threads), and each pass's votes are
counted into the requests they answer as they arrive, so no request's votes are kept.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from dmae_cli.api import CountsFn
from dmae_cli.smoothing.noise import NoiseStream
from dmae_cli.smoothing.sampler import Sampler, tally

T = TypeVar("T")
Task = Callable[[CountsFn], T]  # one certification, given its example's counts function


@dataclass
class Request:
    """`num` noisy copies of `clean` (1, C, H, W), noise from `stream`; answered in place."""

    clean: torch.Tensor
    stream: NoiseStream
    num: int
    answered: threading.Event = field(default_factory=threading.Event)
    counts: torch.Tensor | None = None


def certify_together(
    sampler: Sampler, tasks: Sequence[tuple[torch.Tensor, torch.Generator, Task[T]]]
) -> list[T]:
    """Run each task (image, generator, certification) and return their results in order.

    An exception in a task is raised here once every other task has finished. An exception
    while answering (the model failing, an interrupt) stops every task and is raised here once
    their threads have ended, so none is left waiting for an answer.
    """
    board = _Board(len(tasks))
    results: list[T | None] = [None] * len(tasks)
    errors: list[BaseException] = []

    def work(slot: int, image: torch.Tensor, generator: torch.Generator, task: Task[T]) -> None:
        clean = image.to(sampler.device, torch.float32).unsqueeze(0)
        stream = NoiseStream(generator, tuple(clean.shape[1:]))
        try:
            results[slot] = task(lambda num: board.ask(Request(clean, stream, num)))
        except BaseException as error:  # handed to the caller once the others finish
            errors.append(error)
        finally:
            board.finish()

    threads = [
        threading.Thread(target=work, args=(slot, *task), daemon=True, name=f"certify-{slot}")
        for slot, task in enumerate(tasks)
    ]
    for thread in threads:
        thread.start()
    requests: list[Request] | None = []
    try:
        while (requests := board.wait_for_all()) is not None:
            answer(sampler, requests)
    except BaseException:
        board.cancel(requests or [])
        raise
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]  # every slot is filled when nothing raised


class Cancelled(Exception):
    """Raised in a task's thread when the main thread stopped answering (it raised)."""


class _Board:
    """Where waiting requests are posted, and where the main thread learns all are waiting."""

    def __init__(self, tasks: int) -> None:
        self.running = tasks
        self.pending: list[Request] = []
        self.cancelled = False
        self.changed = threading.Condition()

    def ask(self, request: Request) -> torch.Tensor:
        with self.changed:
            if self.cancelled:
                raise Cancelled
            self.pending.append(request)
            self.changed.notify()
        request.answered.wait()
        if request.counts is None:  # woken by `cancel`
            raise Cancelled
        return request.counts

    def cancel(self, taken: list[Request]) -> None:
        """Wake every task waiting for an answer, `taken` (being answered) and pending, and
        make the next request of any other raise `Cancelled`."""
        with self.changed:
            self.cancelled = True
            for request in [*taken, *self.pending]:
                request.answered.set()
            self.pending = []

    def finish(self) -> None:
        with self.changed:
            self.running -= 1
            self.changed.notify()

    def wait_for_all(self) -> list[Request] | None:
        """The requests of every running task once all of them wait; None when all finished."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.pending) == self.running)
            if self.running == 0:
                return None
            requests, self.pending = self.pending, []
            return requests


def answer(sampler: Sampler, requests: list[Request]) -> None:
    """Classify every request's copies in shared forward passes and hand each request its
    class counts.

    The copies of consecutive requests of one image shape are cut into passes as one call of
    that many copies would be (`Sampler.pass_sizes`: equal passes of at most `batch_size`,
    `parallel` at a time on a CPU), so a request may straddle two passes: its noise is a
    stream, so where it is cut changes nothing. Each pass's votes are counted as they arrive
    (`_Split`), so memory does not grow with the requests' sizes.
    """
    sizes = [request.num for request in requests]
    counts = torch.zeros(
        (len(requests), sampler.num_classes), dtype=torch.int64, device=sampler.device
    )
    sampler.vote_passes(_passes(sampler, requests), _Split(sizes, counts))
    sampler.drawn += sum(sizes)
    for request, mine in zip(requests, counts.cpu(), strict=True):
        request.counts = mine
        request.answered.set()


class _Split:
    """Counts consecutive votes into the rows of `counts` they belong to: the first `sizes[0]`
    into row 0, the next `sizes[1]` into row 1, and so on, however the passes cut them."""

    def __init__(self, sizes: list[int], counts: torch.Tensor) -> None:
        self.sizes, self.counts = sizes, counts
        self.row, self.used = 0, 0  # votes of row `row` counted so far

    def __call__(self, votes: torch.Tensor) -> None:
        start = 0
        while start < len(votes):
            while self.used == self.sizes[self.row]:
                self.row, self.used = self.row + 1, 0
            take = min(len(votes) - start, self.sizes[self.row] - self.used)
            tally(self.counts[self.row], votes[start : start + take])
            start, self.used = start + take, self.used + take


def _passes(sampler: Sampler, requests: list[Request]) -> Iterator[torch.Tensor]:
    """The noisy copies of `requests`, in order, one tensor per forward pass."""
    for _, same_shape in itertools.groupby(requests, key=lambda r: tuple(r.clean.shape)):
        pieces = [(request, request.num) for request in same_shape]
        for size in sampler.pass_sizes(sum(num for _, num in pieces)):
            chunks = []
            while size:
                request, left = pieces[0]
                take = min(size, left)
                chunks.append(sampler.noisy(request.clean, take, request.stream))
                size -= take
                pieces[0] = (request, left - take)
                if not pieces[0][1]:
                    pieces.pop(0)
            yield chunks[0] if len(chunks) == 1 else torch.cat(chunks)
