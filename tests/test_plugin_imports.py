"""Plugins import nothing of dmae but its public API, `dmae_cli.api`: dmae's own plugins, the
example certifier and the third-party test package alike. A first-party plugin that reached
into dmae's internals would work only because it ships with them, and would show third parties
a way that breaks on the next release. The test reads the imports; it runs no code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted(
    [
        *(ROOT / "plugins" / "dmae_plugins").rglob("*.py"),
        *(ROOT / "plugins" / "dmae-example-certifier" / "dmae_example_certifier").rglob("*.py"),
        *(ROOT / "tests" / "plugin_pkgs").rglob("*.py"),
    ]
)
PUBLIC = "dmae_cli.api"


def dmae_imports(source: str) -> list[str]:
    """Every dmae module `source` imports, at the top or inside a function, as written."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += names if node.module == "dmae_cli" else [node.module]
    return [name for name in found if name.split(".")[0] == "dmae_cli"]


def test_there_are_plugins_to_read() -> None:
    assert len(PLUGIN_SOURCES) > 10


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_plugin_imports_only_the_public_api(path: Path) -> None:
    internal = [name for name in dmae_imports(path.read_text()) if name != PUBLIC]
    assert internal == [], f"{path.relative_to(ROOT)} imports dmae internals: {internal}"


@pytest.mark.parametrize(
    ("source", "internal"),
    [
        ("from dmae_cli.api import DatasetInfo", []),
        ("from dmae_cli import api", []),
        ("from dmae_cli.runtime.errors import UserError", ["dmae_cli.runtime.errors"]),
        ("def f():\n    import dmae_cli.data.manifest", ["dmae_cli.data.manifest"]),
        ("from dmae_cli import runtime", ["dmae_cli.runtime"]),
    ],
)
def test_the_check_sees_an_internal_import(source: str, internal: list[str]) -> None:
    assert [n for n in dmae_imports(source) if n != PUBLIC] == internal
