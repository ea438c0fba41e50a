"""What a recipe field declares besides its type and default, as dataclass field metadata.

A constraint (`positive()`, `closed(0, 1)`, ...) is a test and the words that say what it
expects; the loader applies it to every value, from a file, `--set` or a typed option alike. A
`flag(...)` makes the field a command-line option: its names and help live here, beside the
field, and the commands build their options from them (`dmae_cli.cli.options`). Combine both
with `|`: `field(default=100, metadata=positive() | flag("Selection samples per image."))`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], bool]


# -- constraints ----------------------------------------------------------------------------
def _check(test: Check, expected: str) -> dict[str, Any]:
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
