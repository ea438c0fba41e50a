"""The certification stage: which model, which examples, where the rows go, and resuming.

`run_certify(recipe)` is what `dmae certify` calls. For each sigma of `recipe.certify` it loads
the fine-tuned classifier (`certify.checkpoint`, else runs/<name>/finetune/sigma-<s>/best.pth,
else last.pth), selects examples of the split (`start`, `end`, `interval`, `max_examples`)
and certifies each one with the certifier plugin named by the recipe, which draws noisy copies
through `Sampler`. It writes, into runs/<name>/certify/:

  sigma-<s>.tsv    one row per example, sorted by idx: Cohen's columns `idx label predict
                   radius correct time` (time in seconds), then `count_top n n0 certifier
                   pa_lower stop`, the raw counts from which a radius can be recomputed
  sigma-<s>.json   the header: checkpoint sha256, sigma, n0, n, alpha, seed, certifier,
                   data fingerprint, package versions, and the batch size and precision
                   as resolved (`auto` is recorded as what it chose)

Rows are appended and flushed as they finish, so an interruption loses at most the examples
in progress, and running the same command again skips the finished indices (after checking
that the header matches). A row that cannot be written (a full disk) is cut back off, so the
file keeps only whole rows, and the run stops with one line. Under torchrun the examples
still to do are dealt round-robin to the ranks; rank 0 appends to the TSV, rank r > 0 to
`sigma-<s>.tsv.part<r>`, and rank 0 merges, sorts and removes the parts once every rank is
done. Each example's noise comes from its own generator, so the merged file is the one a
single process writes.

`dmae_cli.smoothing.estimate` (`dmae certify --estimate`) builds the same jobs, times a short
sample of
noisy forward passes on each and projects the cost of what is left, writing nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.progress import TextColumn

from dmae_cli import __version__
from dmae_cli.api import Certificate, Certifier, CertifyRequest, CountsFn, DatasetInfo
from dmae_cli.config.recipe import CertifyConfig, Recipe, load_recipe, sigma_name
from dmae_cli.models.vit import load_classifier
from dmae_cli.plugins import registry
from dmae_cli.runtime import checkpoint, distributed, ui
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.interrupt import GracefulStop, Interrupted
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.smoothing.interleave import certify_together
from dmae_cli.smoothing.sampler import (
    Sampler,
    auto_batch_size,
    auto_parallel,
    example_generator,
    is_auto_batch,
)
from dmae_cli.training.pretrain import load_dataset
from dmae_cli.training.trainer import resolve_device

COLUMNS = (
    "idx", "label", "predict", "radius", "correct", "time",
    "count_top", "n", "n0", "certifier", "pa_lower", "stop",
)  # fmt: skip
FORMAT = "dmae-certify/1"
# Header keys that change what a row means; a resumed file must agree on all of them. The
# device changes which noise is drawn (another generator) and precision the arithmetic, not
# the validity of a row; the batch size changes neither the noise nor the row (see
# `NoiseStream`); the split is named by its fingerprint ("val" and "test" are one split).
MATCHING = (
    "format", "sigma", "n0", "n", "alpha", "seed", "certifier", "certifier_options",
    "radii", "skip_wrong", "checkpoint_sha256", "dataset", "data_fingerprint",
)  # fmt: skip
MODEL_FILES = ("best.pth", "last.pth")


# -- rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One certified example, as a line of the TSV."""

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float
    count_top: int
    n: int
    n0: int
    certifier: str
    pa_lower: float | None
    stop: str

    @classmethod
    def of(cls, idx: int, label: int, cert: Certificate, seconds: float, name: str) -> Row:
        pa_lower = cert.extra.get("pa_lower")
        return cls(
            idx, label, cert.prediction, float(cert.radius), int(cert.prediction == label),
            seconds, cert.count_top, cert.n, cert.n0, name,
            None if pa_lower is None else float(pa_lower), str(cert.extra.get("stop", "")),
        )  # fmt: skip

    def line(self) -> str:
        # Floats as repr: exact, so `radius >= r` reads back as it was computed (Cohen's
        # 3-digit rounding can lift 0.2499 to 0.25).
        pa = "" if self.pa_lower is None else repr(self.pa_lower)
        fields = (
            self.idx, self.label, self.predict, repr(self.radius), self.correct,
            f"{self.time:.3f}", self.count_top, self.n, self.n0, self.certifier, pa, self.stop,
        )  # fmt: skip
        return "\t".join(map(str, fields)) + "\n"

    @classmethod
    def parse(cls, line: str) -> Row:
        f = line.rstrip("\n").split("\t")
        if len(f) != len(COLUMNS):
            raise ValueError(f"expected {len(COLUMNS)} fields, got {len(f)}")
        return cls(
            int(f[0]), int(f[1]), int(f[2]), float(f[3]), int(f[4]), float(f[5]),
            int(f[6]), int(f[7]), int(f[8]), f[9], float(f[10]) if f[10] else None, f[11],
        )  # fmt: skip


