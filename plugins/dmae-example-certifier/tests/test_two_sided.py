"""The two-sided certifier: exact numbers against scipy, the contract, a simulated guarantee.

Self-contained: only dmae's public API (`dmae_cli.api`), scipy and numpy. A synthetic base
classifier with known class probabilities stands in for a network, so the true Theorem 1
radius is known exactly and thousands of certifications take a few seconds: `simulate` answers
each request the certifier yields with a draw of that synthetic classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import pytest
import torch
from dmae_example_certifier import TwoSided
from scipy.stats import beta, norm

from dmae_cli.api import (
    ABSTAIN,
    Certificate,
    Certifier,
    CertifyRequest,
    certifier_api,
    contract_problems,
    simulate,
)

Draw = Callable[[int], torch.Tensor]  # how many copies -> their class counts


def scripted(*answers: Sequence[int]) -> tuple[Draw, list[int]]:
    """A source of counts for `simulate`: `answers` in turn, recording the size of each draw."""
    calls: list[int] = []

    def counts(num: int) -> torch.Tensor:
        calls.append(num)
        return torch.tensor(answers[len(calls) - 1], dtype=torch.int64)

    return counts, calls


def synthetic(probs: Sequence[float], rng: np.random.Generator) -> Draw:
    """A base classifier whose noisy votes follow `probs` exactly, one multinomial per draw."""
    p = np.asarray(probs, dtype=np.float64)
    return lambda num: torch.from_numpy(rng.multinomial(num, p / p.sum()))


# -- the contract and the entry point ----------------------------------------------------------
def test_honours_the_contract_and_is_registered() -> None:
    assert contract_problems("certifier", TwoSided) == []
    assert certifier_api(TwoSided) == 2  # generators: certify(request) yields its draws
    assert isinstance(TwoSided(), Certifier) and TwoSided.name == "two-sided"
    [ep] = [e for e in metadata.entry_points(group="dmae.certifiers") if e.name == "two-sided"]
    assert ep.load() is TwoSided and ep.dist is not None
    assert ep.dist.name == "dmae-example-certifier"


# -- exact numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("votes", "alpha"),
    [
        ([900, 50, 50], 0.001),
        ([700, 100, 100, 100], 0.01),
        ([9990, 10], 0.001),
        ([600, 400], 0.05),
        ([1000, 0, 0, 0, 0], 0.001),
    ],
)
def test_radius_is_theorem_1_with_simultaneous_clopper_pearson_bounds(
    votes: list[int], alpha: float
) -> None:
    sigma, n = 0.5, sum(votes)
    counts, calls = scripted([7] + [0] * (len(votes) - 1), votes)
    cert = simulate(TwoSided(), CertifyRequest(sigma, alpha, n0=7, n=n), counts)
    assert calls == [7, n]
    p_a = beta.ppf(alpha / 2, votes[0], n - votes[0] + 1)
    each = alpha / 2 / (len(votes) - 1)
    uppers = [beta.ppf(1 - each, v + 1, n - v) for v in votes[1:]]
    p_b = min(1 - p_a, max(uppers))
    assert cert.prediction == 0 and (cert.count_top, cert.n, cert.n0) == (votes[0], n, 7)
    assert math.isclose(cert.radius, sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b)), rel_tol=1e-12)
    assert math.isclose(cert.extra["pa_lower"], p_a, rel_tol=1e-12)


def test_two_classes_reduce_to_cohens_radius_at_half_the_level() -> None:
    n_a, n, alpha, sigma = 950, 1000, 0.001, 0.25
    counts, _ = scripted([5, 0], [n_a, n - n_a])
    cert = simulate(TwoSided(), CertifyRequest(sigma, alpha, n0=5, n=n), counts)
    cohen_half = sigma * norm.ppf(beta.ppf(alpha / 2, n_a, n - n_a + 1))
    assert math.isclose(cert.radius, cohen_half, rel_tol=1e-9)


@pytest.mark.parametrize("votes", [[520, 480], [400, 360, 240], [0, 1000], [300, 300, 400]])
def test_abstains_when_the_bounds_are_not_separated(votes: list[int]) -> None:
    counts, _ = scripted([5] + [0] * (len(votes) - 1), votes)
    cert = simulate(TwoSided(), CertifyRequest(0.5, 0.001, n0=5, n=sum(votes)), counts)
    assert cert.abstained and cert.radius == 0.0
    assert cert.extra["pa_lower"] <= cert.extra["pb_upper"]


def test_skip_wrong_shortcut_stops_after_selection() -> None:
    counts, calls = scripted([3, 90, 7])
    cert = simulate(TwoSided(), CertifyRequest(0.5, 0.001, n0=100, n=10_000, label=0), counts)
    assert calls == [100]
    assert (cert.prediction, cert.radius, cert.n, cert.extra["stop"]) == (1, 0.0, 0, "skipped")


def test_predict_returns_the_clear_winner_or_abstains() -> None:
    request = CertifyRequest(0.5, 0.001, n0=10, n=1000)
    assert simulate(TwoSided(), request, scripted([10, 900, 90])[0], predict=True) == 1
    assert simulate(TwoSided(), request, scripted([490, 510, 0])[0], predict=True) == ABSTAIN


# -- the simulated guarantee -------------------------------------------------------------------
ALPHA, TRIALS = 0.1, 2000
MARGIN = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)  # three standard errors: 0.02
# Near certifiable boundaries, a near-tie for selection, mass spread over several classes, and
# a runner-up that the n0 selection samples often get wrong (two close second classes).
SCENARIOS = [
    (0.6, 0.3, 0.1),
    (0.8, 0.2),
    (0.93, 0.05, 0.02),
    (0.52, 0.48),
    (0.5, 0.28, 0.22),
    (0.7, 0.1, 0.1, 0.1),
]


def failure_rate(certifier: Any, probs: Sequence[float], trials: int, seed: int) -> float:
    """How often a certificate claims more than Theorem 1 gives with the true probabilities:
    a class that is not the smoothed classifier's, or a radius beyond
    sigma / 2 * (PhiInverse(pA) - PhiInverse(pB)) with pB the true largest other probability."""
    rng = np.random.default_rng(seed)
    request = CertifyRequest(0.5, ALPHA, n0=20, n=1000)
    failures = 0
    for _ in range(trials):
        cert = simulate(certifier, request, synthetic(probs, rng))
        if cert.abstained:
            continue
        p_a = probs[cert.prediction]
        p_b = max(p for c, p in enumerate(probs) if c != cert.prediction)
        truth = request.sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b))
        failures += p_a <= p_b or cert.radius > truth
    return failures / trials


def test_certified_radius_exceeds_the_truth_at_most_alpha_of_the_time() -> None:
    rates = [failure_rate(TwoSided(), p, TRIALS, seed) for seed, p in enumerate(SCENARIOS)]
    assert max(rates) <= ALPHA + MARGIN, rates


def test_the_simulation_catches_a_bound_on_the_selected_runner_up_only() -> None:
    class RunnerUpOnly:
        name = "runner-up-only"

        def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
            selection = (yield request.n0).tolist()
            order = sorted(range(len(selection)), key=lambda c: -selection[c])
            a, b = order[0], order[1]
            votes = (yield request.n).tolist()
            p_a = float(beta.ppf(request.alpha / 2, votes[a], request.n - votes[a] + 1))
            p_b = float(beta.ppf(1 - request.alpha / 2, votes[b] + 1, request.n - votes[b]))
            if not p_a > p_b:
                return Certificate(ABSTAIN, 0.0, votes[a], request.n, request.n0)
            radius = request.sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b))
            return Certificate(a, radius, votes[a], request.n, request.n0)

        predict = certify

    # With n0 = 20 the selection samples often name class 2 the runner-up, not class 1.
    assert failure_rate(RunnerUpOnly(), (0.5, 0.28, 0.22), 1000, seed=0) > 1.5 * ALPHA
