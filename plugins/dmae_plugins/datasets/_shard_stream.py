"""The `webdataset` plugin's stream: an `IterableDataset` of (image, label) read from tar shards.

`webdataset.py` finds the shards, their manifest and metadata; `_shard_transforms.py` builds
the augmentation; `_shard_files.py` opens a shard and decodes a sample; this module decides who
reads what, and skips what is bad.

Distribution and length. The shards are shuffled per epoch (train split; the same permutation
on every rank), then dealt to ranks (`wds.split_by_node`) and within a rank to DataLoader
workers (`wds.split_by_worker`'s rule). `len(dataset)` is the number of samples this rank yields per
epoch. For the train split every rank yields the same number: the smallest of the ranks'
shares (the few extra samples of a luckier rank wait for another epoch), and a rank that loses
samples to a bad shard tops up by reading its shards again, so no rank ever runs out of
batches before the others and DistributedDataParallel never waits forever. With `resampled:
true` each worker instead draws shards at random with replacement, forever, and every rank
yields exactly `epoch_length` samples per epoch (default: the manifest's total / world size):
the mode for many nodes, and for shards that do not split evenly. The test split is read
exactly once, in order, each rank its own shards; `len` is then that rank's share.
`set_batch_size(n)` (called by the trainer's loader) makes each worker's share a multiple of
`n`, so that `len(loader)` batches is exactly what the loader yields. `set_epoch(epoch, skip)`
resumes inside an epoch: the rank's first `skip` samples are read but not delivered (nor
augmented), and the workers' roles rotate so that the loader, which always asks worker 0
first, continues with exactly the batch an uninterrupted run would have had next.

Shuffling and seeds. webdataset's own `shuffle` seeds itself from the pid and the clock, and its
`detshuffle`/`ResampledShards(deterministic=True)` count epochs inside the worker's copy, which
restarts with every non-persistent worker. Here every random choice is drawn from
`random.Random("seed/epoch/rank/worker/...")`, with the epoch set by `set_epoch` and kept in
shared memory (so persistent workers see it too): a run is repeatable, an epoch's order does not
depend on how many times the loader was iterated before, and a resumed epoch repeats exactly.
`shuffle` is the size of the sample buffer (default 1000 for the train split, 0 for test); it
holds encoded samples, so 1000 ImageNet PNGs cost about 100 MB per worker.

Decoding. Only `<key>.cls` (an ASCII integer) and one image member are read: png, jpg/jpeg,
webp (PIL) or npy (`allow_pickle=False`); every other member is ignored, and nothing in a shard
is unpickled or becomes a file path. The image goes to the transform the plugin built.

Corrupt data. A sample that does not decode, and a shard that cannot be opened, is truncated
(reading fails, or it ends before the count its manifest gives) are skipped with a warning;
`dataset.skipped` counts them (one per sample, one per shard read; a top-up that reads a bad
shard again counts it again). The counter lives in shared memory, so it includes what
DataLoader workers met; it is per rank and cumulative over epochs. With `strict: true` the
first one raises one `PluginError` line naming the shard instead, also from inside a worker.
"""

from __future__ import annotations

import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset

from dmae_cli.api import DatasetInfo, PluginError
from dmae_plugins.datasets._common import DataError, SkipCounter
from dmae_plugins.datasets._shard_files import (
    MAX_MEMBER_BYTES,
    decode_image,
    decode_label,
    open_shard,
    read_samples,
)
from dmae_plugins.datasets.imagefolder import DECODE_ERRORS

NAME = "webdataset"  # the plugin, as messages name it
MAX_EMPTY_DRAWS = 20  # resampled mode: unreadable shards in a row before giving up
MAX_FAILURES = 1000  # undecodable samples in a row before giving up
# What reading a shard raises when it is missing, truncated or not a tar (a failing `pipe:`
# command raises OSError when its stream is closed).
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
SAMPLE_ERRORS = (*DECODE_ERRORS, EOFError, KeyError)

