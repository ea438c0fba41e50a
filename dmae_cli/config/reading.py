"""Recipe YAML read within bounds, and values shown in error messages within bounds.

A recipe is a few kilobytes and a few hundred values, a few levels deep. A file or `--set` value
that is far from that (a huge file, a YAML "billion laughs" of nested aliases, thousands of
nested brackets, an alias inside itself) stops here with one line, before it costs minutes or
gigabytes; and a message names a wrong value by its first few items (`show`), never by a repr
of the whole. `dmae_cli.config.recipe` builds the config from what is read here.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from dmae_cli.runtime.errors import UserError


class RecipeError(UserError):
    """A recipe (or an override) that cannot become a valid config."""


MAX_RECIPE_BYTES = 1_000_000
MAX_VALUES = 100_000  # values once YAML aliases are expanded, each use of an alias counted
MAX_DEPTH = 32  # nested mappings and lists


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The mapping a recipe file holds; the only place a recipe file is read."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        with path.open("rb") as handle:
            content = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    if len(content) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few kilobytes of YAML"
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """The YAML document in `text`, within the bounds above, or `RecipeError` naming `where`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}{line}: malformed YAML: {cut(problem)}") from None
    except RecursionError:
        raise RecipeError(f"{where}: malformed YAML: nested too deeply") from None
    except ValueError as exc:  # a scalar YAML cannot build: 2024-13-45, an int of 5,000 digits
        raise RecipeError(f"{where}: malformed YAML: {cut(str(exc))}") from None
    problem = _oversized(data)
    if problem is not None:
        raise RecipeError(f"{where}: {problem}")
    return data


class _Refused(Exception):
    """Why `_oversized` stopped measuring."""


def _oversized(data: Any) -> str | None:
    """What makes `data` too large or deep for a recipe (see MAX_VALUES), or None.

    Sizes are counted as if every alias were expanded, as saving the recipe or handing an
    option to a plugin would, but each distinct list or mapping is visited once, so a billion
    laughs costs a few hundred steps. An alias inside the value it names (a cycle) is refused.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, depth) once measured
    open_ids: set[int] = set()

    def measure(node: Any, depth: int) -> tuple[int, int]:
        if not isinstance(node, dict | list):
            return 1, 0
        key = id(node)
        if key in open_ids:
            raise _Refused("a YAML alias refers to a value that contains it (a cycle)")
        if depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
        if key not in sizes:
            open_ids.add(key)
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            count, height = 1, 0
            for child in children:
                values, below = measure(child, depth + 1)
                count, height = count + values, max(height, below + 1)
                if count > MAX_VALUES:
                    raise _Refused(
                        f"more than {MAX_VALUES:,} values (each use of a YAML alias counted); "
                        "a recipe holds a few hundred"
                    )
            open_ids.discard(key)
            sizes[key] = count, height
        values, height = sizes[key]
        if depth + height > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
        return values, height

    try:
        measure(data, 0)
    except _Refused as exc:
        return str(exc)
    return None


_REPR = reprlib.Repr()  # a value's first few items and digits, whatever its size
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60


def show(value: Any) -> str:
    """A value in a message: bounded, however large or deeply nested the value is."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit; a cycle
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def cut(text: str, limit: int = 200) -> str:
    """`text` on one line and at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