HEADER_LINE = "\t".join(COLUMNS) + "\n"


def read_lines(path: Path) -> dict[int, str]:
    """The complete rows of a TSV by idx; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return {}
    *lines, _torn = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0] + "\n" != HEADER_LINE:
        raise UserError(f"{path}: not a dmae certification file (unexpected column header)")
    rows: dict[int, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            rows.setdefault(Row.parse(line).idx, line + "\n")
        except ValueError as exc:
            raise UserError(f"{path}, line {number}: malformed row ({exc})") from None
    return rows


class RowFile:
    """A row file open for appending that holds only whole rows, whatever happens.

    Each row goes straight to the operating system in unbuffered writes (what `write` plus
    `flush` did, with no buffer left to fail again at close). A write that fails, typically
    on a full disk, is cut back off the file, so every row before it stays intact and
    running the same command again resumes after it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab", buffering=0)

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def append(self, line: str) -> None:
        data = memoryview(line.encode("utf-8"))
        end = self._file.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[self._write(data) :]
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._file.truncate(end)  # drop the torn row
            raise UserError(
                f"could not write to {self.path}: {exc.strerror or exc}; the rows written "
                f"before are kept: free some space and run the same command again to resume"
            ) from exc

    def _write(self, data: memoryview) -> int:
        written = self._file.write(data)
        if not written:  # a regular file that takes no bytes would loop forever
            raise OSError(errno.EIO, "the file system accepted no bytes")
        return written


def open_for_append(path: Path) -> RowFile:
    """Open a row file for appending: drop a partial last line, write the column header."""
    if path.is_file():
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with path.open("r+b") as f:
                f.truncate(keep)
    fresh = not path.is_file() or path.stat().st_size == 0
    rows = RowFile(path)
    if fresh:
        rows.append(HEADER_LINE)
    return rows


def part_path(tsv: Path, rank: int) -> Path:
    return tsv if rank == 0 else tsv.with_name(f"{tsv.name}.part{rank}")


def parts(tsv: Path) -> list[Path]:
    return sorted(tsv.parent.glob(f"{tsv.name}.part*"))


def merge(tsv: Path) -> dict[int, str]:
    """Fold the part files into the TSV, sorted by idx, atomically; returns the rows."""
    rows = read_lines(tsv)
    for part in parts(tsv):
        for idx, line in read_lines(part).items():
            rows.setdefault(idx, line)
    text = HEADER_LINE + "".join(rows[idx] for idx in sorted(rows))
    checkpoint.atomic_write_text(tsv, text)
    for part in parts(tsv):
        part.unlink()
    return rows


# -- what to certify with ------------------------------------------------------------------
def select_indices(cfg: CertifyConfig, size: int, split: str) -> list[int]:
    """start, start + interval, ... below end, at most max_examples of them."""
    end = size if cfg.end is None else cfg.end
    if cfg.start >= size or end > size:
        raise UserError(
            f"certify.start={cfg.start} / certify.end={cfg.end} outside the {split} split, "
            f"which has {size} examples"
        )
    if end <= cfg.start:
        raise UserError(f"certify.end={cfg.end} must be larger than certify.start={cfg.start}")
    indices = list(range(cfg.start, end, cfg.interval))
    return indices[: cfg.max_examples] if cfg.max_examples is not None else indices


