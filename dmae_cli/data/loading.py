"""Data for every stage: a registered data set built from the recipe, and the loaders that feed
training in an order fixed by (seed, epoch), resumable part-way through an epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from dmae_cli.config.recipe import DataConfig, Recipe
from dmae_cli.plugins.boundary import build_dataset
from dmae_cli.runtime import distributed


def load_dataset(recipe: Recipe, split: str, augment: bool) -> Any:
    """A data set from the registry, configured by the recipe's `data` section; what the plugin
    raises, an empty split and a wrong first item end in one line naming it (plugins/boundary)."""
    data = recipe.data
    return build_dataset(
        data.dataset,
        split,
        root=data.root,
        image_size=data.image_size,
        augment=augment,
        options=data.options,
    )


def build_loader(
    dataset: Dataset, data: DataConfig, batch_size: int, seed: int, train: bool = True
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch); `set_epoch(loader, epoch)` sets it.

    Map-style data goes through `DistributedSampler` on one process too (one replica), so the
    single- and multi-process paths are one code path and a resumed epoch sees the same order.
    An `IterableDataset` (webdataset shards) splits itself by node and worker; its `len` is the
    number of samples this rank sees per epoch.
    """
    workers = dict(
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
        persistent_workers=data.persistent_workers and data.num_workers > 0,
        # Every new iterator draws its workers' base seed from this generator; without one
        # it draws from the global RNG, so a run resumed inside an epoch (which starts an
        # iterator the interrupted run did not) would continue with other noise and masks.
        generator=torch.Generator().manual_seed(seed),
    )
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_batch_size"):  # whole batches per worker: every rank's len agrees
            dataset.set_batch_size(batch_size)
        return DataLoader(dataset, batch_size=batch_size, drop_last=train, **workers)
    sampler = ResumableSampler(
        dataset,
        num_replicas=distributed.world_size(),
        rank=distributed.rank(),
        shuffle=train,
        seed=seed,
        drop_last=train,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        **workers,
    )


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that can start part-way through an epoch, after an interruption."""

    skip = 0  # samples of this rank's epoch order already trained on

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def set_epoch(loader: DataLoader, epoch: int, skip: int = 0) -> None:
    """Reseed the loader's shuffling (and its workers' seeds) for `epoch`, starting `skip`
    samples into this rank's order, so a resumed epoch repeats an uninterrupted one exactly."""
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip
    elif hasattr(loader.dataset, "set_epoch"):  # an iterable data set orders and skips itself
        extra = {"skip": skip} if skip else {}
        loader.dataset.set_epoch(epoch, **extra)
    if loader.generator is not None:
        loader.generator.manual_seed(loader.generator.initial_seed() + epoch)
