"""A sample-efficient certifier: stop drawing once the report radii are settled."""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from scipy.stats import betabinom

from dmae_cli.api import (
    ABSTAIN,
    Certificate,
    CertifyRequest,
    clopper_pearson_lower,
    gaussian_radius,
)
from dmae_plugins.certifiers._bounds import thresholds
from dmae_plugins.certifiers.cohen import Cohen

# The smallest `growth` and `check_growth`: at 1.001 the schedule of a budget n = 10^9 holds
# about 15,000 sizes (a thousand below n = 1,000, then about 7,000 per factor of 1000); at
# 1 + 1e-7 it held tens of millions and its list took gigabytes.
MIN_RATIO = 1.001


@dataclass(frozen=True)
class Sequential:
    """Sequential certification: Cohen's guarantee with far fewer samples for fixed report radii.

    Procedure, for report radii r_1 < ... < r_m and budget n:
      1. Selection: cA = the most frequent class among n0 noisy copies. These samples only
         choose cA; they never enter the bound below (reusing them makes the estimate depend
         on the choice it is meant to test, which voids the guarantee).
      2. Estimation in looks at fixed sample sizes m_1 < ... < m_K = n (geometric, ratio
         `growth`, the smallest >= `first`), each look drawing fresh copies. Look k computes
         the one-sided Clopper-Pearson lower bound on pA = P(f(x + e) = cA) at level a_k:
         the last look gets a_K = `last_share` * alpha, the others share the rest equally.
         L is the running maximum of these bounds.
      3. With thresholds t_j = Phi(r_j / sigma) (and 1/2 for a prediction at all), let t be
         the smallest threshold above L. Stop as soon as (a) there is none: every report
         radius is certified; or (b) the chance that the last look would still certify t is
         below `futility`; or (c) the budget n is spent. The chance in (b) is the posterior
         predictive probability, under a uniform prior on pA, that the votes still to come
         reach the count the last look needs (a beta-binomial tail). (b) is checked at the
         looks and between them, on a finer geometric grid (ratio `check_growth`): a check
         computes no bound, so it spends no alpha, and a hopeless input stops sooner.
      4. L >= 1/2: predict cA with radius sigma * PhiInverse(L); else abstain.

    Guarantee: the looks and their levels are fixed in advance and sum to alpha, so by the
    union bound every lower bound holds at once, P(exists k: L_k > pA) <= alpha: a confidence
    sequence, valid whatever rule decides when to stop. The returned radius therefore exceeds
    the true one with probability at most alpha, the guarantee of `cohen`. One sequence serves
    every radius (no union bound over radii). The futility rule only decides when to give up,
    so it can cost certificates, never validity.

    Cost: giving most of alpha to the last look keeps its bound close to `cohen`'s at the
    same n (alpha 0.001 at 80%: z = 3.16 instead of 3.09), so inputs that need the whole
    budget fare almost as under `cohen`; the early looks pay a smaller level, which costs an
    easy input a few hundred samples more than the least it could need. The futility rule
    gives up on an input that `cohen` would certify only about `futility` of the time, so
    certified accuracy drops by a fraction of a point at most while inputs whose probability
    sits near a threshold, the expensive ones, stop after a fraction of the budget.
    `benchmarks/certify_samples.py` measures both sides.

    References: M. Z. Horváth, M. N. Müller, M. Fischer, M. Vechev, "Boosting Randomized
    Smoothing with Variance Reduced Classifiers", ICLR 2022 (adaptive sampling for fixed
    radii); V. Voráček, "Treatment of Statistical Estimation Problems in Randomized Smoothing
    for Adversarial Robustness", arXiv 2406.17830, 2024 (confidence sequences for
    certification); J. Cohen, E. Rosenfeld, Z. Kolter, ICML 2019 (the certificate).
    """

    name: ClassVar[str] = "sequential"
    first: int = 64  # the smallest look; fewer samples rarely settle anything
    growth: float = 1.15  # ratio between looks: more looks stop sooner, at a smaller level each
    last_share: float = 0.8  # the share of alpha spent at the last look
    futility: float = 0.02  # give up once the chance to certify the next radius is below this
    check_growth: float = 1.05  # ratio between futility checks (free: they spend no alpha)

    def __post_init__(self) -> None:
        if isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 1:
            raise ValueError(f"sequential: first must be an integer >= 1, got {self.first!r}")
        for knob in ("growth", "check_growth"):
            value = getattr(self, knob)
            if not _is_number(value) or not value > 1:
                raise ValueError(f"sequential: {knob} must be a number > 1, got {value!r}")
            if not value >= MIN_RATIO:
                raise ValueError(
                    f"sequential: {knob} must be at least {MIN_RATIO}, got {value!r} (closer to "
                    f"1, the sample sizes it looks or checks at grow into the millions)"
                )
        if not _is_number(self.last_share) or not 0 < self.last_share <= 1:
            raise ValueError(
                f"sequential: last_share must be a number in (0, 1], got {self.last_share!r}"
            )
        if not _is_number(self.futility) or not 0 <= self.futility < 1:
            raise ValueError(
                f"sequential: futility must be a number in [0, 1), got {self.futility!r}"
            )

    def looks(self, n: int) -> list[int]:
        """The sample sizes at which the bounds are computed: ..., n / growth^2, n / growth, n."""
        return _geometric(self.first, self.growth, n)

    def checks(self, n: int) -> list[int]:
        """The sample sizes at which to decide whether to stop: the looks and the futility
        checks between them."""
        return sorted(set(self.looks(n)) | set(_geometric(self.first, self.check_growth, n)))

    def levels(self, alpha: float, looks: int) -> list[float]:
        """The level of each look's bound: `last_share` of alpha last, the rest shared equally.

        With one look it gets all of alpha; with `last_share` 1 the early looks get nothing
        (their bounds are 0) and only the futility rule can stop early.
        """
        if looks == 1:
            return [alpha]
        early = alpha * (1 - self.last_share) / (looks - 1)
        return [early] * (looks - 1) + [alpha - early * (looks - 1)]

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
        """The procedure above: n0 copies to select, then fresh ones up to each check."""
        n0, n = request.n0, request.n
        selected = int((yield n0).argmax())
        if request.label is not None and selected != request.label:
            return Certificate.skipped(selected, n0)
        looks = self.looks(n)
        levels = dict(zip(looks, self.levels(request.alpha, len(looks)), strict=True))
        targets = thresholds(request.sigma, request.radii)
        n_a = drawn = 0
        lower = 0.0
        for size in self.checks(n):
            n_a += int((yield size - drawn)[selected])
            drawn = size
            if levels.get(size, 0.0) > 0:
                lower = max(lower, clopper_pearson_lower(n_a, drawn, levels[size]))
            stop = self._stop(lower, targets, n_a, drawn, n, levels[n])
            if stop:
                break
        extra = {"pa_lower": lower, "stop": stop}
        if not lower >= 0.5:  # NaN too
            return Certificate(ABSTAIN, 0.0, n_a, drawn, n0, extra)
        return Certificate(selected, gaussian_radius(request.sigma, lower), n_a, drawn, n0, extra)

    def _stop(
        self, lower: float, targets: list[float], n_a: int, drawn: int, n: int, last: float
    ) -> str:
        """Why to stop sampling now, or "" to go on (see the class docstring, step 3)."""
        above = [t for t in targets if t > lower]
        if not above:
            return "settled"
        if drawn >= n:
            return "budget"
        if n_a < fewest_hopeful_votes(drawn, n, last, above[0], self.futility):
            return "futile"
        return ""

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]:
        """PREDICT as `cohen` (one binomial test: there is nothing to stop early on)."""
        return (yield from Cohen().predict(request))


