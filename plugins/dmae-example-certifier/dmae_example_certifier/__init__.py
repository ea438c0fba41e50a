"""A third-party dmae certifier: the two-sided radius of Cohen et al.'s Theorem 1.

Installed, it is the certifier `two-sided` (`dmae certify ... --certifier two-sided`). It uses
only dmae's public plugin API, `dmae_cli.api` (certifier API 2: `certify` and `predict` are
generators that yield how many noisy copies they want and receive their class counts), and
scipy.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from scipy.special import betaincinv, ndtri
from scipy.stats import binomtest

from dmae_cli.api import ABSTAIN, Certificate, CertifyRequest

__all__ = ["TwoSided", "cp_lower", "cp_upper", "two_sided_radius"]
__version__ = "0.1.0"


def cp_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p: Beta(alpha; k, n - k + 1)."""
    if successes <= 0:
        return 0.0
    return float(betaincinv(successes, trials - successes + 1, alpha))


def cp_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p: Beta(1 - alpha; k + 1, n - k)."""
    if successes >= trials:
        return 1.0
    return float(betaincinv(successes + 1, trials - successes, 1.0 - alpha))


def two_sided_radius(sigma: float, p_a: float, p_b: float) -> float:
    """sigma / 2 * (PhiInverse(p_a) - PhiInverse(p_b)): Theorem 1's radius for p_a > p_b."""
    return float(sigma / 2 * (ndtri(p_a) - ndtri(p_b)))


class TwoSided:
    """Cohen et al.'s Theorem 1 with both bounds: sigma/2 (PhiInv(pA_lower) - PhiInv(pB_upper)).

    CERTIFY(f, sigma, x, n0, n, alpha):
      1. cA = the most frequent class among n0 noisy copies (selection; discarded afterwards).
      2. On n fresh noisy copies: nA votes for cA and n_c for every other class c.
      3. pA_lower = the one-sided Clopper-Pearson lower bound of nA / n at level alpha / 2.
         pB_upper bounds max_{c != cA} p_c: the smaller of 1 - pA_lower and the largest
         one-sided Clopper-Pearson upper bound of n_c / n at level alpha / (2 (K - 1)) over the
         K - 1 other classes (Bonferroni, so all of them hold together with prob. 1 - alpha/2).
      4. pA_lower <= pB_upper: abstain; else predict cA with radius
         sigma / 2 * (PhiInverse(pA_lower) - PhiInverse(pB_upper)).
    Guarantee: by the union bound, pA >= pA_lower and max_{c != cA} p_c <= pB_upper hold
    together with probability >= 1 - alpha over the noise; then Theorem 1 says the smoothed
    classifier predicts cA everywhere within the returned L2 radius of x.

    Why every other class and not just the runner-up: Theorem 1 needs pB >= max_{c != cA} p_c.
    A bound on one runner-up chosen from the n0 selection samples may miss the true runner-up.

    Compared with the built-in `cohen` (sigma * PhiInverse(pA_lower) at level alpha, which is
    this radius with pB_upper = 1 - pA_lower): larger when the mass outside cA is spread over
    several classes, slightly smaller with two classes (each bound spends only alpha / 2).

    PREDICT(f, sigma, x, n, alpha): Cohen et al.'s; the two most frequent classes on n copies
    with nA and nB votes; abstain unless the two-sided binomial test of nA out of nA + nB at
    p = 1/2 has p-value <= alpha. Wrong (differs from the smoothed classifier) with
    probability at most alpha.

    Reference: J. Cohen, E. Rosenfeld, Z. Kolter, "Certified Adversarial Robustness via
    Randomized Smoothing", ICML 2019, Theorem 1 and Section 3.2.
    """

    name = "two-sided"

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
        """CERTIFY above: yields n0 (selection), then n (estimation), and returns the result."""
        n0, n, alpha = request.n0, request.n, request.alpha
        selection = (yield n0).tolist()
        selected = max(range(len(selection)), key=selection.__getitem__)  # ties: lowest index
        if request.label is not None and selected != request.label:
            return Certificate.skipped(selected, n0)
        votes = (yield n).tolist()
        n_a = votes[selected]
        others = [v for c, v in enumerate(votes) if c != selected]
        p_a = cp_lower(n_a, n, alpha / 2)
        each = alpha / 2 / max(len(others), 1)
        p_b = min(1.0 - p_a, max((cp_upper(v, n, each) for v in others), default=0.0))
        extra = {"pa_lower": p_a, "pb_upper": p_b, "stop": "budget"}
        if p_a <= p_b:
            return Certificate(ABSTAIN, 0.0, n_a, n, n0, extra)
        return Certificate(selected, two_sided_radius(request.sigma, p_a, p_b), n_a, n, n0, extra)

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]:
        """PREDICT above: yields n once."""
        votes = (yield request.n).tolist()
        top = max(range(len(votes)), key=votes.__getitem__)  # ties: the lowest class index
        n_a = votes[top]
        n_b = max((v for c, v in enumerate(votes) if c != top), default=0)
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > request.alpha:
            return ABSTAIN
        return top

    def __repr__(self) -> str:
        return "TwoSided()"