log = logging.getLogger("dmae_plugins.datasets.webdataset")  # one logger for the plugin


class ShardError(DataError):
    """A bad shard or sample in strict mode, or data too broken to go on: one line, even
    from inside a DataLoader worker."""


class UnknownLength(PluginError, TypeError):
    """`len()` of shards nobody counted. A TypeError too, so that `list(dataset)` (which asks
    for a length hint) still iterates, while `len(loader)` ends in one line, not a traceback."""


# -- planning: who reads what --------------------------------------------------------------------
def worker_info() -> tuple[int, int, int, int]:
    """(rank, world size, worker, workers) as webdataset's splitters see them."""
    import webdataset as wds

    return wds.utils.pytorch_worker_info()


def apportion(total: int, capacities: list[float]) -> list[int]:
    """Split `total` into integers proportional to `capacities` (largest remainders)."""
    weight = sum(capacities)
    if total <= 0 or weight <= 0:
        return [0] * len(capacities)
    exact = [total * c / weight for c in capacities]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass(frozen=True)
class StreamConfig:
    train: bool  # shuffle, equal shares across ranks, top up after bad shards
    shuffle: int  # sample buffer size; 0 disables shuffling (shards too)
    resampled: bool
    epoch_length: int | None  # samples per rank per epoch
    strict: bool
    seed: int
    stored_size: int | None = None  # the side every image must have (from the manifest)
    max_member_bytes: int = MAX_MEMBER_BYTES  # a larger member makes its sample corrupt