def chance_to_certify(n_a: int, drawn: int, n: int, level: float, threshold: float) -> float:
    """The posterior predictive probability that n votes in all bound pA above `threshold`.

    After n_a of `drawn` votes for cA, with a uniform prior on pA, the votes among the n - drawn
    still to come are beta-binomial(n - drawn, n_a + 1, drawn - n_a + 1); the last look
    certifies `threshold` when the total reaches `votes_needed(n, level, threshold)`.
    """
    short = votes_needed(n, level, threshold) - n_a
    if short <= 0:
        return 1.0
    return float(betabinom.sf(short - 1, n - drawn, n_a + 1, drawn - n_a + 1))


@lru_cache(maxsize=1 << 16)
def fewest_hopeful_votes(
    drawn: int, n: int, level: float, threshold: float, futility: float
) -> int:
    """The fewest votes for cA among `drawn` whose `chance_to_certify` is >= `futility`
    (`drawn` + 1 when none): an input with fewer is futile.

    The chance grows with the votes so far (fewer votes still needed, and a posterior that
    shifts up), so a binary search finds this boundary, and the futility rule becomes one
    comparison per check. The checks happen at the same few hundred (look, threshold) pairs for
    every input of a run, so each boundary costs a dozen beta-binomial tails once per process
    instead of one tail (about 0.1-1 ms at n = 10,000) per check of every input.
    """
    low, high = 0, drawn + 1
    while low < high:
        middle = (low + high) // 2
        if chance_to_certify(middle, drawn, n, level, threshold) >= futility:
            high = middle
        else:
            low = middle + 1
    return low


@lru_cache(maxsize=1024)
def votes_needed(n: int, level: float, threshold: float) -> int:
    """The fewest votes of n whose Clopper-Pearson lower bound at `level` reaches `threshold`
    (n + 1 when even n of n does not). The bound grows with the votes: a binary search."""
    low, high = 0, n + 1
    while low < high:
        middle = (low + high) // 2
        if clopper_pearson_lower(middle, n, level) >= threshold:
            high = middle
        else:
            low = middle + 1
    return low


def _geometric(first: int, ratio: float, n: int) -> list[int]:
    """Sample sizes ..., n / ratio^2, n / ratio, n (rounded up), none below `first` but n.

    Near 1/(ratio - 1) rounding up would repeat a size forever; each step takes at least one.
    """
    sizes = [n]
    while (smaller := min(math.ceil(sizes[-1] / ratio), sizes[-1] - 1)) >= max(first, 1):
        sizes.append(smaller)
    return sizes[::-1]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
