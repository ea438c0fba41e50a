"""The plugin contracts: what a third-party backbone, dataset or certifier implements.

A plugin is an object exposed through an entry point in one of the groups `dmae.backbones`,
`dmae.datasets` or `dmae.certifiers`. This module is the whole public surface a plugin needs;
`API_VERSION` changes whenever a contract changes incompatibly.

Backbone
    A callable `factory(*, img_size, patch_size, in_chans, **overrides) -> VisionTransformer`
    returning a timm `VisionTransformer` (or anything exposing `patch_embed`, `cls_token`,
    `pos_embed`, `blocks` and `norm` the same way), headless (`num_classes=0`) unless told.
    Building a classifier, dmae also passes `num_classes`, `global_pool` and `drop_path_rate`:
    defaults of the factory must give way to them (docs/plugins.md lists each stage's keywords).

Dataset
    A callable `factory(split, *, root, image_size, augment, **options) -> ImageDataset` where
    `split` is "train" or "test" (or "val", an alias of "test"), `root` a local path or None,
    `image_size` the side the images are delivered at (their native resolution for noise), and
    `augment` asks for training augmentation. Items are `(image, label)` with `image` a float
    tensor in [0, 1] of shape (channels, image_size, image_size) as its `DatasetInfo` (`.info`)
    says, and `label` an int below `num_classes`; dmae checks the first item of every dataset
    it builds. A mistake the user can fix is raised as `PluginError` (a `ValueError`).
    `manifest_format` reads the shard manifests `dmae shard` writes.

Certifier
    A callable `factory(**options) -> Certifier`; see `Certifier` and `Certificate` below.
    API 2 (this one): `certify(request)` and `predict(request)` are generators, sans-IO. They
    yield how many fresh noisy copies of the input they want, receive those copies' class
    counts (`counts = yield n0`), as often as they like, and return the `Certificate` (or the
    predicted class). The certifier never touches the model, so one driver packs the requests
    of many inputs into shared forward passes, and `simulate` drives one with synthetic votes.
    API 1 (`CertifierV1`: `certify(counts, request)` with a `counts(num)` callback) still
    runs, one input at a time; `certifier_api` tells the two apart by `certify`'s signature.
    The statistics a certifier needs come with them: `clopper_pearson_lower`, `gaussian_radius`
    and `cohen_bound` (Cohen et al.'s certificate from raw counts), for floats or arrays.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

# The shard manifest format `dmae shard` writes, for datasets that read dmae's shards.
from dmae_cli.runtime import manifest_format as manifest_format

# What a plugin raises for a mistake its user can fix; a plain ValueError is read the same way.
from dmae_cli.runtime.errors import PluginError as PluginError

API_VERSION = 2


# -- backbones ------------------------------------------------------------------------------
class BackboneFactory(Protocol):
    def __call__(
        self, *, img_size: int, patch_size: int, in_chans: int, **overrides: Any
    ) -> torch.nn.Module: ...


# -- datasets -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """What the core needs to know about a data set to build and normalise a model for it."""

    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    fingerprint: str = ""  # a hash identifying the exact split, recorded in checkpoints


@runtime_checkable
class ImageDataset(Protocol):
    info: DatasetInfo


class DatasetFactory(Protocol):
    def __call__(
        self, split: str, *, root: str | None, image_size: int, augment: bool, **options: Any
    ) -> ImageDataset: ...


# -- certifiers -----------------------------------------------------------------------------
CountsFn = Callable[[int], torch.Tensor]
"""API 1's callback: `counts(num)` draws `num` fresh noisy copies of one input, classifies
them and returns the class counts as an int64 CPU tensor of length `num_classes`. Every call
uses fresh noise, so a certifier that selects a class on one call and estimates on another
never reuses samples."""

ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """The outcome of certifying one input. `prediction == ABSTAIN` means no certificate.

    `extra` is free-form; the run file gives two of its keys their own columns when present:
    `pa_lower` (the lower confidence bound on the selected class's probability behind `radius`)
    and `stop` (why sampling ended, e.g. "budget", "settled", "skipped"), and writes the others
    to its `extra` column as JSON (numbers, strings, lists, dicts; numpy and torch values as
    numbers or lists).
    """

    prediction: int
    radius: float
    count_top: int  # samples of the estimation stage that voted for the selected class
    n: int  # samples drawn in the estimation stage
    n0: int  # samples drawn in the selection stage
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @classmethod
    def skipped(cls, selected: int, n0: int) -> Certificate:
        """The official evaluation's shortcut: the selected class is not the label, so the
        estimation stage is skipped. Certified accuracy is unchanged (the row is wrong either
        way); the row keeps the selected class, radius 0 and n = 0."""
        return cls(selected, 0.0, 0, 0, n0, {"stop": "skipped"})


@dataclass(frozen=True)
class CertifyRequest:
    """Everything a certifier is told about one input besides the counts of its noisy copies."""

    sigma: float
    alpha: float
    n0: int  # samples of the selection stage
    n: int  # the sample budget of the estimation stage
    radii: Sequence[float] = ()  # the radii a report will use (sequential certifiers stop on them)
    # When set, a certifier should return `Certificate.skipped` once the selected class differs
    # from the label (the official evaluation's shortcut; certified accuracy is unchanged).
    label: int | None = None


Draws = Generator[int, torch.Tensor, Any]
"""A running certification (API 2): it yields how many fresh noisy copies it wants and is
sent their class counts (int64 CPU tensor of length `num_classes`), until it returns."""


@runtime_checkable
class Certifier(Protocol):
    """Decides how many samples to draw and turns class counts into a certified radius (API 2).

    `certify(request)` and `predict(request)` are generators that never touch the model:
    `counts = yield num` asks for `num` fresh noisy copies of the input and receives their
    class counts; they ask as often as they like, then return. Every answer uses fresh noise.

    `certify` must hold with probability at least 1 - alpha: if it returns class c with radius
    r >= 0, the smoothed classifier g predicts c everywhere within L2 distance r of the input.
    `predict` returns g's prediction, or ABSTAIN, and is wrong with probability at most alpha.
    """

    name: str

    def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, Certificate]: ...

    def predict(self, request: CertifyRequest) -> Generator[int, torch.Tensor, int]: ...


@runtime_checkable
class CertifierV1(Protocol):
    """API 1: the same promises, with a `counts(num)` callback instead of yields. Still run,
    one input at a time (a callback cannot be answered together with other inputs')."""

    name: str

    def certify(self, counts: CountsFn, request: CertifyRequest) -> Certificate: ...

    def predict(self, counts: CountsFn, request: CertifyRequest) -> int: ...


class CertifierFactory(Protocol):
    """Builds a certifier from the recipe's `certify.options` (keyword arguments)."""

    def __call__(self, **options: Any) -> Certifier | CertifierV1: ...


_PROBE = CertifyRequest(sigma=0.5, alpha=0.001, n0=1, n=1)  # a request to check signatures with


def certifier_api(obj: Any) -> int:
    """The certifier API `obj` implements: 2 when `certify` can be called with the request
    alone, `certify(request)`, else 1 (`certify(counts, request)`). Decided from the signature,
    without running anything. `obj` is a certifier or a certifier class; any other factory is
    called with no options first (as `contract_problems` does; its exceptions propagate)."""
    if not inspect.isclass(obj) and not hasattr(obj, "certify") and callable(obj):
        obj = obj()
    certify = getattr(obj, "certify", None)
    if not callable(certify):
        raise TypeError(f"{type(obj).__name__} has no certify method: not a certifier")
    unbound = (None,) if inspect.isclass(obj) else ()  # a class's function still takes self
    return 2 if _binds(certify, *unbound, _PROBE) is None else 1


def simulate(
    subject: Any,
    request: CertifyRequest | None,
    draw: Callable[[int], torch.Tensor],
    *,
    predict: bool = False,
) -> Any:
    """Run one certification against `draw(num)`, a synthetic source of class counts, and
    return its result: how to test a certifier's statistics without a model.

    `subject` is a certifier (API 2, or API 1 handed `draw` as its `counts`) with its
    `request`, running `certify` (or `predict` when `predict` is true), or a generator that
    one of them returned (then `request` is None). `draw` is answered in order, e.g.
    `lambda num: torch.from_numpy(rng.multinomial(num, probs))` for known class
    probabilities. A yield that is not a count of copies (an int >= 0) is a TypeError or
    ValueError here (`dmae certify` stops on it with one line naming the certifier).
    """
    if inspect.isgenerator(subject):
        if request is not None or predict:
            raise TypeError("simulate: a generator has its request already; pass request=None")
        running: Draws = subject
    elif request is None:
        raise TypeError("simulate: a certifier needs a CertifyRequest")
    elif certifier_api(subject) == 1:
        return (subject.predict if predict else subject.certify)(draw, request)
    else:
        running = (subject.predict if predict else subject.certify)(request)
    try:
        num = copies_asked(next(running))
        while True:
            num = copies_asked(running.send(draw(num)))
    except StopIteration as done:
        return done.value


def copies_asked(num: Any) -> int:
    """What an API-2 certifier yielded, checked: a number of noisy copies, an int >= 0."""
    if isinstance(num, bool):
        raise TypeError("a certifier yields how many noisy copies it wants, an int, not a bool")
    try:
        num = operator.index(num)
    except TypeError:
        raise TypeError(
            f"a certifier yields how many noisy copies it wants, an int, not {type(num).__name__}"
        ) from None
    if num < 0:
        raise ValueError(f"a certifier asked for {num} noisy copies; the number must be >= 0")
    return num


# -- the statistics of a certificate ----------------------------------------------------------
# Numbers in, a float out (what a certifier passes, fast: no array is built); numpy arrays in,
# broadcast together, a float64 array out (what `dmae report --alpha` passes, a file at once).
# Both ways compute the same bits. scipy is imported on the first call, not with this module:
# every command reads the plugin contracts, few compute a bound. The quantiles are scipy's
# special functions, the numbers `scipy.stats.beta.ppf` and `norm.ppf` compute underneath,
# without the distribution objects' argument handling (about 60 times faster per call).
FloatOrArray = TypeVar("FloatOrArray", float, np.ndarray)


def clopper_pearson_lower(
    successes: FloatOrArray, trials: FloatOrArray, alpha: float
) -> FloatOrArray:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on a binomial probability p.

    From `successes` k of `trials` n: the Beta(alpha; k, n - k + 1) quantile, i.e. statsmodels'
    `proportion_confint(k, n, 2 * alpha, method="beta")[0]`, and 0 where k = 0 (the quantile
    of a Beta with a zero parameter is undefined, the bound is 0). Exact: its coverage is at
    least 1 - alpha whatever p is, which is why the built-in certifiers use it.
    """
    from scipy.special import betaincinv

    if not isinstance(successes, np.ndarray) and not isinstance(trials, np.ndarray):
        if successes <= 0:
            return 0.0
        return float(betaincinv(successes, trials - successes + 1, alpha))
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, betaincinv(np.maximum(k, 1), trials - k + 1, alpha), 0.0)


def gaussian_radius(sigma: float, p_lower: FloatOrArray) -> FloatOrArray:
    """The L2 radius that `p_lower` certifies under N(0, sigma^2 I) noise; NaN below 1/2.

    When the smoothed classifier's top class has probability at least p_lower >= 1/2, its
    prediction is constant within sigma * PhiInverse(p_lower) (Cohen et al. 2019, Theorem 1).
    Below 1/2 no class is certain to win and the certifier abstains: NaN. A NaN `p_lower`
    (scipy's quantile fails for few votes at an extreme alpha such as 1e-300) abstains too:
    the test is `p_lower >= 1/2`, which a NaN fails (`p_lower < 1/2` would certify it).
    """
    from scipy.special import ndtri

    if not isinstance(p_lower, np.ndarray):
        return float(sigma * ndtri(p_lower)) if p_lower >= 0.5 else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p_lower >= 0.5, sigma * ndtri(p_lower), np.nan)


class CohenBound(NamedTuple):
    """What Cohen et al.'s CERTIFY concludes from its estimation counts (floats or arrays)."""

    pa_lower: Any  # the lower confidence bound on the selected class's probability pA
    radius: Any  # gaussian_radius(sigma, pa_lower): NaN where pa_lower < 1/2 (abstain)


def cohen_bound(sigma: float, count_top: FloatOrArray, n: FloatOrArray, alpha: float) -> CohenBound:
    """Cohen et al.'s certificate from `count_top` votes for the selected class among `n` noisy
    copies (fresh ones, not those that selected it) at confidence 1 - alpha.

    pA_lower = `clopper_pearson_lower(count_top, n, alpha)` and radius = `gaussian_radius(sigma,
    pA_lower)`, NaN (abstain) where pA_lower is not >= 1/2, a NaN pA_lower included. The
    `cohen` certifier and `dmae report --alpha` both compute their radii here, so a recomputed
    radius is the certifier's, bit for bit, at the same alpha.
    """
    pa_lower = clopper_pearson_lower(count_top, n, alpha)
    return CohenBound(pa_lower, gaussian_radius(sigma, pa_lower))


# -- checking a plugin against its contract ---------------------------------------------------
def _binds(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    """None if `fn` accepts these arguments, else why not."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    except ValueError:  # no signature to inspect (some builtins): assume it fits
        return None
    return None


def contract_problems(kind: str, obj: Any) -> list[str]:
    """What is wrong with plugin `obj` of `kind` ("backbone", "dataset", "certifier")."""
    if not callable(obj):
        return [f"expected a callable factory, got {type(obj).__name__}"]
    if kind == "backbone":
        why = _binds(obj, img_size=224, patch_size=16, in_chans=3)
        return [f"factory(*, img_size, patch_size, in_chans, **overrides): {why}"] if why else []
    if kind == "dataset":
        why = _binds(obj, "train", root=None, image_size=32, augment=False)
        return [f"factory(split, *, root, image_size, augment, **options): {why}"] if why else []
    if kind == "certifier":
        return _certifier_problems(obj)
    raise ValueError(f"unknown plugin kind {kind!r}")  # our bug, not the plugin's


def _certifier_problems(factory: Any) -> list[str]:
    why = _binds(factory)
    if why:
        return [f"factory(**options) must work with no options: {why}"]
    try:
        certifier = factory()
    except Exception as exc:  # a plugin's own failure: report it, never propagate it
        return [f"factory() raised {type(exc).__name__}: {exc}"]
    problems = []
    if not isinstance(getattr(certifier, "name", None), str):
        problems.append("has no `name` string")
    if not callable(getattr(certifier, "certify", None)):
        return [*problems, "has no `certify(request)` method"]
    api = certifier_api(certifier)
    params = "(request)" if api == 2 else "(counts, request)"
    args = (_PROBE,) if api == 2 else (lambda num: None, _PROBE)
    for method in ("certify", "predict"):
        fn = getattr(certifier, method, None)
        if not callable(fn):
            problems.append(f"has no `{method}{params}` method")
        elif why := _binds(fn, *args):
            problems.append(f"`{method}{params}`: {why}")
        elif api == 2 and (why := _not_a_generator(fn)):
            problems.append(f"`{method}(request)` {why}")
    return problems


def _not_a_generator(method: Callable[[CertifyRequest], Any]) -> str | None:
    """Why `method(request)` is no API-2 generator, or None. Calling a generator function only
    creates the generator (none of its code runs), which is closed at once."""
    try:
        running = method(_PROBE)
    except Exception as exc:  # a plugin's own failure: report it, never propagate it
        return f"raised {type(exc).__name__}: {exc}"
    if not inspect.isgenerator(running):
        return f"returned {type(running).__name__}, not a generator (API 2 yields its draws)"
    running.close()
    return None
