"""Samples needed per certified image: a sample-efficient certifier against `cohen`.

Both certifiers get the same n budget, n0, alpha, sigma and report radii; the figure of merit
is the mean number of noisy forward passes per image (n0 + estimation samples) at equal
certified accuracy at each report radius. Two sources of images:

  simulated  a population of `--size` inputs with known probabilities (the true class gets
             pA, a runner-up 0.8 (1 - pA), a third class the rest), and a base classifier
             whose votes on an input are one fixed stream of class draws, read in order by
             `counts` calls: both certifiers read the same stream, as both read an example's
             `NoiseStream` in `dmae certify` with one seed, so the comparison is paired.
             Thousands of inputs in minutes, and accuracy differences free of model noise.
               digits-like  pA = Phi(1.8 + 0.9 Z), Z standard normal: the probit-normal fit
                            to the digits classifier's votes at sigma 0.5 (quantiles of
                            count_top / n from `dmae demo`), most of its mass at 0.85-0.999,
                            where the thresholds Phi(r / sigma) of the report radii lie.
               uniform      pA uniform on [0.5, 1]: a flat, harder population.
  digits     the fine-tuned digits classifier of a run (default: the `dmae demo` run,
             runs/digits-demo), its whole test split, through `run_certify` exactly as
             `dmae certify` runs it (same seed, so the same noise stream per example).

    python benchmarks/certify_samples.py --source simulated --size 10000
    python benchmarks/certify_samples.py --source digits --precision bf16
    python benchmarks/certify_samples.py --source simulated --candidate two-sided
    python benchmarks/certify_samples.py --source simulated --unpaired
    python benchmarks/certify_samples.py --population digits-like --size 6000 \
        --option check_growth=1.02 --option futility=0.03

Prints one markdown table per population: mean forward passes per image and certified
accuracy (%) at radius 0 and each report radius for both certifiers, and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.special import ndtr

from dmae_cli import api
from dmae_cli.api import Certifier, CertifyRequest, CountsFn
from dmae_cli.config.recipe import load_recipe
from dmae_cli.plugins import registry
from dmae_cli.smoothing.certify import run_certify

POPULATIONS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "digits-like": lambda rng, size: ndtr(1.8 + 0.9 * rng.standard_normal(size)),
    "uniform": lambda rng, size: rng.uniform(0.5, 1.0, size),
}


@dataclass(frozen=True)
class Outcome:
    """What one certifier did over one set of inputs."""

    name: str
    samples: float  # mean noisy forward passes per input, n0 included
    accuracy: list[float]  # certified accuracy (%) at each radius of `radii`
    seconds: float


def certified_accuracy(correct_radii: Sequence[float], radii: Sequence[float]) -> list[float]:
    """`correct_radii` holds each input's radius when its prediction is right, else -1."""
    values = np.asarray(correct_radii)
    return [float(np.mean(values >= r) * 100) for r in radii]


def vote_stream(probs: np.ndarray, total: int, rng: np.random.Generator) -> CountsFn:
    """A base classifier whose votes on an input are `total` class draws fixed in advance;
    `counts(num)` counts the next `num` of them."""
    votes = rng.choice(len(probs), size=total, p=probs)
    read = 0

    def counts(num: int) -> torch.Tensor:
        nonlocal read
        chunk, read = votes[read : read + num], read + num
        return torch.from_numpy(np.bincount(chunk, minlength=len(probs)))

    return counts


def simulate(
    certifier: Certifier, probabilities: np.ndarray, request: CertifyRequest, seed: int
) -> Outcome:
    """Certify every input of the population; class 0 is always the true class. Input i's
    votes depend on (seed, i) alone, so certifiers run with one seed are compared paired."""
    tick = time.perf_counter()
    samples, radii = [], []
    for i, p_a in enumerate(probabilities):
        probs = np.array([p_a, 0.8 * (1 - p_a), 0.2 * (1 - p_a)])
        votes = vote_stream(probs, request.n0 + request.n, np.random.default_rng([seed, i]))
        cert = api.simulate(certifier, request, votes)
        samples.append(cert.n0 + cert.n)
        radii.append(cert.radius if cert.prediction == 0 else -1.0)
    levels = (0.0, *request.radii)
    return Outcome(
        certifier.name,
        float(np.mean(samples)),
        certified_accuracy(radii, levels),
        time.perf_counter() - tick,
    )


