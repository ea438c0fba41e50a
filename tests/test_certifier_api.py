"""The certifier contract, API 2 and API 1: which one a certifier implements, the contract
checks of both forms, and `simulate`, which drives either with synthetic counts."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import pytest
import torch

from dmae_cli.api import (
    ABSTAIN,
    API_VERSION,
    Certificate,
    CertifyRequest,
    CountsFn,
    certifier_api,
    contract_problems,
    simulate,
)
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import Sequential

REQUEST = CertifyRequest(0.5, 0.01, n0=10, n=100)


class Two:
    """API 2: asks for n0 copies, then n; certifies nothing."""

    name = "two"

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]:
        selected = int((yield request.n0).argmax())
        top = int((yield request.n)[selected])
        return Certificate(ABSTAIN, 0.0, top, request.n, request.n0, {"selected": selected})

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]:
        return int((yield request.n).argmax())


class One:
    """API 1: the same with a `counts` callback."""

    name = "one"

    def certify(self, counts: CountsFn, request: CertifyRequest) -> Certificate:
        selected = int(counts(request.n0).argmax())
        top = int(counts(request.n)[selected])
        return Certificate(ABSTAIN, 0.0, top, request.n, request.n0, {"selected": selected})

    def predict(self, counts: CountsFn, request: CertifyRequest) -> int:
        return int(counts(request.n).argmax())


def recorded(votes: list[int]) -> tuple[list[int], object]:
    """A draw that puts every copy on `votes[i]` for its i-th call, recording the sizes."""
    asked: list[int] = []

    def draw(num: int) -> torch.Tensor:
        counts = torch.zeros(3, dtype=torch.int64)
        counts[votes[len(asked)]] = num
        asked.append(num)
        return counts

    return asked, draw


def test_the_api_version_is_2() -> None:
    assert API_VERSION == 2


@pytest.mark.parametrize(
    ("obj", "api"),
    [(Two(), 2), (Two, 2), (One(), 1), (One, 1), (Cohen, 2), (Sequential(), 2), (lambda: One(), 1)],
)
def test_certifier_api_reads_the_signature_of_certify(obj: object, api: int) -> None:
    assert certifier_api(obj) == api


def test_certifier_api_refuses_what_has_no_certify() -> None:
    with pytest.raises(TypeError, match="no certify method"):
        certifier_api(object())


@pytest.mark.parametrize("factory", [Two, One, Cohen, Sequential])
def test_both_forms_pass_the_contract_checks(factory: object) -> None:
    assert contract_problems("certifier", factory) == []


def test_the_contract_checks_catch_an_api_2_certify_that_is_no_generator() -> None:
    class Eager(Two):
        def certify(self, request: CertifyRequest) -> Certificate:  # type: ignore[override]
            return Certificate(ABSTAIN, 0.0, 0, 0, request.n0)

    class Lopsided(One):
        def predict(self, request: CertifyRequest) -> int:  # type: ignore[override]
            return ABSTAIN

    [eager] = contract_problems("certifier", Eager)
    assert "`certify(request)` returned Certificate, not a generator" in eager
    [lopsided] = contract_problems("certifier", Lopsided)
    assert lopsided.startswith("`predict(counts, request)`: ")


@pytest.mark.parametrize("certifier", [Two(), One()])
def test_simulate_answers_every_request_in_order_whatever_the_api(certifier: object) -> None:
    asked, draw = recorded([2, 2, 1])
    cert = simulate(certifier, REQUEST, draw)
    assert asked == [10, 100] and (cert.count_top, cert.extra) == (100, {"selected": 2})
    asked, draw = recorded([1])
    assert simulate(certifier, REQUEST, draw, predict=True) == 1 and asked == [100]


def test_simulate_drives_a_generator_already_made() -> None:
    asked, draw = recorded([0, 1])
    cert = simulate(Two().certify(REQUEST), None, draw)
    assert asked == [10, 100] and cert.count_top == 0 and cert.extra["selected"] == 0
    with pytest.raises(TypeError, match="has its request already"):
        simulate(Two().certify(REQUEST), REQUEST, draw)
    with pytest.raises(TypeError, match="needs a CertifyRequest"):
        simulate(Two(), None, draw)


def test_simulate_with_a_multinomial_matches_the_certifier_on_known_probabilities() -> None:
    rng = np.random.default_rng(0)
    probs = np.array([0.05, 0.9, 0.05])
    request = CertifyRequest(0.25, 0.001, n0=100, n=10_000)
    cert = simulate(Cohen(), request, lambda num: torch.from_numpy(rng.multinomial(num, probs)))
    assert cert.prediction == 1 and 0.25 < cert.radius < 0.25 * 1.29  # Phi^-1(0.9) = 1.28


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [(-3, ValueError, "-3 noisy copies"), (2.0, TypeError, "not float"), (True, TypeError, "bool")],
)
def test_simulate_refuses_a_yield_that_is_no_count_of_copies(
    bad: object, error: type[Exception], message: str
) -> None:
    def asking() -> Generator[object, torch.Tensor, None]:
        yield bad

    with pytest.raises(error, match=message):
        simulate(asking(), None, lambda num: torch.zeros(3, dtype=torch.int64))
