"""Recipes: YAML files turned into typed, frozen, validated config objects.

Precedence is defaults < recipe file < `--set a.b=c` overrides < typed options. Values of
`--set` are parsed with YAML's scalar rules (`--set finetune.sigma=[0.25,0.5]` is a list); a
typed option (`dmae certify --alpha 1e-5`) arrives as its value and is never re-parsed. Either
way every value passes the same checks, and every mistake (bad YAML, unknown key, wrong type,
out-of-range value) raises `RecipeError` naming the source, the key path and what was expected.
The resolved recipe is written next to every run's outputs.

The objects themselves are declared in `dmae_cli.config.schema` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dmae_cli.config.fields import Flag
from dmae_cli.config.reading import RecipeError, cut, parse_yaml, read_recipe_file, show
from dmae_cli.config.schema import (
    CertifyConfig,
    DataConfig,
    DenoiserConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    ProbeConfig,
    Recipe,
    sigma_name,
)

__all__ = [
    "CertifyConfig",
    "DataConfig",
    "DenoiserConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "ProbeConfig",
    "Recipe",
    "RecipeError",
    "RecipeOption",
    "apply_typed",
    "load_recipe",
    "read_recipe_file",
    "recipe_options",
    "recipe_to_dict",
    "recipe_to_yaml",
    "sigma_name",
]

INT64 = 2**63  # integers go to torch and numpy: |value| < 2**63


# -- loading ------------------------------------------------------------------------------------
def load_recipe(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    typed: Mapping[str, Any] | None = None,
) -> Recipe:
    """Read a recipe file (or start from defaults when `path` is None), apply the `--set`
    items, then the `typed` values ({key path: value}, from a command's options)."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_recipe_file(Path(path))
    for item in overrides:
        _apply_override(raw, item, source)
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    return apply_typed(_build(Recipe, raw, source, ""), typed or {}, source)


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {show(item)}: expected KEY.PATH=VALUE, e.g. pretrain.epochs=10")
    value = parse_yaml(text, f"--set {show(item)}") if text.strip() else None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: {cut(key)}: '{cut(part)}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, source: str, path: str) -> Any:
    """Turn a mapping into dataclass `cls`, checking keys, types and ranges on the way."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {path or 'top level'}: expected a mapping, got {show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if not isinstance(key, str) or key not in fields:
            where = cut(f"{path}.{key}" if path else str(key))
            close = difflib.get_close_matches(str(key)[:100], list(fields), n=1)
            hint = (
                f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            )
            raise RecipeError(f"{source}: unknown key '{where}'{hint}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key_path = f"{path}.{name}" if path else name
        values[name] = _checked(fields[name], hints[name], value, source, key_path)
    return _consistent(cls(**values), source, path)


def _consistent(config: Any, source: str, path: str) -> Any:
    """`config`, if its fields agree with one another (its `mismatch()`), else `RecipeError`."""
    mismatch = getattr(config, "mismatch", None)
    found = mismatch() if mismatch is not None else None
    if found is None:
        return config
    key, expected, value = found
    raise RecipeError(
        f"{source}: {f'{path}.{key}' if path else key}: expected {expected}, got {show(value)}"
    )


def _checked(
    spec: dataclasses.Field[Any], hint: Any, value: Any, source: str, key_path: str
) -> Any:
    """`value` converted to the field's type and tested against its constraint."""
    value = _convert(hint, value, source, key_path)
    meta = spec.metadata
    if "check" in meta and not meta["check"](value):
        got = "null" if value is None else show(value)
        expected = meta["expected"]
        expected = expected(value) if callable(expected) else expected
        raise RecipeError(f"{source}: {key_path}: expected {expected}, got {got}")
    if type(value) is int and not -INT64 <= value < INT64:  # an int field or one typed Any
        raise RecipeError(
            f"{source}: {key_path}: expected an integer below 2**63 in size, got {show(value)}"
        )
    return value


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    """`value` as type `tp` (a dataclass is built, a tuple from a list), or `RecipeError`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> RecipeError:
        return RecipeError(f"{source}: {path}: expected {expected}, got {show(value)}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, source, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # a number or a list of numbers (pretrain.sigma): the value says
            listed = isinstance(value, list | tuple)
            inner = [a for a in inner if (typing.get_origin(a) is tuple) == listed] or inner
        return _convert(inner[0], value, source, path)
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(map(str, args)))
        return value
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(
            _convert(a, v, source, f"{path}[{i}]")
            for i, (a, v) in enumerate(zip(args, items, strict=True))
        )
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    return _convert_scalar(tp, value, path, fail)


def _convert_scalar(tp: Any, value: Any, path: str, fail: Callable[[str], RecipeError]) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_like_number(value):
            # YAML 1.1 reads 4e-3 as a string; only 4.0e-3 is a float.
            raise fail("a number (in YAML write exponents with a decimal point, e.g. 4.0e-3)")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        if not math.isfinite(value):  # .nan or .inf would only fail later, deep in training
            raise fail("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"recipe field {path} has an unsupported type {tp!r}")  # our bug


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- typed values: a command's options --------------------------------------------------------
@dataclass(frozen=True)
class RecipeOption:
    """A recipe field that a command takes as an option: where it is and how it is typed."""

    key: str  # its key path, e.g. certify.alpha
    hint: Any  # the field's type
    flag: Flag


def recipe_options(*keys: str) -> list[RecipeOption]:
    """The fields with a `flag` under `keys`, each a section (certify: its flagged fields, in
    declaration order) or a field (seed)."""
    found: list[RecipeOption] = []
    for key in keys:
        owner = Recipe
        *sections, name = key.split(".")
        for section in sections:
            owner = typing.get_type_hints(owner)[section]
        hint = typing.get_type_hints(owner)[name]
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            items = [(f"{key}.{f.name}", f, hints[f.name]) for f in dataclasses.fields(hint)]
        else:
            items = [(key, _field(owner, name), hint)]
        found += [
            RecipeOption(k, h, f.metadata["flag"]) for k, f, h in items if "flag" in f.metadata
        ]
    return found


def apply_typed(recipe: Recipe, typed: Mapping[str, Any], source: str) -> Recipe:
    """`recipe` with the `typed` values ({key path: value}) put in place by
    `dataclasses.replace`, each checked as a value in a recipe file is."""
    for key, value in typed.items():
        recipe = _replace_at(recipe, key.split("."), value, source, key)
    return recipe


def _replace_at(config: Any, parts: list[str], value: Any, source: str, key: str) -> Any:
    name = parts[0]
    if len(parts) > 1:
        inner = _replace_at(getattr(config, name), parts[1:], value, source, key)
        return dataclasses.replace(config, **{name: inner})
    hint = typing.get_type_hints(type(config))[name]
    checked = _checked(_field(type(config), name), hint, value, source, key)
    replaced = dataclasses.replace(config, **{name: checked})
    return _consistent(replaced, source, key.rpartition(".")[0])


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    for spec in dataclasses.fields(cls):
        if spec.name == name:
            return spec
    raise KeyError(f"{cls.__name__} has no field '{name}'")  # our bug, not the user's


# -- saving -------------------------------------------------------------------------------------
def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain, YAML-safe dict of the resolved recipe (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
