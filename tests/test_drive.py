"""The certification driver: examples certified together get the counts they get alone, in
fewer forward passes, with no thread; exceptions end it at once; API-1 certifiers still run."""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest
import torch
import torch.nn as nn

from dmae_cli.api import Certificate, CertifyRequest, CountsFn, certifier_api
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.drive import certify_all, counts_of, predict_all
from dmae_cli.smoothing.sampler import Sampler, example_generator
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import Sequential

CPU = torch.device("cpu")
REQUEST = CertifyRequest(0.25, 0.001, 50, 2000, radii=(0.25, 0.5))


class PixelVote(nn.Module):
    """Votes for the brightest of the first ten pixels: each row's answer is exactly the same
    whatever else is in its batch, so counts can be compared for equality."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return x.flatten(1)[:, :10]


def sampler(model: nn.Module, batch_size: int = 256, parallel: int = 1) -> Sampler:
    return Sampler(
        model, sigma=0.5, num_classes=10, batch_size=batch_size, device=CPU, parallel=parallel
    )


def images(count: int) -> list[torch.Tensor]:
    return list(torch.rand((count, 1, 4, 4), generator=torch.Generator().manual_seed(0)))


def examples(
    pictures: list[torch.Tensor], seed: int = 0
) -> list[tuple[torch.Tensor, torch.Generator]]:
    return [(p, example_generator(seed, i, CPU)) for i, p in enumerate(pictures)]


class Plan:
    """An API-2 certifier asking for `sizes[request.n0]` copies in turn (the plan is picked
    by n0), returning every answer it got as its 'certificate'."""

    name = "plan"

    def __init__(self, *plans: list[int], fail_after: int | None = None) -> None:
        self.plans, self.fail_after = plans, fail_after
        self.finished: list[int] = []

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, list]:
        answers = []
        for size in self.plans[request.n0]:
            answers.append((yield size).tolist())
            if self.fail_after == request.n0 and len(answers) == 1:
                raise ValueError("certifier bug")
        self.finished.append(request.n0)
        return answers

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]:
        return int((yield self.plans[request.n0][0]).argmax())


def plan_requests(count: int) -> list[CertifyRequest]:
    return [CertifyRequest(0.5, 0.001, n0=i, n=1) for i in range(count)]


def alone(plans: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Each plan's answers through the sampler's own `counts`, one example at a time."""
    out = []
    for idx, (image, plan) in enumerate(zip(images(len(plans)), plans, strict=True)):
        counts = sampler(PixelVote(), batch_size).counts(image, example_generator(0, idx, CPU))
        out.append([counts(size).tolist() for size in plan])
    return out


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_together_gives_each_example_exactly_the_counts_it_gets_alone(batch_size: int) -> None:
    plans = [[5, 300, 17], [64], [1, 1, 1, 900], [250, 250], [0, 3]]  # of different lengths
    model = PixelVote()
    pooled = sampler(model, batch_size)
    got = certify_all(pooled, examples(images(5)), Plan(*plans), plan_requests(5))
    assert got == alone(plans, batch_size)
    assert pooled.drawn == sum(map(sum, plans))
    assert max(model.batches) <= batch_size


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_results_do_not_depend_on_the_size_of_the_group(size: int) -> None:
    pictures = leading([0.0, 0.6, 1.0, 1.3, 1.6, 2.2, 3.0, 0.3])
    certs = []
    for start in range(0, 8, size):
        group = examples(pictures, seed=1)[start : start + size]
        certs += certify_all(sampler(PixelVote()), group, Sequential(), [REQUEST] * len(group))
    one_by_one = [
        certify_all(sampler(PixelVote()), [example], Sequential(), [REQUEST])[0]
        for example in examples(pictures, seed=1)
    ]
    assert certs == one_by_one and len({c.n for c in certs}) > 1  # stopped at different sizes


def leading(leads: list[float]) -> list[torch.Tensor]:
    """Grey 1x3x4 images whose first pixel leads by `leads`: pA from a tie to near 1."""
    pictures = [torch.full((1, 3, 4), 0.5) for _ in leads]
    for picture, lead in zip(pictures, leads, strict=True):
        picture[0, 0, 0] += lead
    return pictures


def test_small_requests_of_several_examples_share_one_forward_pass() -> None:
    model = PixelVote()
    certify_all(sampler(model), examples(images(8)), Plan(*[[20, 30]] * 8), plan_requests(8))
    assert model.batches == [160, 240]  # one pass per round instead of one per request


