"""A plugin's one-line description, from metadata only: no plugin module is imported.

`dmae plugins` lists plugins without running their code, so a broken plugin cannot break the
listing and a slow one cannot slow it. The description is the first line of the plugin object's
docstring, read from its module's source with `ast` (the module is located the way the import
system would, without executing it or its parent packages), or else the providing
distribution's summary.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from dmae_cli.plugins.registry import PluginEntry, metadata

MAX_SOURCE_BYTES = 2 * 2**20  # a plugin module larger than this is described by its summary


def describe(entry: PluginEntry) -> str:
    """The first line of the plugin's docstring, else its distribution's summary, else ''."""
    if entry.in_code:  # registered in code: the object is already in memory
        return first_line(getattr(entry.loader(), "__doc__", None))
    module, _, attribute = entry.target.partition(":")
    source = module_file(module.strip())
    doc = docstring_in(source, attribute.strip()) if source else None
    return first_line(doc) or distribution_summary(entry.distribution)


def first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def module_file(module: str) -> Path | None:
    """The source file of `module`, found without importing it or its parent packages."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: no parent to import
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    folders = [Path(p) for p in spec.submodule_search_locations or ()]
    for depth, part in enumerate(rest, start=1):
        last = depth == len(rest)
        found = [f / part for f in folders if (f / part / "__init__.py").is_file()]
        if last:
            files = [f / f"{part}.py" for f in folders if (f / f"{part}.py").is_file()]
            files += [p / "__init__.py" for p in found]
            return files[0] if files else None
        folders = found
    return None


def docstring_in(source: Path, attribute: str) -> str | None:
    """The docstring of the top-level function or class `attribute` (a dotted path into a
    class, or a name assigned from another definition) in the module at `source`."""
    try:
        if source.stat().st_size > MAX_SOURCE_BYTES:
            return None
        tree = ast.parse(source.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    body: list[ast.stmt] = tree.body
    node: ast.AST | None = None
    for part in attribute.split("."):
        node = _definition(body, part)
        if node is None:
            return None
        body = getattr(node, "body", [])
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return ast.get_docstring(node)
    return None


def _definition(body: list[ast.stmt], name: str) -> ast.AST | None:
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in body:
        if isinstance(node, definitions) and node.name == name:
            return node
    for node in body:  # `name = other`: an alias of a definition in the same module
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            value = node.value  # type: ignore[union-attr]
            if isinstance(value, ast.Name) and value.id != name:
                return _definition(body, value.id)
    return None


def distribution_summary(distribution: str) -> str:
    try:
        return first_line(metadata.distribution(distribution).metadata.get("Summary"))
    except Exception:  # metadata a plugin's author wrote: a listing never fails on it
        return ""
