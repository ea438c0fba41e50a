"""What a recipe field declares besides its type and default, as dataclass field metadata.

A constraint (`positive()`, `closed(0, 1)`, ...) is a test and the words that say what it
expects; the loader applies it to every value, from a file, `--set` or a typed option alike. A
`flag(...)` makes the field a command-line option: its names and help live here, beside the
field, and the commands build their options from them (`dmae_cli.cli.options`). Combine both
with `|`: `field(default=100, metadata=positive() | flag("Selection samples per image."))`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], bool]

MAX_SIDE = 16384  # pixels: an image or model side, as `dmae_cli.models.spec.MAX_SIDE` allows
MAX_TOKENS = 1 << 16  # patches of a model's grid (256 x 256), as `models.spec.MAX_TOKENS`
MAX_SEED = 2**63 - 1  # torch generators take up to 2**64 - 1: room for seed + rank + epoch
# Noise levels are in pixel units, pixels in [0, 1]. Published results use sigma <= 1 (Cohen et
# al. 2019, DMAE); at 10 the noise is ten times the whole pixel range and a classifier sees only
# noise. The bound also keeps every certified radius, sigma * Phi^-1(pA) with Phi^-1 of a float
# pA < 1 below 8.3 (float64), finite: at most 83 pixels.
MAX_SIGMA = 10.0
MAX_NOISE_LEVELS = 64  # levels of one DMAE (pretrain.sigma), as a model description allows
DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,4})?")


# -- constraints ----------------------------------------------------------------------------
def _check(test: Check, expected: str | Callable[[Any], str]) -> dict[str, Any]:
    """`expected` says what the test wants; a function of the value when that depends on it."""
    return {"check": test, "expected": expected}


def positive() -> dict[str, Any]:
    return _check(lambda v: v > 0, "a number > 0")


def non_negative() -> dict[str, Any]:
    return _check(lambda v: v >= 0, "a number >= 0")


def all_positive() -> dict[str, Any]:
    return _check(lambda v: len(v) > 0 and all(x > 0 for x in v), "one or more numbers > 0")


def all_non_negative() -> dict[str, Any]:
    return _check(lambda v: len(v) > 0 and all(x >= 0 for x in v), "one or more numbers >= 0")


def half_open(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo <= v < hi, f"a number in [{lo}, {hi})")


def open_interval(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo < v < hi, f"a number in ({lo}, {hi})")


def closed(lo: float, hi: float) -> dict[str, Any]:
    return _check(lambda v: lo <= v <= hi, f"a number in [{lo}, {hi}]")


def batch_size_setting() -> dict[str, Any]:
    """An integer >= 1, or auto (0 also): the field is typed Any, so its type is checked here."""
    return _check(
        lambda v: v == "auto" or (type(v) is int and v >= 0),
        "an integer >= 1, or auto (0 also means auto)",
    )


def parallel_setting() -> dict[str, Any]:
    """An integer >= 1, or auto: the field is typed Any, so its type is checked here."""
    return _check(lambda v: v == "auto" or (type(v) is int and v >= 1), "an integer >= 1, or auto")


def side() -> dict[str, Any]:
    """An image side in pixels, from 1 to `MAX_SIDE`."""
    return _check(lambda v: 1 <= v <= MAX_SIDE, f"an integer from 1 to {MAX_SIDE}")


def seed_range() -> dict[str, Any]:
    return _check(lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to 2**63 - 1 ({MAX_SEED})")


def noise_level_or_levels() -> dict[str, Any]:
    """One noise level, or a list of distinct ones (pretrain.sigma: each image draws one)."""

    def test(v: Any) -> bool:
        levels = v if isinstance(v, tuple) else (v,)
        in_range = all(0 < x <= MAX_SIGMA for x in levels)
        return in_range and 0 < len(set(levels)) == len(levels) <= MAX_NOISE_LEVELS

    def expected(v: Any) -> str:
        if not isinstance(v, tuple):
            return f"a number > 0 and <= {MAX_SIGMA:g}"
        return f"a list of 1 to {MAX_NOISE_LEVELS} distinct numbers > 0 and <= {MAX_SIGMA:g}"

    return _check(test, expected)


def noise_levels(clean: bool = False) -> dict[str, Any]:
    """One or more noise levels; `clean` also allows 0, a model trained without noise."""
    if clean:
        return _check(
            lambda v: len(v) > 0 and all(0 <= x <= MAX_SIGMA for x in v),
            f"one or more numbers >= 0 and <= {MAX_SIGMA:g} (0: no noise, a clean classifier)",
        )
    return _check(
        lambda v: len(v) > 0 and all(0 < x <= MAX_SIGMA for x in v),
        f"one or more numbers > 0 and <= {MAX_SIGMA:g}",
    )


def plain_name() -> dict[str, Any]:
    """A run's name: one directory under runs_dir, never a path that leaves it."""
    return _check(
        lambda v: (
            v not in ("", ".", "..")
            and not any(c in v for c in "/\\\0")
            and len(v.encode("utf-8", "surrogatepass")) <= 255
        ),
        "a plain name (no '/', '\\', '..'; at most 255 bytes): outputs go to runs_dir/<name>/",
    )


def device_name() -> dict[str, Any]:
    """The device's name only: whether the machine has it is checked when a stage starts."""
    return _check(lambda v: _DEVICE.fullmatch(v) is not None, DEVICES)


def optional(meta: dict[str, Any]) -> dict[str, Any]:
    return _check(lambda v: v is None or meta["check"](v), f"null or {meta['expected']}")


# -- command-line options -------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """How a recipe field is typed on the command line.

    `names` default to --field-name (--field-name/--no-field-name for a bool). A field typed
    Any takes text, which `parse` turns into its value; any other field takes its own type
    (a tuple of numbers a repeatable option), and its value reaches the recipe as typed.
    """

    help: str
    names: tuple[str, ...] = ()
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None


def flag(
    help: str,
    *names: str,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Metadata making a field a command-line option; the help is also the field's doc."""
    return {"flag": Flag(help, names, metavar, parse)}


def number_or_word(text: str) -> int | str:
    """`--batch-size 500` is a number, `--batch-size auto` a word; the field checks either."""
    try:
        return int(text)
    except ValueError:
        return text