def test_requests_straddle_passes_so_that_the_passes_are_full_and_equal() -> None:
    model = PixelVote()
    certify_all(sampler(model), examples(images(4)), Plan(*[[150]] * 4), plan_requests(4))
    assert model.batches == [200, 200, 200]  # whole requests would leave gaps: 150 x 4 passes


def test_parallel_passes_are_a_multiple_of_the_threads_and_count_the_same() -> None:
    def run(parallel: int) -> tuple[list, list[int]]:
        model = PixelVote()
        got = certify_all(
            sampler(model, parallel=parallel),
            examples(images(4)),
            Plan(*[[150, 70]] * 4),
            plan_requests(4),
        )
        return got, model.batches

    one, passes_one = run(1)
    two, passes_two = run(2)
    assert one == two  # each example's counts, request by request
    assert passes_one == [200] * 3 + [140] * 2 and sorted(passes_two) == [140] * 2 + [150] * 4


def test_a_failing_certifier_is_raised_at_once_and_the_others_are_closed() -> None:
    plan = Plan([3, 4], [3, 4, 5], fail_after=0)
    model = PixelVote()
    with pytest.raises(UserError, match="^certifier 'plan': certifier bug$") as raised:
        certify_all(sampler(model), examples(images(2)), plan, plan_requests(2))
    assert isinstance(raised.value.__cause__, ValueError)  # DMAE_DEBUG=1 shows its traceback
    assert plan.finished == [] and model.batches == [6]  # no round after the failure


class FailsOnPass(PixelVote):
    def __init__(self, failing: int) -> None:
        super().__init__()
        self.failing = failing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.batches) + 1 == self.failing:
            raise RuntimeError("model failed")
        return super().forward(x)


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_failing_model_ends_the_group_with_no_thread_left(failing: int) -> None:
    threads = threading.active_count()
    closed: list[int] = []

    class Watched(Plan):
        def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, list]:
            try:
                return (yield from super().certify(request))
            finally:
                closed.append(request.n0)

    with pytest.raises(RuntimeError, match="model failed"):
        certify_all(
            sampler(FailsOnPass(failing)),
            examples(images(4)),
            Watched(*[[20, 30, 40]] * 4),
            plan_requests(4),
        )
    assert sorted(closed) == [0, 1, 2, 3] and threading.active_count() == threads


@pytest.mark.parametrize("bad", [-1, 2.5, True, None])
def test_a_yield_that_is_no_count_of_copies_is_refused(bad: object) -> None:
    class Bad:
        name = "bad"

        def certify(self, request: CertifyRequest) -> Generator[object, torch.Tensor, None]:
            yield bad

        predict = certify

    with pytest.raises(UserError, match="certifier 'bad': .*noisy copies"):
        certify_all(sampler(PixelVote()), examples(images(1)), Bad(), [REQUEST])


def test_an_api_2_certify_that_is_no_generator_is_one_line() -> None:
    class Eager:
        name = "eager"

        def certify(self, request: CertifyRequest) -> Certificate:
            return Certificate(-1, 0.0, 0, 0, 0)

        predict = certify

    with pytest.raises(UserError, match="'eager': certify.request. returned Certificate, not a"):
        certify_all(sampler(PixelVote()), examples(images(1)), Eager(), [REQUEST])


class CohenV1:
    """Cohen's CERTIFY written against API 1 (a `counts` callback), as plugins were."""

    name = "cohen-v1"

    def certify(self, counts: CountsFn, request: CertifyRequest) -> Certificate:
        running = Cohen().certify(request)
        num = next(running)
        try:
            while True:
                num = running.send(counts(num))
        except StopIteration as done:
            return done.value

    def predict(self, counts: CountsFn, request: CertifyRequest) -> int:
        return int(counts(request.n).argmax())


def test_an_api_1_certifier_runs_one_example_at_a_time_with_the_same_results() -> None:
    assert (certifier_api(CohenV1()), certifier_api(Cohen())) == (1, 2)
    model = PixelVote()
    v1 = certify_all(sampler(model), examples(images(3)), CohenV1(), [REQUEST] * 3)
    assert model.batches == [50] + [250] * 8 + [50] + [250] * 8 + [50] + [250] * 8
    v2 = certify_all(sampler(PixelVote()), examples(images(3)), Cohen(), [REQUEST] * 3)
    assert v1 == v2
    guesses = predict_all(sampler(PixelVote()), examples(images(3)), CohenV1(), [REQUEST] * 3)
    tops = [
        int(sampler(PixelVote()).counts(image, generator)(REQUEST.n).argmax())
        for image, generator in examples(images(3))
    ]
    assert guesses == tops


