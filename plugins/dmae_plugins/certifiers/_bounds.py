"""Pure helpers of the built-in certifiers besides the public ones of `dmae_cli.api`.

No state, no torch: numbers in, numbers out, so each one is checked against scipy directly.
The lower Clopper-Pearson bound and the Gaussian radius are `dmae_cli.api`'s
(`clopper_pearson_lower`, `gaussian_radius`), shared with third-party certifiers and with
`dmae report --alpha`; what is here only the built-in certifiers use. Clopper-Pearson bounds
are exact (never below the nominal coverage for any p), which is why both certifiers use them
rather than normal approximations or Hoeffding.

The quantiles call scipy's special functions, which `scipy.stats.beta.ppf` and
`scipy.stats.norm.cdf` evaluate underneath: the same numbers (the tests compare them bit for
bit) without the distribution objects' argument handling, about 60 times faster, which
matters to a sequential certifier and to simulations that call them thousands of times.
"""

from __future__ import annotations

from collections.abc import Iterable

from scipy.special import betaincinv, ndtr


def cp_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p; 1 when every trial succeeded.

    The mirror image of `dmae_cli.api.clopper_pearson_lower`: 1 - lower(n - k, n, alpha) up
    to rounding.
    """
    if successes >= trials:
        return 1.0
    return float(betaincinv(successes + 1, trials - successes, 1.0 - alpha))


def thresholds(sigma: float, radii: Iterable[float]) -> list[float]:
    """The probabilities Phi(r / sigma) a lower bound must reach to certify each radius r.

    Always contains 1/2 (radius 0: a prediction at all), sorted and without duplicates.
    """
    values = {0.5} | {float(ndtr(r / sigma)) for r in radii if r > 0}
    return sorted(values)
