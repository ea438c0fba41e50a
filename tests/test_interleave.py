"""Certifying examples together: the same counts as one at a time, in fewer forward passes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from dmae_cli.api import CertifyRequest, CountsFn
from dmae_cli.smoothing.interleave import certify_together
from dmae_cli.smoothing.sampler import Sampler, example_generator
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import Sequential

CPU = torch.device("cpu")


class PixelVote(nn.Module):
    """Votes for the brightest of the first ten pixels: each row's answer is exactly the same
    whatever else is in its batch, so counts can be compared for equality."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return x.flatten(1)[:, :10]


def sampler(model: nn.Module, batch_size: int = 256) -> Sampler:
    return Sampler(model, sigma=0.5, num_classes=10, batch_size=batch_size, device=CPU)


def images(count: int) -> list[torch.Tensor]:
    return list(torch.rand((count, 1, 4, 4), generator=torch.Generator().manual_seed(0)))


def draws(sizes: list[int]):
    """A task asking for `sizes` copies in turn, returning every answer."""
    return lambda counts: [counts(size).tolist() for size in sizes]


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_together_gives_each_example_exactly_the_counts_it_gets_alone(batch_size: int) -> None:
    plans = [[5, 300, 17], [64], [1, 1, 1, 900], [250, 250]]  # tasks of different lengths
    alone = []
    for idx, (image, plan) in enumerate(zip(images(4), plans, strict=True)):
        counts = sampler(PixelVote(), batch_size).counts(image, example_generator(0, idx, CPU))
        alone.append([counts(size).tolist() for size in plan])
    model = PixelVote()
    pooled = sampler(model, batch_size)
    tasks = [
        (image, example_generator(0, idx, CPU), draws(plan))
        for idx, (image, plan) in enumerate(zip(images(4), plans, strict=True))
    ]
    assert certify_together(pooled, tasks) == alone
    assert pooled.drawn == sum(map(sum, plans))
    assert max(model.batches) <= batch_size


def test_small_requests_of_several_examples_share_one_forward_pass() -> None:
    model = PixelVote()
    tasks = [
        (image, example_generator(0, i, CPU), draws([20, 30])) for i, image in enumerate(images(8))
    ]
    certify_together(sampler(model), tasks)
    assert model.batches == [160, 240]  # one pass per round instead of one per request


def test_requests_straddle_passes_so_that_the_passes_are_full_and_equal() -> None:
    model = PixelVote()
    tasks = [
        (image, example_generator(0, i, CPU), draws([150])) for i, image in enumerate(images(4))
    ]
    certify_together(sampler(model), tasks)
    assert model.batches == [200, 200, 200]  # whole requests would leave gaps: 150 x 4 passes


def test_parallel_passes_are_a_multiple_of_the_threads_and_count_the_same() -> None:
    def run(parallel: int) -> tuple[list[list[list[int]]], list[int]]:
        model = PixelVote()
        tasks = [
            (image, example_generator(0, i, CPU), draws([150, 70]))
            for i, image in enumerate(images(4))
        ]
        together = Sampler(
            model, sigma=0.5, num_classes=10, batch_size=256, device=CPU, parallel=parallel
        )
        return certify_together(together, tasks), model.batches

    one, passes_one = run(1)
    two, passes_two = run(2)
    assert one == two  # each example's counts, request by request
    assert passes_one == [200] * 3 + [140] * 2 and sorted(passes_two) == [140] * 2 + [150] * 4


def test_a_failing_task_is_raised_after_the_others_finish() -> None:
    def broken(counts: CountsFn) -> None:
        counts(3)
        raise ValueError("certifier bug")

    finished: list[int] = []

    def fine(counts: CountsFn) -> None:
        counts(3), counts(4)
        finished.append(1)

    tasks = [(images(1)[0], example_generator(0, i, CPU), t) for i, t in enumerate([broken, fine])]
    with pytest.raises(ValueError, match="certifier bug"):
        certify_together(sampler(PixelVote()), tasks)
    assert finished == [1]


def test_sequential_certificates_are_the_same_together_and_alone() -> None:
    request = CertifyRequest(0.25, 0.001, 50, 2000, radii=(0.25, 0.5))
    rng = np.random.default_rng(0)
    pictures = [torch.from_numpy(rng.random((1, 4, 4), dtype=np.float32)) for _ in range(6)]
    alone = [
        Sequential().certify(sampler(PixelVote()).counts(p, example_generator(1, i, CPU)), request)
        for i, p in enumerate(pictures)
    ]
    tasks = [
        (p, example_generator(1, i, CPU), lambda c: Sequential().certify(c, request))
        for i, p in enumerate(pictures)
    ]
    assert certify_together(sampler(PixelVote()), tasks) == alone


def test_sequential_sees_a_prefix_of_cohens_noise_so_the_two_compare_paired() -> None:
    # One seed, one stream per example: whatever sizes sequential asks for (and packed with
    # other examples), its selection and first m estimation copies are cohen's, so at m
    # copies it counts exactly what cohen counts.
    request = CertifyRequest(0.25, 0.001, 50, 2000, radii=(0.25, 0.5))
    # 12 pixels: torch's CPU generator happens to split evenly at multiples of 16 numbers.
    pictures = [torch.full((1, 3, 4), 0.5) for _ in range(4)]
    for picture, lead in zip(pictures, (1.0, 1.3, 1.6, 2.2), strict=True):
        picture[0, 0, 0] += lead  # pA from about 0.7 to 0.99: stops at many different sizes
    tasks = [
        (p, example_generator(3, i, CPU), lambda c: Sequential().certify(c, request))
        for i, p in enumerate(pictures)
    ]
    for i, sequential in enumerate(certify_together(sampler(PixelVote()), tasks)):
        same_n = CertifyRequest(0.25, 0.001, 50, sequential.n, radii=(0.25, 0.5))
        counts = sampler(PixelVote()).counts(pictures[i], example_generator(3, i, CPU))
        cohen = Cohen().certify(counts, same_n)
        assert (sequential.count_top, sequential.n) == (cohen.count_top, cohen.n)


class FailsOnPass(PixelVote):
    def __init__(self, failing: int) -> None:
        super().__init__()
        self.failing = failing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.batches) + 1 == self.failing:
            raise RuntimeError("model failed")
        return super().forward(x)


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_failing_model_stops_every_task_and_leaves_no_thread_waiting(failing: int) -> None:
    tasks = [
        (image, example_generator(0, i, CPU), draws([20, 30, 40]))
        for i, image in enumerate(images(4))
    ]
    with pytest.raises(RuntimeError, match="model failed"):
        certify_together(sampler(FailsOnPass(failing)), tasks)
    assert not [t for t in threading.enumerate() if t.name.startswith("certify-")]