def test_predict_all_packs_and_matches_one_by_one() -> None:
    pictures = [torch.full((1, 3, 4), 0.5) for _ in range(3)]
    for picture, lead in zip(pictures, (0.0, 1.0, 3.0), strict=True):
        picture[0, 0, 0] += lead  # no clear winner, a likely one, a sure one
    request = CertifyRequest(0.25, 0.001, 50, 500)
    model = PixelVote()
    together = predict_all(sampler(model), examples(pictures), Cohen(), [request] * 3)
    assert model.batches == [250] * 6
    alone = [
        predict_all(sampler(PixelVote()), [e], Cohen(), [request])[0] for e in examples(pictures)
    ]
    assert together == alone and together[2] == 0 and together[0] == -1


def test_sequential_sees_a_prefix_of_cohens_noise_so_the_two_compare_paired() -> None:
    # One seed, one stream per example: whatever sizes sequential asks for (and packed with
    # other examples), its selection and first m estimation copies are cohen's, so at m
    # copies it counts exactly what cohen counts.
    # 12 pixels: torch's CPU generator happens to split evenly at multiples of 16 numbers.
    pictures = [torch.full((1, 3, 4), 0.5) for _ in range(4)]
    for picture, lead in zip(pictures, (1.0, 1.3, 1.6, 2.2), strict=True):
        picture[0, 0, 0] += lead  # pA from about 0.7 to 0.99: stops at many different sizes
    sequential = certify_all(
        sampler(PixelVote()), examples(pictures, seed=3), Sequential(), [REQUEST] * 4
    )
    for i, cert in enumerate(sequential):
        same_n = CertifyRequest(0.25, 0.001, 50, cert.n, radii=(0.25, 0.5))
        [cohen] = certify_all(sampler(PixelVote()), [examples(pictures, 3)[i]], Cohen(), [same_n])
        assert (cert.count_top, cert.n) == (cohen.count_top, cohen.n)


def test_mismatched_examples_and_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="2 examples but 1 requests"):
        certify_all(sampler(PixelVote()), examples(images(2)), Cohen(), [REQUEST])


def test_counts_of_one_image_through_the_driver_are_the_samplers_own() -> None:
    image = images(1)[0]
    through_driver = counts_of(sampler(PixelVote(), 64), image, example_generator(0, 0, CPU))
    own = sampler(PixelVote(), 64).counts(image, example_generator(0, 0, CPU))
    for size in (5, 300, 1, 64):
        assert torch.equal(through_driver(size), own(size))


def test_certifier_code_runs_in_the_calling_thread() -> None:
    where: set[int] = set()

    class Watched(Plan):
        def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, list]:
            where.add(threading.get_ident())
            answers = yield from super().certify(request)
            where.add(threading.get_ident())
            return answers

    certify_all(sampler(PixelVote()), examples(images(4)), Watched(*[[9, 9]] * 4), plan_requests(4))
    assert where == {threading.get_ident()}


class Buggy:
    """A certifier whose own code fails after its first draw, in either API."""

    name = "buggy"

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
        yield 4
        raise KeyError("oops")

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]:
        yield 4
        return 0


class BuggyV1(CohenV1):
    name = "buggy-v1"

    def certify(self, counts: CountsFn, request: CertifyRequest) -> Certificate:
        counts(4)
        raise KeyError("oops")


@pytest.mark.parametrize("certifier", [Buggy(), BuggyV1()], ids=["api2", "api1"])
def test_a_bug_in_a_certifier_is_one_line_naming_it(certifier: object) -> None:
    name = certifier.name  # type: ignore[attr-defined]
    with pytest.raises(UserError, match=f"^certifier '{name}' failed: KeyError: 'oops' ") as hit:
        certify_all(sampler(PixelVote()), examples(images(2)), certifier, plan_requests(2))
    assert "DMAE_DEBUG=1" in str(hit.value) and isinstance(hit.value.__cause__, KeyError)


def test_the_models_failure_under_an_api_1_certifier_is_not_blamed_on_it() -> None:
    with pytest.raises(RuntimeError, match="model failed"):
        certify_all(sampler(FailsOnPass(1)), examples(images(1)), CohenV1(), plan_requests(1))