def build_certifier(cfg: CertifyConfig) -> Certifier:
    """The certifier plugin named by the recipe, built with `certify.options`."""
    entry = registry.certifiers.entry(cfg.certifier)
    factory = registry.certifiers.get(cfg.certifier)
    try:
        certifier = factory(**cfg.options)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"certifier '{cfg.certifier}' rejected its options {cfg.options}: {exc}"
        ) from exc
    if not isinstance(certifier, Certifier):
        raise UserError(
            f"certifier '{cfg.certifier}' from {entry.distribution} does not implement the "
            f"Certifier contract (name, certify, predict) of dmae_cli.api"
        )
    return certifier


def model_path(recipe: Recipe, sigma: float) -> Path:
    """`certify.checkpoint`, else the run's fine-tuned model for `sigma` (best, else last)."""
    if recipe.certify.checkpoint:
        return Path(recipe.certify.checkpoint)
    run = recipe.stage_dir("finetune") / sigma_name(sigma)
    for name in MODEL_FILES:
        if (run / name).is_file():
            return run / name
    raise UserError(
        f"no fine-tuned model for sigma {sigma}: {run / MODEL_FILES[0]} not found; run "
        f"'dmae finetune' for this recipe and sigma first, or pass --checkpoint"
    )


def latest_model(runs_dir: Path, sigma: float) -> Path:
    """The most recently written fine-tuned model for `sigma` under `runs_dir` (any run)."""
    found = []
    for run in runs_dir.glob(f"*/finetune/{sigma_name(sigma)}"):
        files = [run / name for name in MODEL_FILES if (run / name).is_file()]
        if files:
            found.append(files[0])
    if not found:
        raise UserError(
            f"no fine-tuned model for sigma {sigma} under {runs_dir}/*/finetune/; give a "
            f"recipe (dmae certify recipes/digits.yaml --sigma {sigma}) or --checkpoint"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def resolve_recipe(path: Path | None, overrides: Sequence[str]) -> Recipe:
    """The recipe `dmae certify` runs: the file given, or else that of the model it certifies.

    Without a file, the model is `certify.checkpoint` or the latest fine-tuned one for the
    first sigma under runs_dir, and the recipe is the `config.yaml` saved next to it (its run
    directory pinned to where the model was found); a bare checkpoint gets the defaults with
    the data set its meta names.
    """
    if path is not None:
        return load_recipe(path, overrides)
    base = load_recipe(None, overrides)
    explicit = base.certify.checkpoint
    model = Path(explicit) if explicit else latest_model(Path(base.runs_dir), base.certify.sigma[0])
    # A found model lies at runs/<name>/finetune/sigma-<s>/: point the recipe there, so that
    # every sigma's model and the output directory come from the same run.
    found = [
        f"runs_dir={json.dumps(str(model.parents[3]))}",
        f"name={json.dumps(model.parents[2].name)}",
    ]
    pinned = [] if explicit else found
    config = model.parent / "config.yaml"
    if config.is_file():
        recipe = load_recipe(config, [*pinned, *overrides])
        refuse_untyped_sources(recipe, overrides, config)
        return recipe
    meta = checkpoint.load_checkpoint(model).get("meta") or {}
    data = {"data.dataset": meta.get("dataset"), "data.image_size": meta.get("input_size")}
    items = [f"{key}={json.dumps(value)}" for key, value in data.items() if value is not None]
    return load_recipe(None, [*items, *pinned, *overrides])


# A `pipe:` command or a URL (webdataset opens `http://...` through a shell command too).
COMMAND_OR_URL = re.compile(r"pipe:|://", re.IGNORECASE)


def refuse_untyped_sources(recipe: Recipe, overrides: Sequence[str], found: Path) -> None:
    """A config.yaml found beside a checkpoint is a data file, perhaps a stranger's: it may
    not make dmae run a command or open a URL. The user may, by typing the key in --set."""
    typed = [item.split("=", 1)[0].strip() for item in overrides]
    sources = {"data.root": recipe.data.root}
    sources.update({f"data.options.{k}": v for k, v in recipe.data.options.items()})
    for key, value in sources.items():
        texts = value if isinstance(value, list) else [value]
        if not any(isinstance(t, str) and COMMAND_OR_URL.search(t) for t in texts):
            continue
        if not any(key == t or key.startswith(t + ".") for t in typed):
            raise UserError(
                f"{found} (found beside the checkpoint) sets {key} to a command or URL; "
                f"give a recipe, or set it yourself with --set {key}=..."
            )


def load_model(
    path: Path, info: DatasetInfo, dataset: str, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier at `path`, checked against the data it is about to certify."""
    model, meta = load_classifier(path, device)
    shape = (meta["channels"], meta["input_size"], meta["num_classes"])
    if shape != (info.channels, info.image_size, info.num_classes):
        raise UserError(
            f"{path}: the model takes {shape[0]}x{shape[1]}x{shape[1]} images of {shape[2]} "
            f"classes, but dataset '{dataset}' has {info.channels}x{info.image_size}x"
            f"{info.image_size} images of {info.num_classes} classes"
        )
    if meta.get("dataset") not in (None, dataset):
        ui.info(f"note: {path} was fine-tuned on '{meta['dataset']}', certifying on '{dataset}'")
    return model, meta


# -- the header -----------------------------------------------------------------------------
def make_header(
    recipe: Recipe,
    sigma: float,
    model: Path,
    certifier: Certifier,
    sampler: Sampler,
    info: DatasetInfo,
) -> dict[str, Any]:
    """What the rows of one TSV depend on, written next to it as sigma-<s>.json."""
    import numpy
    import scipy
    import timm

    cfg = recipe.certify
    entry = registry.certifiers.entry(cfg.certifier)
    return {
        "format": FORMAT,
        "columns": list(COLUMNS),
        "sigma": sigma,
        "n0": cfg.n0,
        "n": cfg.n,
        "alpha": cfg.alpha,
        "seed": recipe.seed,
        "certifier": certifier.name,
        "certifier_plugin": f"{entry.distribution} {entry.version} ({entry.target})",
        "certifier_options": dict(cfg.options),
        "radii": list(cfg.radii),
        "skip_wrong": cfg.skip_wrong,
        "checkpoint": str(model),
        "checkpoint_sha256": checkpoint.file_sha256(model),
        "dataset": recipe.data.dataset,
        "split": cfg.split,
        "data_fingerprint": info.fingerprint,
        "batch_size": sampler.batch_size,  # resolved: `auto` is recorded as what it chose
        "device": str(sampler.device),
        "precision": sampler.precision,  # resolved: `auto` is recorded as bf16 or fp32
        "compile": sampler.compiled,
        "together": cfg.together,
        "parallel": sampler.parallel,  # resolved: `auto` is recorded as what it chose
        "versions": {
            "dmae": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "scipy": scipy.__version__,
            "numpy": numpy.__version__,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_header(path: Path, tsv: Path, header: dict[str, Any]) -> None:
    """Refuse to resume rows certified under other settings (every rank checks the same)."""
    if not path.is_file():
        if read_lines(tsv) or parts(tsv):
            raise UserError(
                f"{tsv} exists without its header {path.name}; delete it to start over, "
                f"or write elsewhere with --out"
            )
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable header ({exc})") from None
    new = json.loads(json.dumps(header))  # compare as stored: tuples become lists
    for key in MATCHING:
        if old.get(key) != new[key]:
            raise UserError(
                f"{tsv} holds results for {key}={old.get(key)!r}, this run has "
                f"{header[key]!r}; delete {tsv.name} and {path.name} to start over, or write "
                f"elsewhere with --out"
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


def run_certify(recipe: Recipe, out: Path | None = None) -> list[SigmaResult]:
    """Certify the recipe's split at every sigma of `recipe.certify`; resumes what exists."""
    indices, out_dir, jobs = prepare(recipe, out)
    return [certify_sigma(job, indices, out_dir) for job in jobs]


def prepare(recipe: Recipe, out: Path | None) -> tuple[list[int], Path, Iterator[Job]]:
    """The selected indices, the output directory and, lazily, one job per sigma.

    Everything that can fail for all sigmas at once (certifier, device, data, selection, a
    missing model) fails here, before any model is loaded; each job loads its model when
    reached, so only one is in memory at a time.
    """
    cfg = recipe.certify
    certifier = build_certifier(cfg)  # an unknown name fails before any model is loaded
    device = resolve_device(recipe.device)
    distributed.init_from_env(device)
    dataset = load_dataset(recipe, cfg.split, augment=False)
    indices = select_indices(cfg, len(dataset), cfg.split)
    out_dir = Path(out) if out is not None else recipe.stage_dir("certify")
    paths = {sigma: model_path(recipe, sigma) for sigma in cfg.sigma}  # all found, or none run

    def jobs() -> Iterator[Job]:
        for sigma, path in paths.items():
            model, meta = load_model(path, dataset.info, recipe.data.dataset, device)
            if meta.get("sigma") not in (None, sigma):
                ui.info(
                    f"note: {path} was fine-tuned at sigma {meta['sigma']}, certifying at {sigma}"
                )
            sampler = build_sampler(recipe, model, sigma, dataset.info, device)
            if sampler.compiled:
                compile_up_front(sampler, dataset[indices[0]][0])
            header = make_header(recipe, sigma, path, certifier, sampler, dataset.info)
            yield Job(recipe, sigma, sampler, certifier, dataset, header)

    return indices, out_dir, jobs()


def compile_up_front(sampler: Sampler, image: torch.Tensor) -> None:
    """Compile before any file is written, so that a missing compiler is the only line shown.

    The spinner is transient (gone once compiled, never printed off a terminal).
    """
    waiting = f"torch.compile: compiling the classifier for {sampler.device} (minutes)"
    with ui.console.status(waiting) if distributed.is_main() else contextlib.nullcontext():
        sampler.warm_up(image)
    ui.info(f"torch.compile: compiled in {sampler.compile_seconds:.0f} s")


def build_sampler(
    recipe: Recipe, model: nn.Module, sigma: float, info: DatasetInfo, device: torch.device
) -> Sampler:
    """The sampler of `recipe.certify`, with `batch_size: auto` resolved for this device."""
    cfg = recipe.certify
    batch_size = cfg.batch_size
    if is_auto_batch(batch_size):
        shape = (info.channels, info.image_size, info.image_size)
        dtype = autocast_dtype(recipe.precision, device)
        batch_size = auto_batch_size(model, shape, device, dtype, max(cfg.n0, cfg.n))
        ui.info(f"certify.batch_size auto: {batch_size} noisy copies per batch on {device}")
    parallel = auto_parallel(device, cfg.compile) if cfg.parallel == "auto" else cfg.parallel
    return Sampler(
        model,
        sigma=sigma,
        num_classes=info.num_classes,
        batch_size=batch_size,
        device=device,
        precision=recipe.precision,
        compile=cfg.compile,
        parallel=parallel,
    )


@dataclass
class Job:
    """Certifying one split at one sigma: what `certify_sigma` needs besides the indices."""

    recipe: Recipe
    sigma: float
    sampler: Sampler
    certifier: Certifier
    dataset: Any
    header: dict[str, Any]

    def task(self, idx: int) -> tuple[torch.Tensor, torch.Generator, Callable[[CountsFn], Row]]:
        """Example `idx`, its own noise generator, and its certification given `counts`."""
        cfg = self.recipe.certify
        image, label = self.dataset[idx]
        label = int(label)
        request = CertifyRequest(
            self.sigma, cfg.alpha, cfg.n0, cfg.n, cfg.radii, label if cfg.skip_wrong else None
        )
        generator = example_generator(self.recipe.seed, idx, self.sampler.device)

        def certify(counts: CountsFn) -> Row:
            tick = time.perf_counter()
            cert = self.certifier.certify(counts, request)
            return Row.of(idx, label, cert, time.perf_counter() - tick, self.certifier.name)

        return image, generator, certify

    def rows(self, group: list[int]) -> list[Row]:
        """Certify the examples of `group` side by side (see `dmae_cli.smoothing.interleave`)."""
        if len(group) == 1:
            image, generator, certify = self.task(group[0])
            return [certify(self.sampler.counts(image, generator))]
        return certify_together(self.sampler, [self.task(idx) for idx in group])


def certify_sigma(job: Job, indices: list[int], out_dir: Path) -> SigmaResult:
    """Certify the examples of `indices` not in the TSV yet; merge; return the selection."""
    tsv = out_dir / f"{sigma_name(job.sigma)}.tsv"
    head = tsv.with_suffix(".json")
    check_header(head, tsv, job.header)
    done = finished(tsv)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        if not head.is_file():
            checkpoint.atomic_write_text(head, json.dumps(job.header, indent=2) + "\n")
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


def finished(tsv: Path) -> set[int]:
    """The indices already certified into `tsv` or one of its rank parts."""
    return set(read_lines(tsv)).union(*(read_lines(p) for p in parts(tsv)))


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
