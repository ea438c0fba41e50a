"""Certifying a group of examples in one loop, their small draws sharing forward passes.

An API-2 certifier (`dmae_cli.api.Certifier`) is a generator per example that yields how many
noisy copies it wants and is sent their class counts. `certify_all` keeps the generators of a
group of examples, takes the pending request of every one still running, answers them all
with forward passes packed from all of them (`answer`), sends each its counts, and repeats
until every generator has returned. No threads: certifier code runs between the passes, in
the calling thread, and never touches the model.

Nothing about the result depends on the packing: each request's noise comes from its
example's own `NoiseStream`, whose copies do not depend on how they are asked for, so an
example gets exactly the noise it would get alone, and the votes are the model's argmax on
those inputs (equal up to the floating-point effect of batch composition, as any change of
batch size). Requests are packed in the examples' order, so a rerun over the same group packs
the same batches.

The forward passes go through `Sampler.vote_passes` (on a CPU, `parallel` of them at once in
the sampler's own pool, a sampler strategy confined to `dmae_cli.smoothing.sampler`), and each
pass's votes are counted into the requests they answer as they arrive, so no request's votes
are kept. An API-1 certifier (`certify(counts, request)`, a callback that blocks for its
answer) runs through an adapter instead: one example at a time, `counts` being the sampler's.

An exception in a certifier, or while answering (the model failing, an interrupt), is raised
at once; the other examples' generators are closed, so nothing is left waiting. A certifier
that breaks the contract (a `certify` that is no generator, a yield that is no number of
copies) stops the run with one line naming it.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dmae_cli.api import (
    Certificate,
    CertifyRequest,
    CountsFn,
    Draws,
    certifier_api,
    copies_asked,
)
from dmae_cli.plugins.boundary import DEBUG_HINT, PluginFailure, one_line
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import Interrupted
from dmae_cli.smoothing.noise import NoiseStream
from dmae_cli.smoothing.sampler import Sampler, tally

Example = tuple[torch.Tensor, torch.Generator]  # image (C, H, W) in [0, 1], its noise generator


def certify_all(
    sampler: Sampler,
    examples: Sequence[tuple[torch.Tensor, torch.Generator]],
    certifier: Any,
    requests: Sequence[CertifyRequest],
) -> list[Certificate]:
    """Certify each example under its request (API 1 or 2 certifier); results in order."""
    return [cert for cert, _ in drive(sampler, examples, certifier, requests)]


def predict_all(
    sampler: Sampler,
    examples: Sequence[tuple[torch.Tensor, torch.Generator]],
    certifier: Any,
    requests: Sequence[CertifyRequest],
) -> list[int]:
    """The certifier's prediction (a class or ABSTAIN) for each example, in order."""
    return [label for label, _ in drive(sampler, examples, certifier, requests, predict=True)]


def drive(
    sampler: Sampler,
    examples: Sequence[Example],
    certifier: Any,
    requests: Sequence[CertifyRequest],
    *,
    predict: bool = False,
) -> list[tuple[Any, float]]:
    """Each example's result (`certify`'s, or `predict`'s) and the seconds it took: from the
    start of the group to its generator's return, or its own call for an API-1 certifier."""
    if len(examples) != len(requests):
        raise ValueError(f"{len(examples)} examples but {len(requests)} requests")
    method = "predict" if predict else "certify"
    name = str(getattr(certifier, "name", type(certifier).__name__))
    if certifier_api(certifier) == 1:
        done = []
        for (image, generator), request in zip(examples, requests, strict=True):
            tick = time.perf_counter()
            result = _call_v1(
                getattr(certifier, method), sampler.counts(image, generator), request, name
            )
            done.append((result, time.perf_counter() - tick))
        return done
    with _certifier_code(name):
        runs = [getattr(certifier, method)(request) for request in requests]
    for run in runs:
        if not inspect.isgenerator(run):
            raise UserError(
                f"certifier '{name}': {method}(request) returned {type(run).__name__}, not a "
                f"generator (an API-2 certifier yields how many noisy copies it wants)"
            )
    return run_together(sampler, examples, runs, name)


def counts_of(sampler: Sampler, image: torch.Tensor, generator: torch.Generator) -> CountsFn:
    """`counts(num)` of one image through `answer`, the passes every API-2 request takes (what
    `dmae certify --estimate` times)."""
    source = _source(sampler, image, generator)
    return lambda num: answer(sampler, [Request(*source, num)])[0]


