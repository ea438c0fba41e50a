"""The certifier DMAE is evaluated with: Cohen, Rosenfeld & Kolter (ICML 2019, arXiv:1902.02918)."""

from __future__ import annotations

from collections.abc import Generator
from typing import ClassVar

import torch
from scipy.stats import binomtest

from dmae_cli.api import ABSTAIN, Certificate, CertifyRequest, cohen_bound


class Cohen:
    """Cohen et al. 2019, as DMAE is evaluated: Clopper-Pearson CERTIFY, binomial-test PREDICT.

    CERTIFY(f, sigma, x, n0, n, alpha):
      1. cA = the most frequent class among n0 noisy copies (selection; these counts are then
         discarded, so the estimate below is independent of the choice).
      2. nA = votes for cA among n fresh noisy copies.
      3. pA_lower = the one-sided (1 - alpha) Clopper-Pearson lower bound of nA / n.
      4. pA_lower < 1/2: abstain; else predict cA with radius sigma * PhiInverse(pA_lower).
    Steps 3 and 4 are `dmae_cli.api.cohen_bound`, which `dmae report --alpha` also uses to
    recompute radii from the counts in the run file.
    Guarantee: with probability >= 1 - alpha over the noise, a returned (cA, r) is right:
    the smoothed classifier predicts cA within L2 radius r of x (Cohen et al., Theorem 1).

    PREDICT(f, sigma, x, n, alpha): the two most frequent classes on n copies, nA and nB
    votes; abstain unless the two-sided binomial test of nA out of nA + nB at p = 1/2 has
    p-value <= alpha. The answer differs from g(x) with probability at most alpha.

    Reference: J. Cohen, E. Rosenfeld, Z. Kolter, "Certified Adversarial Robustness via
    Randomized Smoothing", ICML 2019; the authors' implementation is github.com/locuslab/smoothing.
    docs/method.md, "Certification", describes both procedures in the project's words.
    """

    name: ClassVar[str] = "cohen"

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
        """CERTIFY as above: asks for n0 copies, then (unless skipped) for n fresh ones."""
        n0, n = request.n0, request.n
        selected = int((yield n0).argmax())  # ties: the lowest class index, as numpy
        if request.label is not None and selected != request.label:
            return Certificate.skipped(selected, n0)
        n_a = int((yield n)[selected])
        bound = cohen_bound(request.sigma, n_a, n, request.alpha)
        extra = {"pa_lower": bound.pa_lower, "stop": "budget"}
        if not bound.pa_lower >= 0.5:  # NaN too (scipy's quantile at an extreme alpha)
            return Certificate(ABSTAIN, 0.0, n_a, n, n0, extra)
        return Certificate(selected, bound.radius, n_a, n, n0, extra)

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]:
        """PREDICT as above: asks for n copies once."""
        return predicted((yield request.n).tolist(), request.alpha)

    def __repr__(self) -> str:
        return "Cohen()"


def predicted(votes: list[int], alpha: float) -> int:
    """PREDICT's decision from the votes of its n copies: the top class, or ABSTAIN unless the
    two-sided binomial test of nA out of nA + nB at p = 1/2 has p-value <= alpha."""
    top = max(range(len(votes)), key=votes.__getitem__)  # ties: the lowest class index
    n_a = votes[top]
    n_b = max((v for c, v in enumerate(votes) if c != top), default=0)
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return top
