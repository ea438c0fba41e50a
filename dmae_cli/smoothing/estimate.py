"""`dmae certify --estimate`: what a certification would cost, from a short timed sample.

`estimate_certify(recipe)` builds the same jobs as `run_certify` (the same checks against the
files already there), times the real sampler for a few seconds per sigma after a warm-up, and
projects the noisy forward passes and the wall time of what is left. It writes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmae_cli.api import Certifier, CertifierV1
from dmae_cli.config.recipe import CertifyConfig, Recipe
from dmae_cli.runtime import distributed
from dmae_cli.smoothing.drive import counts_of
from dmae_cli.smoothing.jobs import Job, prepare
from dmae_cli.smoothing.runfile import check_header, finished, tsv_path
from dmae_cli.smoothing.sampler import Sampler

ESTIMATE_SECONDS = 3.0  # timed sampling per sigma, after the warm-up


@dataclass(frozen=True)
class Throughput:
    """What a short timed sample of noisy forward passes measured on the real sampler."""

    copies_per_second: float  # in whole batches of `batch_size`
    select_seconds: float  # one selection call of n0 copies (its own, smaller batch)
    copies: int  # copies timed, in all
    seconds: float  # time they took


@dataclass(frozen=True)
class SigmaEstimate:
    """The projected cost of certifying what is left of one sigma; nothing was written."""

    sigma: float
    tsv: Path
    selected: int  # examples the recipe selects
    todo: int  # of which not yet in the TSV
    passes: int  # noisy forward passes for the `todo` examples, all processes together
    exact: bool  # False: `passes` is an upper bound
    note: str  # why `passes` is exact, or an upper bound
    seconds: float  # projected wall time, compiling included
    throughput: Throughput | None  # None when nothing is left to do (nothing was measured)
    processes: int
    device: str
    precision: str
    batch_size: int
    forward_size: int  # < batch_size when the timed sample ran out of memory
    compile_seconds: float  # what compiling took here (the real run compiles again)


def estimate_certify(
    recipe: Recipe,
    out: Path | None = None,
    seconds: float | None = None,
    loaded: Mapping[Path, dict[str, Any]] | None = None,
) -> list[SigmaEstimate]:
    """What `run_certify` would cost, from a short timed sample; writes and changes nothing.

    `seconds` of timed sampling per sigma, after a warm-up (default ESTIMATE_SECONDS);
    `loaded`: checkpoints already read, by resolved path (`Found.loaded`), not read again.
    """
    timed = ESTIMATE_SECONDS if seconds is None else seconds
    indices, out_dir, jobs = prepare(recipe, out, loaded)
    return [estimate_sigma(job, indices, out_dir, timed) for job in jobs]


def estimate_sigma(job: Job, indices: list[int], out_dir: Path, seconds: float) -> SigmaEstimate:
    """Project one sigma's remaining work from `seconds` of timed sampling; reads files only."""
    cfg, sampler = job.recipe.certify, job.sampler
    tsv = tsv_path(out_dir, job.sigma)
    check_header(tsv, job.header)  # a run would refuse: so do we
    done = finished(tsv)
    todo = [i for i in indices if i not in done]
    world = distributed.world_size()
    throughput, wall = None, 0.0
    if todo:
        throughput = measure_throughput(sampler, job.dataset[todo[0]][0], cfg.n0, seconds)
        per_example = throughput.select_seconds + cfg.n / throughput.copies_per_second
        wall = sampler.compile_seconds + math.ceil(len(todo) / world) * per_example
    return SigmaEstimate(
        sigma=job.sigma,
        tsv=tsv,
        selected=len(indices),
        todo=len(todo),
        passes=len(todo) * (cfg.n0 + cfg.n),
        exact=passes_are_exact(cfg, job.certifier),
        note=passes_note(cfg, job.certifier),
        seconds=wall,
        throughput=throughput,
        processes=world,
        device=str(sampler.device),
        precision=sampler.precision,
        batch_size=sampler.batch_size,
        forward_size=sampler.forward_size,
        compile_seconds=sampler.compile_seconds,
    )


