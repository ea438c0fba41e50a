"""The certifiers: exact statistics against scipy, the contract, and simulated guarantees.

A synthetic base classifier with known class probabilities stands in for a network:
`dmae_cli.api.simulate` answers each request a certifier's generator yields with one
multinomial draw, so thousands of certifications take a few seconds and the true radius
sigma * PhiInverse(pA) is known exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import beta, binomtest, norm

from dmae_cli.api import (
    ABSTAIN,
    Certificate,
    Certifier,
    CertifyRequest,
    CountsFn,
    cohen_bound,
    gaussian_radius,
    simulate,
)
from dmae_cli.api import clopper_pearson_lower as cp_lower
from dmae_cli.plugins import registry
from dmae_plugins.certifiers._bounds import cp_upper, thresholds
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import (
    Sequential,
    chance_to_certify,
    fewest_hopeful_votes,
    votes_needed,
)

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
BUILTIN = ("cohen", "sequential")


def scripted(*answers: Sequence[int]) -> tuple[CountsFn, list[int]]:
    """A source of counts for `simulate` that returns `answers` in turn and records how many
    samples it was asked for each time."""
    calls: list[int] = []

    def counts(num: int) -> torch.Tensor:
        calls.append(num)
        return torch.tensor(answers[len(calls) - 1], dtype=torch.int64)

    return counts, calls


def synthetic(probs: Sequence[float], rng: np.random.Generator) -> CountsFn:
    """A base classifier whose noisy votes follow `probs` exactly, one multinomial per draw."""
    p = np.asarray(probs, dtype=np.float64)
    return lambda num: torch.from_numpy(rng.multinomial(num, p / p.sum()))


def build(name: str) -> Certifier:
    return registry.certifiers.get(name)()


# -- Cohen: exact numbers -------------------------------------------------------------------
PAIRS = [
    (n_a, n) for n in (1, 2, 10, 100, 1000, 10_000, 100_000) for n_a in {0, 1, n // 2, n - 1, n}
]
PAIRS += [
    (int(k), int(n))
    for n, k in np.random.default_rng(0).integers(1, 10**5, size=(200, 2))
    if k <= n
]


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_cohen_radius_is_exactly_the_clopper_pearson_radius(alpha: float) -> None:
    sigma = 0.5
    for n_a, n in PAIRS:
        counts, _ = scripted([0, 7, 0], [n - n_a, n_a, 0])
        cert = simulate(Cohen(), CertifyRequest(sigma, alpha, n0=7, n=n), counts)
        p_lower = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
        assert cert.count_top == n_a and cert.n == n and cert.n0 == 7
        if p_lower < 0.5:
            assert cert.prediction == ABSTAIN and cert.radius == 0.0, (n_a, n)
        else:
            assert cert.prediction == 1, (n_a, n)
            assert cert.radius == sigma * norm.ppf(p_lower), (n_a, n)


def test_cohen_abstains_exactly_below_one_half() -> None:
    n, alpha = 1000, 0.001
    k = next(k for k in range(n + 1) if cp_lower(k, n, alpha) >= 0.5)  # first certified count
    below, _ = scripted([5, 0], [k - 1, n - k + 1])
    at, _ = scripted([5, 0], [k, n - k])
    request = CertifyRequest(1.0, alpha, n0=5, n=n)
    assert simulate(Cohen(), request, below).prediction == ABSTAIN
    cert = simulate(Cohen(), request, at)
    assert cert.prediction == 0 and cert.radius >= 0.0


def test_cohen_predict_matches_binomtest() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        n_a, n_b, rest = (int(x) for x in rng.integers(0, 60, size=3))
        votes = [rest // 2, n_a, n_b, rest - rest // 2]
        counts, _ = scripted(votes)
        alpha = float(rng.choice([0.001, 0.01, 0.05, 0.2]))
        request = CertifyRequest(0.25, alpha, n0=1, n=sum(votes))
        got = simulate(Cohen(), request, counts, predict=True)
        top = int(np.argmax(votes))
        second = max(v for c, v in enumerate(votes) if c != top)
        expected = top if binomtest(votes[top], votes[top] + second, 0.5).pvalue <= alpha else -1
        assert got == expected, (votes, alpha)


@given(st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_clopper_pearson_bounds_are_ordered_and_mirror(pair: tuple[int, int]) -> None:
    k, n = pair
    lower, upper = cp_lower(k, n, 0.01), cp_upper(k, n, 0.01)
    assert 0.0 <= lower <= k / n <= upper <= 1.0
    assert math.isclose(upper, 1.0 - cp_lower(n - k, n, 0.01), abs_tol=1e-12)


def test_bounds_are_scipys_distribution_quantiles_bit_for_bit() -> None:
    rng = np.random.default_rng(4)
    for n in (*range(1, 30), *(int(x) for x in rng.integers(30, 10**6, size=300))):
        k, alpha = int(rng.integers(0, n + 1)), float(rng.choice([1e-5, 1e-3, 0.05, 0.3]))
        assert cp_lower(k, n, alpha) == (beta.ppf(alpha, k, n - k + 1) if k else 0.0)
        assert cp_upper(k, n, alpha) == (beta.ppf(1 - alpha, k + 1, n - k) if k < n else 1.0)
        p = cp_lower(k, n, alpha)
        if p >= 0.5:
            assert gaussian_radius(0.5, p) == 0.5 * norm.ppf(p)
        else:
            assert math.isnan(gaussian_radius(0.5, p))  # no radius: abstain
    assert thresholds(0.25, RADII)[1:] == sorted({norm.cdf(r / 0.25) for r in RADII[1:]})


def test_cohen_bound_on_arrays_is_the_scalar_one_and_scipys_distributions_bit_for_bit() -> None:
    """`dmae report --alpha` passes arrays, certifiers numbers: the same radius either way, and
    the one the report computed with scipy.stats before the two shared `cohen_bound`."""
    rng = np.random.default_rng(5)
    n = rng.integers(0, 10**6, size=5000)
    n[:50] = 0  # rows whose estimation was skipped
    k = np.minimum((rng.random(n.size) * (n + 1)).astype(np.int64), n)
    k[50:100] = n[50:100]  # every vote for the top class
    for alpha in (1e-6, 0.001, 0.05, 0.4):
        bound = cohen_bound(0.25, k, n, alpha)
        kf = k.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            p_lower = np.where(kf > 0, beta.ppf(alpha, np.maximum(kf, 1), n - kf + 1), 0.0)
            radius = np.where(p_lower >= 0.5, 0.25 * norm.ppf(p_lower), np.nan)
        assert np.array_equal(bound.radius, radius, equal_nan=True)
        for i in range(0, n.size, 97):
            one = cohen_bound(0.25, int(k[i]), int(n[i]), alpha)
            assert one.pa_lower == bound.pa_lower[i]
            both_nan = math.isnan(one.radius) and np.isnan(bound.radius[i])
            assert one.radius == bound.radius[i] or both_nan


def test_thresholds_always_include_one_half() -> None:
    assert thresholds(0.5, ()) == [0.5]
    assert thresholds(0.5, (0.0, 0.5, 0.5, 1.0)) == [0.5, norm.cdf(1.0), norm.cdf(2.0)]


# -- every registered certifier honours the contract -----------------------------------------
@pytest.mark.parametrize("name", registry.certifiers.names())
def test_registered_certifier_honours_the_contract(name: str) -> None:
    certifier = build(name)
    assert isinstance(certifier, Certifier) and certifier.name
    rng = np.random.default_rng(2)
    request = CertifyRequest(0.5, 0.01, n0=50, n=2000, radii=RADII)
    cert = simulate(certifier, request, synthetic([0.02, 0.95, 0.03], rng))
    assert isinstance(cert, Certificate)
    assert cert.prediction == 1 and cert.radius > 0 and 0 < cert.n <= 2000 and cert.n0 == 50
    assert simulate(certifier, request, synthetic([0.02, 0.95, 0.03], rng), predict=True) == 1


@pytest.mark.parametrize("name", BUILTIN)
def test_selection_samples_never_enter_the_bound(name: str) -> None:
    # Selection is unanimous for class 0, estimation never sees it: no certificate may follow.
    calls: list[int] = []

    def counts(num: int) -> torch.Tensor:
        calls.append(num)
        return torch.tensor([num, 0] if len(calls) == 1 else [0, num])

    cert = simulate(build(name), CertifyRequest(0.5, 0.001, n0=100, n=1000, radii=RADII), counts)
    assert cert.prediction == ABSTAIN and cert.count_top == 0
    assert calls[0] == 100 and cert.n == sum(calls[1:]) <= 1000


@pytest.mark.parametrize("name", BUILTIN)
def test_skip_wrong_shortcut_stops_after_selection(name: str) -> None:
    counts, calls = scripted([3, 90, 7])
    request = CertifyRequest(0.5, 0.001, n0=100, n=10_000, radii=RADII, label=0)
    cert = simulate(build(name), request, counts)
    assert calls == [100]
    assert (cert.prediction, cert.radius, cert.n, cert.extra["stop"]) == (1, 0.0, 0, "skipped")
    right = synthetic([1.0, 0.0, 0.0], np.random.default_rng(0))
    cert = simulate(build(name), CertifyRequest(0.5, 0.001, 100, 10_000, RADII, label=0), right)
    assert cert.prediction == 0 and cert.radius > 0  # the right class is certified as usual


def test_sequential_looks_are_geometric_and_end_at_the_budget() -> None:
    assert Sequential(growth=2.0).looks(1000) == [125, 250, 500, 1000]
    assert Sequential(growth=2.0).looks(100_000)[-3:] == [25_000, 50_000, 100_000]
    assert Sequential().looks(10) == [10]
    assert Sequential(first=10, growth=3.0).looks(100) == [12, 34, 100]
    with pytest.raises(ValueError, match="growth"):
        Sequential(growth=1.0)
    with pytest.raises(ValueError, match="first"):
        Sequential(first=0)
    with pytest.raises(ValueError, match="last_share"):
        Sequential(last_share=0.0)
    with pytest.raises(ValueError, match="futility"):
        Sequential(futility=1.0)
    with pytest.raises(ValueError, match="check_growth"):
        Sequential(check_growth=1)


@pytest.mark.parametrize(("first", "ratio"), [(1, 1.05), (1, 1.15), (5, 1.001), (64, 1.05)])
def test_sequential_schedules_end_at_the_budget_and_always_grow(first: int, ratio: float) -> None:
    # Rounding up n / ratio repeats a small size forever near 1 / (ratio - 1): this hung once.
    for schedule in (
        Sequential(first=first, growth=ratio).looks(100),
        Sequential(first=first, check_growth=ratio).checks(100),
    ):
        assert schedule[-1] == 100 and schedule[0] >= min(first, 100)
        assert all(a < b for a, b in itertools.pairwise(schedule))


def test_sequential_checks_futility_between_looks_at_no_cost_in_alpha() -> None:
    sequential = Sequential()
    looks, checks = sequential.looks(10_000), sequential.checks(10_000)
    assert set(looks) <= set(checks) and len(checks) > 2 * len(looks)
    # Levels are spent at the looks alone, so the checks leave the union bound as it was.
    assert math.isclose(sum(sequential.levels(0.001, len(looks))), 0.001, rel_tol=1e-12)


@pytest.mark.parametrize(("looks", "share"), [(1, 0.8), (13, 0.8), (5, 0.5), (4, 1.0)])
def test_sequential_levels_spend_exactly_alpha_and_most_of_it_last(
    looks: int, share: float
) -> None:
    levels = Sequential(last_share=share).levels(0.001, looks)
    assert len(levels) == looks and min(levels) >= 0
    assert math.isclose(sum(levels), 0.001, rel_tol=1e-12)  # the union bound's total
    assert levels[-1] == pytest.approx(0.001 if looks == 1 else 0.001 * share)


@pytest.mark.parametrize(("n", "level", "threshold"), [(100, 0.01, 0.5), (1000, 1e-4, 0.9772)])
def test_votes_needed_is_the_fewest_votes_whose_bound_reaches_the_threshold(
    n: int, level: float, threshold: float
) -> None:
    k = votes_needed(n, level, threshold)
    assert cp_lower(k, n, level) >= threshold > cp_lower(k - 1, n, level)
    assert votes_needed(10, 1e-3, 0.9) == 11  # 10 of 10 is not enough: unreachable


def test_chance_to_certify_matches_a_simulation_of_the_posterior_predictive() -> None:
    n_a, drawn, n, level, threshold = 180, 200, 1000, 1e-3, 0.86
    rng = np.random.default_rng(0)
    p = rng.beta(n_a + 1, drawn - n_a + 1, size=200_000)  # the posterior under a uniform prior
    votes = n_a + rng.binomial(n - drawn, p)
    simulated = float(np.mean(votes >= votes_needed(n, level, threshold)))
    assert chance_to_certify(n_a, drawn, n, level, threshold) == pytest.approx(simulated, abs=0.005)
    assert chance_to_certify(n, n, n, level, 0.5) == 1.0


@pytest.mark.parametrize(
    ("drawn", "n", "threshold"), [(64, 1000, 0.5), (300, 10_000, 0.9772), (5000, 10_000, 0.8413)]
)
def test_the_futility_boundary_decides_as_the_chance_itself(
    drawn: int, n: int, threshold: float
) -> None:
    # The certifier compares the votes with a cached boundary instead of computing the chance
    # at every check: the two must agree for every count, not only near the boundary.
    level, futility = 8e-4, 0.02
    boundary = fewest_hopeful_votes(drawn, n, level, threshold, futility)
    assert 0 < boundary <= drawn
    near = range(max(0, boundary - 30), min(drawn, boundary + 30) + 1)
    for n_a in sorted({*near, *range(0, drawn + 1, max(1, drawn // 50))}):
        hopeless = chance_to_certify(n_a, drawn, n, level, threshold) < futility
        assert hopeless == (n_a < boundary), n_a
    assert fewest_hopeful_votes(10, 1000, level, 0.9999, futility) == 11  # out of reach


def test_sequential_gives_up_early_on_an_input_just_below_a_threshold() -> None:
    # pA = 0.83 sits below Phi(1) = 0.841 (radius 0.5 at sigma 0.5): cohen's n = 10,000 would
    # not certify 0.5 either, so drawing the whole budget buys nothing.
    rng = np.random.default_rng(0)
    request = CertifyRequest(0.5, 0.001, 100, 10_000, radii=(0.25, 0.5, 0.75, 1.0))
    certs = [simulate(Sequential(), request, synthetic((0.83, 0.17), rng)) for _ in range(20)]
    assert np.mean([c.n for c in certs]) < 0.3 * request.n
    assert all(c.extra["stop"] == "futile" and 0.25 <= c.radius < 0.5 for c in certs)
    # Most give up at a check between looks: waiting for the next look would cost up to 15%.
    looks = set(Sequential().looks(request.n))
    assert sum(c.n not in looks for c in certs) > len(certs) / 2


# -- simulated guarantees --------------------------------------------------------------------
def failure_rate(certifier: Any, probs: Sequence[float], trials: int, seed: int) -> float:
    """How often the certificate claims more than the truth: a class other than the smoothed
    classifier's, or a radius beyond sigma * PhiInverse(pA) of the class it names."""
    rng = np.random.default_rng(seed)
    request = CertifyRequest(0.5, ALPHA, n0=20, n=1000, radii=RADII)
    failures = 0
    for _ in range(trials):
        cert = simulate(certifier, request, synthetic(probs, rng))
        if cert.abstained:
            continue
        p = probs[cert.prediction]
        failures += p <= 0.5 or cert.radius > request.sigma * norm.ppf(p)
    return failures / trials


