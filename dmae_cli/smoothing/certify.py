"""The certification driver: certify each sigma's examples into its run file, resuming.

`run_certify(recipe)` is what `dmae certify` calls. What it certifies comes from
`dmae_cli.smoothing.jobs`: for each sigma of `recipe.certify`, the fine-tuned classifier
(`certify.checkpoint`, else runs/<name>/finetune/sigma-<s>/best.pth, else last.pth, as
`dmae_cli.smoothing.found` finds it), the examples of the split (`start`, `end`, `interval`,
`max_examples`), the certifier plugin named by the recipe and the `Sampler` it draws noisy
copies through. Where the rows go and how they
are written is `dmae_cli.smoothing.runfile`'s: per sigma a TSV of one row per example, sorted
by idx, with the raw counts behind each radius, and a JSON header beside it, in
runs/<name>/certify/ unless `--out` says otherwise. This module drives the writing.

Rows are appended as they finish, so an interruption loses at most the examples in progress,
and running the same command again skips the finished indices (after checking that the header
matches). A row that cannot be written (a full disk) is cut back off, so the file keeps only
whole rows, and the run stops with one line. Under torchrun the examples still to do are
dealt round-robin to the ranks; rank 0 appends to the TSV, rank r > 0 to its part file, and
rank 0 merges, sorts and removes the parts once every rank is done. Each example's noise comes
from its own generator, so the merged file is the one a single process writes.

`dmae_cli.smoothing.estimate` (`dmae certify --estimate`) builds the same jobs, times a short
sample of noisy forward passes on each and projects the cost of what is left, writing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import TextColumn

from dmae_cli.config.recipe import Recipe, sigma_name
from dmae_cli.runtime import distributed, ui
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.interrupt import GracefulStop, Interrupted
from dmae_cli.runtime.lock import run_lock
from dmae_cli.smoothing.jobs import Job, certify_dir, prepare
from dmae_cli.smoothing.runfile import (
    Row,
    RowFile,
    check_header,
    finished,
    header_path,
    merge,
    open_for_append,
    part_path,
    tsv_path,
    write_header,
)


# -- the run --------------------------------------------------------------------------------
@dataclass
class SigmaResult:
    """What certifying one sigma produced; `rows` (the selected examples) only on rank 0."""

    sigma: float
    tsv: Path
    header: Path
    model: Path
    rows: list[Row]
    certified_now: int  # examples certified by this call, on this rank
    samples: int  # noisy copies drawn by this call, on this rank
    seconds: float

    def accuracy(self, radius: float) -> float:
        """Certified accuracy: the share of rows predicted correctly with radius >= `radius`."""
        hits = sum(1 for r in self.rows if r.correct and r.radius >= radius)
        return hits / len(self.rows) if self.rows else 0.0

    def mean_samples(self) -> float:
        return sum(r.n + r.n0 for r in self.rows) / len(self.rows) if self.rows else 0.0


def run_certify(
    recipe: Recipe, out: Path | None = None, loaded: Mapping[Path, dict[str, Any]] | None = None
) -> list[SigmaResult]:
    """Certify the recipe's split at every sigma of `recipe.certify`; resumes what exists.

    `loaded`: checkpoints already read, by resolved path (`Found.loaded`), not read again.
    Under torchrun a problem one rank finds while preparing stops every rank with its line,
    and a rank that dies ends the others with one line (`distributed.PeerLost`)."""
    device = resolve_device(recipe.device)
    with distributed.process_group(device), ExitStack() as locks:
        with distributed.agreed():
            for sigma in recipe.certify.sigma:  # each sigma's run file, one writer at a time
                tsv = tsv_path(certify_dir(recipe, out), sigma)
                locks.enter_context(run_lock(tsv.parent, f".{tsv.name}.lock", what=str(tsv)))
            indices, out_dir, jobs = prepare(recipe, out, loaded)
        return [certify_sigma(job, indices, out_dir) for job in jobs]


def certify_sigma(job: Job, indices: list[int], out_dir: Path) -> SigmaResult:
    """Certify the examples of `indices` not in the TSV yet; merge; return the selection."""
    tsv = tsv_path(out_dir, job.sigma)
    head = header_path(tsv)
    check_header(tsv, job.header)
    done = finished(tsv)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        if not head.is_file():
            write_header(tsv, job.header)
    distributed.barrier()  # every rank has read `done` before any rank appends
    todo = [i for i in indices if i not in done]
    rank, world = distributed.rank(), distributed.world_size()
    if done and todo:
        ui.info(f"{tsv}: resuming, {len(indices) - len(todo)} of {len(indices)} already done")
    start, drawn = time.perf_counter(), job.sampler.drawn
    groups = groups_to_do(indices, done, job.recipe.certify.together)
    with open_for_append(part_path(tsv, rank)) as rows:
        _certify_each(job, groups[rank::world], -(-len(groups) // world), rows, tsv)
    seconds = time.perf_counter() - start
    distributed.barrier()  # every part is complete
    selected: list[Row] = []
    if distributed.is_main():
        merged = merge(tsv)
        selected = [Row.parse(merged[i]) for i in indices if i in merged]
    distributed.barrier()  # nobody starts the next sigma (or exits) while rank 0 merges
    mine = sum(map(len, groups[rank::world]))
    model = Path(job.header["checkpoint"])
    return SigmaResult(
        job.sigma, tsv, head, model, selected, mine, job.sampler.drawn - drawn, seconds
    )


def groups_to_do(indices: list[int], done: set[int], together: int) -> list[list[int]]:
    """The groups of `together` consecutive selected examples, less those already done.

    Groups are cut from the whole selection, not from what is left, and their rows are
    written at once, so a rerun certifies each group with the same companions and packs the
    same forward passes as an uninterrupted run.
    """
    cut = [indices[i : i + together] for i in range(0, len(indices), together)]
    left = ([i for i in group if i not in done] for group in cut)
    return [group for group in left if group]


def _certify_each(job: Job, groups: list[list[int]], steps: int, rows: RowFile, tsv: Path) -> None:
    """Certify each group and append its rows in one write; stop cleanly on SIGINT/SIGTERM.

    Every rank takes `steps` steps (one more than its share when the groups do not divide
    evenly) because asking whether any rank was interrupted is a collective under torchrun.
    """
    speed = TextColumn("{task.fields[speed]}")
    started, drawn = time.perf_counter(), job.sampler.drawn
    with ui.progress(speed) as bar, GracefulStop() as stop:
        total = sum(map(len, groups))
        task = bar.add_task(f"certify {sigma_name(job.sigma)}", total=total, speed="")
        for step in range(steps):
            if step < len(groups):
                rows.append("".join(row.line() for row in job.rows(groups[step])))
                rate = (job.sampler.drawn - drawn) / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=len(groups[step]), speed=f"{rate:,.0f} noisy/s")
            signum = stop.requested()
            if signum and step + 1 < steps:
                raise Interrupted(
                    f"interrupted; the finished examples are kept in {tsv.parent}; run the "
                    f"same command again to resume",
                    signum,
                )
