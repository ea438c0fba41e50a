"""A command's recipe options, built from the recipe's field declarations.

A recipe field that a command takes as an option declares the option's names and help beside
its type and default (`flag(...)` in `dmae_cli.config.schema`). `@recipe_options("certify",
"seed")` gives the decorated command one option per such field, each typed as the field is
(a tuple of numbers becomes a repeatable option) and defaulting to "not given", with the key
path appended to its help. The command receives what was given as one mapping, `typed`
({"certify.alpha": 1e-05, ...}), which `load_recipe` puts in place after the recipe file and
the `--set` items: a typed value is never turned back into text, so every float round-trips.

Typer reads a command's parameters from its signature, so the decorator sets `__signature__`.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from dmae_cli.config import recipe as recipes
from dmae_cli.config.recipe import RecipeOption

F = TypeVar("F", bound=Callable[..., Any])
TYPED = "typed"  # the decorated command's parameter receiving {key path: value}


def recipe_options(*keys: str) -> Callable[[F], F]:
    """Give the command an option for every flagged recipe field under `keys` (sections or
    fields, e.g. "certify", "seed"), in place of its `typed` parameter."""
    options = recipes.recipe_options(*keys)

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        if TYPED not in signature.parameters:
            raise TypeError(f"{command.__name__} needs a '{TYPED}' parameter")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            typed = {}
            for option in options:
                value = kwargs.pop(parameter_name(option), None)
                if value is not None:
                    typed[option.key] = typed_value(option, value)
            return command(**kwargs, **{TYPED: typed})

        parameters: list[inspect.Parameter] = []
        for name, parameter in signature.parameters.items():
            if name == TYPED:
                parameters += [typer_parameter(option) for option in options]
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def parameter_name(option: RecipeOption) -> str:
    """certify.max_examples -> certify__max_examples (a Python name, never a user's)."""
    return option.key.replace(".", "__")


def typer_parameter(option: RecipeOption) -> inspect.Parameter:
    """The Typer option of one recipe field: its type, its names and its help."""
    flag = option.flag
    names = flag.names or default_names(option)
    help_text = f"{flag.help.removesuffix('.')} ({option.key})."
    typer_option = typer.Option(*names, help=help_text, metavar=flag.metavar, show_default=False)
    annotation = Annotated[option_type(option) | None, typer_option]  # type: ignore[valid-type]
    return inspect.Parameter(
        parameter_name(option), inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None
    )


def default_names(option: RecipeOption) -> tuple[str, ...]:
    """--field-name, or --field-name/--no-field-name for a bool."""
    dashed = option.key.rsplit(".", 1)[-1].replace("_", "-")
    return (f"--{dashed}/--no-{dashed}",) if option.hint is bool else (f"--{dashed}",)


def option_type(option: RecipeOption) -> Any:
    """What the option parses: the field's type, text when the field parses its own (typed
    Any), a list for a tuple of any length; optional fields take their inner type."""
    if option.flag.parse is not None:
        return str
    hint = option.hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[args[0]]  # type: ignore[valid-type]
    if hint is typing.Any:
        raise TypeError(f"recipe field {option.key} is typed Any: its flag needs a parse")
    return hint


def typed_value(option: RecipeOption, value: Any) -> Any:
    """The value for the recipe: parsed by the field's own `parse` when it has one."""
    return option.flag.parse(value) if option.flag.parse is not None else value
