"""Pure helpers shared by the built-in certifiers: exact binomial bounds and Gaussian radii.

No state, no torch: numbers in, numbers out, so each one is checked against scipy directly.
Clopper-Pearson bounds are exact (never below the nominal coverage for any p), which is why
both certifiers use them rather than normal approximations or Hoeffding.

The quantiles call scipy's special functions, which `scipy.stats.beta.ppf` and
`scipy.stats.norm.ppf` / `cdf` evaluate underneath: the same numbers (the tests compare them
bit for bit) without the distribution objects' argument handling, about 60 times faster,
which matters to a sequential certifier and to simulations that call them thousands of times.
"""

from __future__ import annotations

from collections.abc import Iterable

from scipy.special import betaincinv, ndtr, ndtri


def cp_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from `successes` of `trials`.

    The Beta(alpha; k, n - k + 1) quantile, i.e. statsmodels'
    `proportion_confint(k, n, 2 * alpha, method="beta")[0]`; 0 when k = 0 (the quantile of a
    Beta with a zero parameter is undefined there, the bound is 0).
    """
    if successes <= 0:
        return 0.0
    return float(betaincinv(successes, trials - successes + 1, alpha))


def cp_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p; 1 when every trial succeeded."""
    if successes >= trials:
        return 1.0
    return float(betaincinv(successes + 1, trials - successes, 1.0 - alpha))


def gaussian_radius(sigma: float, p_lower: float) -> float:
    """The L2 radius sigma * PhiInverse(p_lower) that p_lower >= 1/2 certifies (Cohen et al.)."""
    return float(sigma * ndtri(p_lower))


def thresholds(sigma: float, radii: Iterable[float]) -> list[float]:
    """The probabilities Phi(r / sigma) a lower bound must reach to certify each radius r.

    Always contains 1/2 (radius 0: a prediction at all), sorted and without duplicates.
    """
    values = {0.5} | {float(ndtr(r / sigma)) for r in radii if r > 0}
    return sorted(values)