ALPHA, TRIALS = 0.1, 2000
# pA near a certifiable boundary, where Clopper-Pearson is tight; and a near-tie for selection.
SCENARIOS = [(0.6, 0.3, 0.1), (0.8, 0.2), (0.93, 0.05, 0.02), (0.99, 0.01), (0.52, 0.48)]
MARGIN = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)  # three standard errors: 0.02


@pytest.mark.parametrize("name", BUILTIN)
def test_certified_radius_exceeds_the_truth_at_most_alpha_of_the_time(name: str) -> None:
    certifier = build(name)
    rates = [failure_rate(certifier, p, TRIALS, seed) for seed, p in enumerate(SCENARIOS)]
    assert max(rates) <= ALPHA + MARGIN, rates


def test_the_simulation_catches_a_certifier_without_a_confidence_bound() -> None:
    class PlugIn:
        name = "plug-in"

        def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
            selected = int((yield request.n0).argmax())
            p_hat = min(int((yield request.n)[selected]) / request.n, 1 - 1e-9)
            if p_hat < 0.5:
                return Certificate(ABSTAIN, 0.0, 0, request.n, request.n0)
            radius = request.sigma * norm.ppf(p_hat)
            return Certificate(selected, radius, 0, request.n, request.n0)

        predict = certify

    assert failure_rate(PlugIn(), SCENARIOS[1], 300, seed=0) > 3 * ALPHA


def mean_samples(name: str, probs: Sequence[float], sigma: float, trials: int = 20) -> float:
    rng = np.random.default_rng(3)
    request = CertifyRequest(sigma, 0.001, n0=100, n=100_000, radii=RADII)
    certs = [simulate(build(name), request, synthetic(probs, rng)) for _ in range(trials)]
    return float(np.mean([c.n for c in certs]))


@pytest.mark.parametrize(
    ("case", "probs", "sigma"),
    [
        ("easy", (0.99, 0.01), 0.5),  # true radius 1.16: both certify r = 1.0
        ("easy", (1.0, 0.0), 0.25),  # true radius inf: the budget allows r = 0.75
        ("hopeless", (0.3, 0.25, 0.25, 0.2), 0.5),  # no class above 1/2: both abstain
    ],
)
def test_sequential_needs_far_fewer_samples_on_easy_and_hopeless_inputs(
    case: str, probs: Sequence[float], sigma: float
) -> None:
    cohen, sequential = (
        mean_samples("cohen", probs, sigma),
        mean_samples("sequential", probs, sigma),
    )
    assert cohen == 100_000
    assert sequential <= 0.15 * cohen, (case, sequential)