class ShardStream(IterableDataset):
    """An `IterableDataset` of (image, label) over tar shards; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int] | None,
        info: DatasetInfo,
        transform: Callable[[Any], torch.Tensor],
        config: StreamConfig,
    ) -> None:
        self.urls = urls
        self.counts = counts
        self.info = info
        self.transform = transform
        self.config = config
        self.batch_size: int | None = None
        # Shared memory: set_epoch reaches persistent workers, and workers' skips reach us.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, skip
        self._skips = SkipCounter()

    # -- what the trainer's loader uses ------------------------------------------------------
    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate `epoch` next, leaving out its first `skip` samples on this rank (those a
        resumed run already trained on; a multiple of the batch size given to set_batch_size)."""
        self._position[0] = epoch
        self._position[1] = skip

    def set_batch_size(self, batch_size: int) -> None:
        """Give each worker a whole number of batches, so the loader yields len(loader)."""
        self.batch_size = batch_size

    @property
    def skipped(self) -> int:
        """Corrupt samples and bad shards skipped so far, in this process and its workers."""
        return self._skips.total

    def __len__(self) -> int:
        rank, world, _, _ = worker_info()
        epoch, skip = self._position.tolist()
        quota = self._rank_quota(epoch, rank, world)
        if quota is None:
            raise UnknownLength(
                f"dataset '{NAME}': the number of samples is unknown (no manifest with sample "
                "counts); set option epoch_length"
            )
        return max(quota - skip, 0)

    # -- the plan ------------------------------------------------------------------------------
    @property
    def shuffling(self) -> bool:
        return self.config.train and self.config.shuffle > 0

    def _rng(self, *parts: object) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.config.seed, *parts)))

    def _order(self, epoch: int) -> list[int]:
        """This epoch's shard order: identical on every rank, so the node split is disjoint."""
        order = list(range(len(self.urls)))
        if self.shuffling:
            self._rng(epoch, "shards").shuffle(order)
        return order

    def _rank_quota(self, epoch: int, rank: int, world: int) -> int | None:
        """Samples this rank yields in `epoch`; None when unknown (read everything once)."""
        cfg = self.config
        if cfg.resampled:
            return cfg.epoch_length or sum(self.counts or ()) // world
        if world > len(self.urls):
            raise PluginError(
                f"dataset '{NAME}': {len(self.urls)} shards cannot be split across {world} ranks; "
                "write more, smaller shards (dmae shard --max-count) or set option resampled: true"
            )
        if self.counts is None:
            return cfg.epoch_length
        order = self._order(epoch)
        shares = [sum(self.counts[i] for i in order[r::world]) for r in range(world)]
        quota = min(shares) if cfg.train else shares[rank]  # equal shares: no rank runs dry
        return min(quota, cfg.epoch_length) if cfg.epoch_length else quota

    def _worker_shares(self, quota: int, capacities: list[float]) -> list[int]:
        """Every worker's part of the rank's quota, in whole batches when the size is known."""
        unit = self.batch_size or 1
        batches = apportion(quota // unit, [c / unit for c in capacities])
        shares = [b * unit for b in batches]
        spare = [c - s for c, s in zip(capacities, shares, strict=True)]
        shares[spare.index(max(spare))] += quota - sum(shares)  # the last, partial batch
        return shares

    def _worker_skip(self, skip: int, shares: list[int]) -> tuple[list[int], int]:
        """How many of the rank's first `skip` samples each worker role made, and the role
        whose batch came next.

        The loader takes whole batches from its workers in turn (0, 1, ..., passing over those
        that ran out), so the first `skip // batch` batches came round-robin from the roles
        with batches left. Without a batch size (one worker, or no hint) it counts samples.
        """
        unit = self.batch_size or 1
        left = [share // unit for share in shares]
        taken = [0] * len(shares)
        role, remaining = 0, skip // unit
        while remaining > 0 and any(left):
            if left[role]:
                taken[role], left[role], remaining = taken[role] + 1, left[role] - 1, remaining - 1
            role = (role + 1) % len(shares)
        return [t * unit for t in taken], role

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds

        rank, world, worker, workers = worker_info()
        epoch, skip = self._position.tolist()
        quota = self._rank_quota(epoch, rank, world)
        mine = list(wds.split_by_node(iter(self._order(epoch))))
        if quota is None:  # uncounted shards, no epoch_length: each worker reads its own once
            ids = list(wds.split_by_worker(iter(mine)))
            yield from self._passes(ids, None, 0, self._rng(epoch, rank, worker))
            return
        if self.config.resampled:
            capacities = [1.0] * workers
        else:
            capacities = [self._capacity(mine[w::workers]) for w in range(workers)]
        shares = self._worker_shares(quota, capacities)
        skips, next_role = self._worker_skip(skip, shares)
        # A resumed epoch must continue with the role whose batch came next, but the loader
        # always asks worker 0 first: so worker w plays role w + next_role. With no skip this
        # is wds.split_by_worker's split, islice(shards, worker, None, workers).
        role = (worker + next_role) % workers
        rng = self._rng(epoch, rank, role)
        if self.config.resampled:
            samples = self._decoded(self._resampled(rng), rng, skips[role])
            yield from self._take(samples, shares[role])
        else:
            yield from self._passes(mine[role::workers], shares[role], skips[role], rng)

    def _capacity(self, ids: list[int]) -> float:
        """Samples in these shards (their number when the counts are unknown)."""
        return float(sum(self.counts[i] for i in ids) if self.counts is not None else len(ids))

    def _passes(
        self, ids: list[int], quota: int | None, skip: int, rng: random.Random
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """One pass over `ids`; for training, more passes until `quota` samples came out.
        The first `skip` samples count towards the quota but are not yielded."""
        produced = 0
        while True:
            got = 0
            stream = self._decoded(self._read(ids), rng, max(skip - produced, 0))
            with closing(stream):  # stopping early must close the shard (and end its pipe)
                for item in stream:
                    if item is not None:
                        yield item
                    produced, got = produced + 1, got + 1
                    if quota is not None and produced >= quota:
                        return
            if quota is None or not self.config.train or got == 0:
                return
            log.warning("topping up %d samples from the same shards", quota - produced)

    @staticmethod
    def _take(items: Iterator[Any], count: int) -> Iterator[Any]:
        """The first `count` items, less the skipped ones (None), closing the source."""
        with closing(items):  # type: ignore[type-var]
            for i, item in enumerate(items):
                if i >= count:
                    return
                if item is not None:
                    yield item

    def _resampled(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Shards drawn with replacement, forever: the quota ends the epoch."""
        empty = 0
        while True:
            index = rng.randrange(len(self.urls))
            read = 0
            for sample in self._read_shard(index):
                read += 1
                yield sample
            empty = 0 if read else empty + 1
            if empty > MAX_EMPTY_DRAWS + 2 * len(self.urls):  # never loop forever on bad data
                raise ShardError(
                    f"dataset '{NAME}': {empty} shards in a row yielded no samples "
                    f"(last: {self.urls[index]!r}); are the shards readable?"
                )

    def _read(self, ids: Iterable[int]) -> Iterator[dict[str, Any]]:
        for index in ids:
            yield from self._read_shard(index)

    def _decoded(
        self, samples: Iterator[dict[str, Any]], rng: random.Random, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, int] | None]:
        """Decoded, transformed items; the first `skip` good ones are decoded (so a corrupt
        sample counts as it would have) but come out as None, without the transform's cost."""
        import webdataset as wds

        if self.shuffling:
            samples = wds.shuffle(self.config.shuffle, initial=self.config.shuffle, rng=rng)(
                samples
            )
        failures = 0
        with closing(samples):  # type: ignore[type-var]
            for sample in samples:
                item = self._decode(sample, transform=skip <= 0)
                if item is not None:
                    failures = 0
                    skip -= 1
                    yield item if skip < 0 else None
                    continue
                failures += 1
                if failures >= MAX_FAILURES:  # systematic, not a few bad bytes
                    raise ShardError(
                        f"dataset '{NAME}': {failures} samples in a row failed to decode "
                        f"(last in {sample.get('__url__')!r}); see the warnings above"
                    )

    def _decode(self, sample: dict[str, Any], transform: bool = True) -> Any:
        """(image, label); None when the sample is corrupt (and not strict); True when it is
        fine but `transform` is off."""
        try:
            label = decode_label(sample, self.info.num_classes)
            image = decode_image(sample, self.info.channels, self.config.stored_size)
        except SAMPLE_ERRORS as exc:
            self._skip(
                f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')!r} is corrupt "
                f"({_reason(exc)})"
            )
            return None
        return (self.transform(image), label) if transform else True

    def _read_shard(self, index: int) -> Iterator[dict[str, Any]]:
        """The samples of one shard, as dicts of raw bytes; a bad shard is skipped or raised."""
        url, read, finished = self.urls[index], 0, False
        try:
            stream = open_shard(url)
            try:
                for sample in read_samples(url, stream, self.config.max_member_bytes):
                    read += 1
                    yield sample
                finished = True
            finally:
                if finished:
                    stream.close()  # a pipe's exit status is checked here
                else:  # stopped early (quota reached) or failed: the status means nothing
                    with suppress(Exception):
                        stream.close()
        except READ_ERRORS as exc:
            self._skip(f"shard {url!r} is unreadable after {read} samples ({_reason(exc)})")
            return
        expected = self.counts[index] if self.counts is not None else None
        if expected is not None and read < expected:
            self._skip(f"shard {url!r} ended after {read} of {expected} samples (truncated?)")

    def _skip(self, message: str) -> None:
        if self.config.strict:
            raise ShardError(f"dataset '{NAME}': {message}")
        self._skips.add()
        log.warning("skipping: %s", message)


def _reason(exc: BaseException) -> str:
    """The first line of an exception, without the stream webdataset appends to its args."""
    first = str(exc.args[0]) if exc.args else type(exc).__name__
    status = re.search(r": exit (-?\d+) \(read\)", first)  # a failed pipe: command
    if status:
        return f"its command exited with status {status.group(1)}"
    return first.split(" @ ")[0].splitlines()[0] if first else type(exc).__name__