def run_digits(name: str, args: argparse.Namespace, out: Path) -> Outcome:
    """Certify the digits test split with certifier `name`, as `dmae certify` would."""
    radii = ",".join(str(r) for r in args.radii)
    recipe = load_recipe(
        args.recipe,
        [
            *args.set,
            f"certify.certifier={name}",
            f"certify.sigma=[{args.sigma}]",
            f"certify.n={args.n}",
            f"certify.n0={args.n0}",
            f"certify.alpha={args.alpha}",
            f"certify.radii=[{radii}]",
            f"seed={args.seed}",
            f"precision={args.precision}",
            f"device={args.device}",
            *(f"certify.options.{k}={v}" for k, v in args.option if name == args.candidate),
        ],
    )
    tick = time.perf_counter()
    (result,) = run_certify(recipe, out / name)
    seconds = time.perf_counter() - tick
    radii_of_rows = [r.radius if r.correct else -1.0 for r in result.rows]
    return Outcome(
        name, result.mean_samples(), certified_accuracy(radii_of_rows, (0.0, *args.radii)), seconds
    )


def table(title: str, baseline: Outcome, candidate: Outcome, radii: Sequence[float]) -> str:
    heads = " | ".join(f"r = {r:g}" for r in (0.0, *radii))
    lines = [
        f"### {title}",
        "",
        f"| certifier | forward passes / image | {heads} | seconds |",
        "|---|---|" + "---|" * (len(radii) + 1) + "---|",
    ]
    for o in (baseline, candidate):
        accs = " | ".join(f"{a:.2f}" for a in o.accuracy)
        lines.append(f"| {o.name} | {o.samples:,.0f} | {accs} | {o.seconds:.0f} |")
    diffs = [c - b for b, c in zip(baseline.accuracy, candidate.accuracy, strict=True)]
    lines += [
        "",
        f"Forward passes: **{baseline.samples / candidate.samples:.2f}x fewer** with "
        f"{candidate.name}. Accuracy difference (points, {candidate.name} - {baseline.name}): "
        + ", ".join(f"{d:+.2f}" for d in diffs)
        + f"; largest at the report radii: {max(abs(d) for d in diffs[1:]):.2f}.",
    ]
    return "\n".join(lines)


def certifier_option(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as YAML (numbers stay numbers), as `certify.options`."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("simulated", "digits", "both"), default="simulated")
    parser.add_argument("--population", choices=(*POPULATIONS, "all"), default="all")
    parser.add_argument("--size", type=int, default=10_000, help="simulated inputs")
    parser.add_argument("--baseline", default="cohen")
    parser.add_argument("--candidate", default="sequential")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--n", type=int, default=10_000, help="the n budget of both")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--radii", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--option",
        type=certifier_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the candidate, e.g. check_growth=1.02 (repeatable)",
    )
    parser.add_argument(
        "--unpaired",
        action="store_true",
        help="simulated: other votes for the candidate (adds seed-to-seed spread)",
    )
    parser.add_argument("--recipe", default="recipes/digits.yaml")
    parser.add_argument(
        "--set", action="append", default=["name=digits-demo"], help="recipe overrides"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    baseline = registry.certifiers.get(args.baseline)()
    candidate = registry.certifiers.get(args.candidate)(**dict(args.option))
    request = CertifyRequest(args.sigma, args.alpha, args.n0, args.n, tuple(args.radii))
    setting = f"sigma {args.sigma}, n {args.n:,}, n0 {args.n0}, alpha {args.alpha}"
    if args.source in ("simulated", "both"):
        names = list(POPULATIONS) if args.population == "all" else [args.population]
        for name in names:
            probabilities = POPULATIONS[name](np.random.default_rng(args.seed), args.size)
            # The same votes for both, as `dmae certify` with one seed gives the same noise;
            # --unpaired gives the candidate other votes, as a run with another seed.
            a = simulate(baseline, probabilities, request, args.seed + 1)
            b = simulate(candidate, probabilities, request, args.seed + 1 + args.unpaired)
            print(table(f"simulated {name}, {args.size:,} inputs, {setting}", a, b, args.radii))
            print(flush=True)
    if args.source in ("digits", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = (run_digits(n, args, Path(tmp)) for n in (args.baseline, args.candidate))
        title = f"digits test split, {setting}, precision {args.precision}, {args.device}"
        print(table(title, a, b, args.radii))


if __name__ == "__main__":
    main()
