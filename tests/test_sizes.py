"""Sizes a reader can hold in their head: modules of at most a few hundred lines, functions that
fit on a screen. Declarative option lists (a command's signature of Typer options) are the
exception: their length is one line per option, not logic."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
SOURCES = sorted([*(ROOT / "dmae_cli").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The function's lines from the end of its signature (a declarative option list) on."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):  # the docstring
        first = node.body[1] if len(node.body) > 1 else first
    return node.end_lineno - first.lineno + 1 if node.end_lineno else 0


def test_modules_fit_in_a_sitting() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in SOURCES
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_functions_fit_on_a_screen() -> None:
    long = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if function and (n := body_lines(node)) > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert long == {}