def measure_throughput(
    sampler: Sampler, image: torch.Tensor, n0: int, seconds: float
) -> Throughput:
    """Time the sampler as certification uses it, for about `seconds` after a warm-up.

    Copies are drawn through the certification driver's passes (`counts_of`). The warm-up (a
    selection call and a whole batch) lets CUDA pick its kernels and the allocator settle.
    Then selection calls of n0 copies are timed for a quarter of the time, and whole batches
    for the rest, in calls of as many batches as the time left allows (each call synchronises
    once, as a certification call does). At least one call of each.
    """
    drawn = sampler.drawn
    counts = counts_of(sampler, image, torch.Generator(device=sampler.device).manual_seed(0))
    counts(n0)
    counts(sampler.batch_size)
    select_calls, select_time = _timed_calls(lambda: counts(n0), seconds / 4)
    budget, copies, elapsed, batches = seconds * 3 / 4, 0, 0.0, 1
    while elapsed < budget or not copies:
        tick = time.perf_counter()
        counts(batches * sampler.batch_size)
        elapsed += time.perf_counter() - tick
        copies += batches * sampler.batch_size
        rate = copies / max(elapsed, 1e-9)
        batches = max(1, math.ceil((budget - elapsed) * rate / sampler.batch_size))
    sampler.drawn = drawn
    return Throughput(copies / max(elapsed, 1e-9), select_time / select_calls, copies, elapsed)


def _timed_calls(call: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Call `call` until `seconds` have passed (at least once): (calls, seconds taken)."""
    calls, elapsed = 0, 0.0
    while elapsed < seconds or not calls:
        tick = time.perf_counter()
        call()
        elapsed += time.perf_counter() - tick
        calls += 1
    return calls, elapsed


def passes_are_exact(cfg: CertifyConfig, certifier: Certifier | CertifierV1) -> bool:
    """Whether every example draws exactly n0 + n: Cohen's certifier, never skipping."""
    return certifier.name == "cohen" and not cfg.skip_wrong


def passes_note(cfg: CertifyConfig, certifier: Certifier | CertifierV1) -> str:
    """Why the projected noisy passes are exact, or an upper bound."""
    if passes_are_exact(cfg, certifier):
        return "exact: cohen draws n0 + n copies per example"
    if cfg.skip_wrong:
        why = "--skip-wrong draws no n copies when the selected class is wrong"
    elif certifier.name == "sequential":
        why = "sequential stops early once the report radii are settled or out of reach"
    else:
        why = f"n is the budget, which {certifier.name} may stop short of"
    return f"an upper bound: {why}"


def estimate_notes(estimates: list[SigmaEstimate]) -> list[str]:
    """What the projected numbers assume, and what was measured to get them."""
    notes = [f"noisy passes (copies through the classifier): {estimates[0].note}"]
    for e in estimates:
        if e.throughput is None:
            notes.append(f"sigma {e.sigma:g}: nothing left to do in {e.tsv}")
            continue
        t = e.throughput
        halved = f" (forwarded {e.forward_size} at a time: out of memory)"
        compiled = f", compiling took {e.compile_seconds:.0f} s" if e.compile_seconds else ""
        notes.append(
            f"sigma {e.sigma:g}: measured {t.copies:,} copies in {t.seconds:.1f} s after a "
            f"warm-up on {e.device}, {e.precision}, batch size {e.batch_size}"
            f"{halved if e.forward_size < e.batch_size else ''}{compiled}; a selection call "
            f"of n0 copies took {t.select_seconds:.3f} s"
        )
    if estimates[0].processes > 1:
        notes.append(f"wall time with {estimates[0].processes} processes sharing the examples")
    notes.append(
        "wall time = examples x (selection call + n / copies per second) + compiling; loading "
        "the model and data and the certifier's statistics are not included"
    )
    return notes


def format_duration(seconds: float) -> str:
    """3725 -> '1 h 02 min'; 75 -> '1 min 15 s'; 4.2 -> '4.2 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"