def _source(
    sampler: Sampler, image: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, NoiseStream]:
    """The clean image (1, C, H, W) on the sampler's device, and its noise stream."""
    clean = image.to(sampler.device, torch.float32).unsqueeze(0)
    return clean, NoiseStream(generator, tuple(clean.shape[1:]))


@dataclass
class Request:
    """`num` noisy copies of `clean` (1, C, H, W), noise from `stream`."""

    clean: torch.Tensor
    stream: NoiseStream
    num: int


def run_together(
    sampler: Sampler, examples: Sequence[Example], runs: Sequence[Draws], name: str
) -> list[tuple[Any, float]]:
    """Drive one generator per example (of the certifier `name`) to its end, answering every
    round's requests together; each result with the seconds from the start to its return."""
    start = time.perf_counter()
    sources = [_source(sampler, image, generator) for image, generator in examples]
    results: list[tuple[Any, float] | None] = [None] * len(runs)
    try:
        asked = [_step(run, None, name) for run in runs]
        while running := [slot for slot, ask in enumerate(asked) if isinstance(ask, int)]:
            pending = [Request(*sources[slot], asked[slot]) for slot in running]
            for slot, counts in zip(running, answer(sampler, pending), strict=True):
                asked[slot] = _step(runs[slot], counts, name)
                if not isinstance(asked[slot], int):
                    results[slot] = (asked[slot].value, time.perf_counter() - start)
        for slot, ask in enumerate(asked):
            if results[slot] is None:  # returned at its first step, before any draw
                results[slot] = (ask.value, time.perf_counter() - start)
    finally:
        for run in runs:  # after an exception: the others end here (a no-op when finished)
            run.close()
    return results  # type: ignore[return-value]  # every slot is filled when nothing raised


def _step(run: Draws, counts: torch.Tensor | None, name: str) -> int | StopIteration:
    """Send `counts` (None: start it) and return how many copies it asks for next, or the
    StopIteration that carries its result. What the certifier raises, and a yield that is no
    number of copies, is one line naming it."""
    try:
        with _certifier_code(name):
            asked = next(run) if counts is None else run.send(counts)
    except StopIteration as done:
        return done
    try:
        return copies_asked(asked)
    except (TypeError, ValueError) as exc:
        raise UserError(f"certifier '{name}': {exc}") from None


@contextmanager
def _certifier_code(name: str) -> Iterator[None]:
    """Run a certifier's own code: what it raises becomes one line naming it (a ValueError or
    `PluginError` is a mistake its user can fix; anything else a bug in the plugin, whose
    traceback DMAE_DEBUG=1 shows). The end of a generator and an interrupt pass."""
    try:
        yield
    except (StopIteration, Interrupted):
        raise
    except (UserError, ValueError) as exc:
        raise PluginFailure(f"certifier '{name}': {one_line(exc)}") from exc
    except Exception as exc:
        raise PluginFailure(
            f"certifier '{name}' failed: {type(exc).__name__}: {one_line(exc)} ({DEBUG_HINT})"
        ) from exc


def _call_v1(method: Any, counts: CountsFn, request: CertifyRequest, name: str) -> Any:
    """An API-1 certifier's call under `_certifier_code`; what its `counts` calls raise (the
    model failing, memory, an interrupt) passes unchanged, it is not the certifier's."""
    from_counts: list[BaseException] = []

    def marked(num: int) -> torch.Tensor:
        try:
            return counts(num)
        except BaseException as exc:
            from_counts.append(exc)
            raise

    try:
        with _certifier_code(name):
            return method(marked, request)
    except PluginFailure as failure:
        if failure.__cause__ is not None and failure.__cause__ in from_counts:
            raise failure.__cause__ from None
        raise


def answer(sampler: Sampler, requests: list[Request]) -> torch.Tensor:
    """Classify every request's copies in shared forward passes: their class counts, one row
    per request, an int64 CPU tensor.

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
    with torch.inference_mode():
        sampler.vote_passes(_passes(sampler, requests), _Split(sizes, counts))
    sampler.drawn += sum(sizes)
    return counts.cpu()


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
    asking = [request for request in requests if request.num]  # none of 0 copies
    for _, same_shape in itertools.groupby(asking, key=lambda r: tuple(r.clean.shape)):
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
