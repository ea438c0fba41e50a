"""What a certification runs on: the examples it selects, the certifier and sampler it builds,
each sigma's model loaded and checked against the data, and one `Job` per sigma tying them
together.

Examples are taken by index, `dataset[i]`; a streamed data set (an `IterableDataset`, such as
`webdataset` shards) is read once in order instead, keeping the selected examples as they pass
(`Streamed`). Which recipe and which model files are certified is
`dmae_cli.smoothing.found`'s. A job also carries what goes into its run file's JSON header
(`make_header`); the run file's format, its reading and writing belong to
`dmae_cli.smoothing.runfile`, and certifying the jobs' examples into it, resuming, to
`dmae_cli.smoothing.certify`.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import IterableDataset

from dmae_cli import __version__
from dmae_cli.api import Certifier, CertifierV1, CertifyRequest, DatasetInfo, certifier_api
from dmae_cli.config.recipe import CertifyConfig, Recipe
from dmae_cli.data.loading import load_dataset
from dmae_cli.models.classifier import load_classifier
from dmae_cli.models.spec import ModelSpec
from dmae_cli.plugins import boundary, registry
from dmae_cli.runtime import checkpoint, distributed, ui
from dmae_cli.runtime.device import resolve_device
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.precision import autocast_dtype
from dmae_cli.smoothing.denoising import NO_DENOISER, LoadedDenoiser, sigma_notes
from dmae_cli.smoothing.drive import drive
from dmae_cli.smoothing.found import model_path
from dmae_cli.smoothing.runfile import COLUMNS, FORMAT, Row
from dmae_cli.smoothing.sampler import (
    Sampler,
    auto_batch_size,
    auto_parallel,
    example_generator,
    is_auto_batch,
)


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


class Streamed:
    """The examples of a streamed data set (an `IterableDataset`, e.g. `webdataset` shards) by
    index: its i-th item is example i, as a map-style data set's `dataset[i]`.

    Certification asks for its examples in increasing order (the selection, less what a resume
    finds done), so they are read in one pass: an index ahead reads on and drops what lies
    between, the same index again is the item kept from the last call, and an earlier one
    (the next sigma's first example) starts the stream over. One item is held at a time.
    """

    def __init__(self, stream: Any, name: str) -> None:
        self.stream, self.name, self.info = stream, name, stream.info
        self._items: Iterator[Any] | None = None
        self._read = 0  # items taken from `_items`
        self._last: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, idx: int) -> Any:
        if self._last is not None and self._last[0] == idx:
            return self._last[1]
        if self._items is None or idx < self._read:
            self.close()
            self._items, self._read = iter(self.stream), 0
        for item in self._items:
            self._read += 1
            if self._read > idx:
                self._last = (idx, item)
                return item
        raise UserError(
            f"dataset '{self.name}' ended after {self._read} examples, before example {idx} of "
            f"the {len(self)} it announced (unreadable samples were skipped: see the warnings)"
        )

    def close(self) -> None:
        """Stop reading (a generator's close also closes its open shard)."""
        if self._items is not None and hasattr(self._items, "close"):
            self._items.close()
        self._items, self._last = None, None


def by_index(dataset: Any, name: str) -> Any:
    """`dataset` if it is indexable, else its stream as `Streamed` (one process only: under
    torchrun a stream deals its shards to the ranks, so a rank would not see every example)."""
    if not isinstance(dataset, IterableDataset):
        return dataset
    if distributed.world_size() > 1:
        raise UserError(
            f"dataset '{name}' is streamed, and under torchrun each rank reads only its own "
            f"shards; certify it in one process (without torchrun)"
        )
    return Streamed(dataset, name)


def build_certifier(cfg: CertifyConfig) -> Certifier | CertifierV1:
    """The certifier plugin named by the recipe, built with `certify.options`."""
    entry = registry.certifiers.entry(cfg.certifier)
    factory = registry.certifiers.get(cfg.certifier)
    with boundary.contained(entry, cfg.options, rejects=(TypeError,)):
        certifier = factory(**cfg.options)
    if not isinstance(certifier, Certifier):
        raise UserError(
            f"certifier '{cfg.certifier}' from {entry.distribution} does not implement the "
            f"Certifier contract (name, certify, predict) of dmae_cli.api"
        )
    if certifier_api(certifier) == 1 and cfg.together > 1:
        ui.info(
            f"[yellow]warning:[/] certifier '{cfg.certifier}' implements certifier API 1 "
            f"(certify(counts, request)): its examples are certified one at a time, "
            f"certify.together {cfg.together} shares no forward passes"
        )
    return certifier


def load_model(
    path: Path,
    info: DatasetInfo,
    dataset: str,
    device: torch.device,
    state: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """The classifier at `path` (its contents `state`, if already read), checked against the
    data it is about to certify."""
    model, spec = load_classifier(path, device, state)
    shape = (spec.channels, spec.input_size, spec.num_classes)
    if shape != (info.channels, info.image_size, info.num_classes):
        raise UserError(
            f"{path}: the model takes {shape[0]}x{shape[1]}x{shape[1]} images of {shape[2]} "
            f"classes, but dataset '{dataset}' has {info.channels}x{info.image_size}x"
            f"{info.image_size} images of {info.num_classes} classes"
        )
    if spec.dataset not in (None, dataset):
        ui.info(f"note: {path} was fine-tuned on '{spec.dataset}', certifying on '{dataset}'")
    return model, spec


# -- the header -----------------------------------------------------------------------------
def make_header(
    recipe: Recipe,
    sigma: float,
    model: Path,
    certifier: Certifier | CertifierV1,
    sampler: Sampler,
    info: DatasetInfo,
    spec: ModelSpec | None = None,
    denoiser: LoadedDenoiser | None = None,
) -> dict[str, Any]:
    """What the rows of one TSV depend on, written next to it as sigma-<s>.json; `spec` is
    the classifier's, `denoiser` the one in front of it."""
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
        "classifier_sigma": None if spec is None else spec.sigma,
        **(NO_DENOISER if denoiser is None else denoiser.header()),
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


def certify_dir(recipe: Recipe, out: Path | None) -> Path:
    """Where the run files go: `--out`, else runs/<name>/certify/, or with a denoiser
    runs/<name>/certify-denoised/ (never mixed with the classifier's own results)."""
    if out is not None:
        return Path(out)
    return recipe.stage_dir("certify-denoised" if recipe.certify.denoiser else "certify")


def prepare(
    recipe: Recipe, out: Path | None, loaded: Mapping[Path, dict[str, Any]] | None = None
) -> tuple[list[int], Path, Iterator[Job]]:
    """The selected indices, the output directory and, lazily, one job per sigma.

    Everything that can fail for all sigmas at once (certifier, device, data, selection, a
    missing model) fails here, before any model is loaded; each job loads its model when
    reached, so only one is in memory at a time. `loaded` holds checkpoints already read
    (by resolved path, `Found.loaded`), which are used instead of reading them again.
    """
    cfg = recipe.certify
    certifier = build_certifier(cfg)  # an unknown name fails before any model is loaded
    device = resolve_device(recipe.device)
    distributed.init_from_env(device)
    dataset = by_index(load_dataset(recipe, cfg.split, augment=False), recipe.data.dataset)
    indices = select_indices(cfg, len(dataset), cfg.split)
    out_dir = certify_dir(recipe, out)
    paths = {sigma: model_path(recipe, sigma) for sigma in cfg.sigma}  # all found, or none run
    states = dict(loaded or {})
    denoiser = None
    if cfg.denoiser:  # one for every sigma
        denoiser = LoadedDenoiser.load(
            Path(cfg.denoiser).expanduser(), device, dataset.info, recipe.data.dataset
        )

    def jobs() -> Iterator[Job]:
        for sigma, path in paths.items():
            state = states.pop(path.resolve(), None)  # handed over once, then freed
            model, spec = load_model(path, dataset.info, recipe.data.dataset, device, state)
            if denoiser is not None:
                model = denoiser.before(model, spec, path)
            sigma_notes(path, spec, sigma, denoiser)
            sampler = build_sampler(recipe, model, sigma, dataset.info, device)
            if sampler.compiled:
                compile_up_front(sampler, dataset[indices[0]][0])
            header = make_header(
                recipe, sigma, path, certifier, sampler, dataset.info, spec, denoiser
            )
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
    certifier: Certifier | CertifierV1
    dataset: Any
    header: dict[str, Any]

    def request(self, label: int) -> CertifyRequest:
        """What the certifier is told about an example labelled `label`."""
        cfg = self.recipe.certify
        skip = label if cfg.skip_wrong else None
        return CertifyRequest(self.sigma, cfg.alpha, cfg.n0, cfg.n, cfg.radii, skip)

    def rows(self, group: list[int]) -> list[Row]:
        """Certify the examples of `group` together, their draws sharing forward passes (see
        `dmae_cli.smoothing.drive`), each from its own noise generator."""
        examples, labels = [], []
        for idx in group:
            image, label = self.dataset[idx]
            labels.append(int(label))
            examples.append((image, example_generator(self.recipe.seed, idx, self.sampler.device)))
        requests = [self.request(label) for label in labels]
        done = drive(self.sampler, examples, self.certifier, requests)
        name = self.certifier.name
        return [
            Row.of(idx, label, cert, seconds, name)
            for idx, label, (cert, seconds) in zip(group, labels, done, strict=True)
        ]
