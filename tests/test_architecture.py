"""The tree is the architecture diagram: imports run only downwards, no stage imports another
stage, and nothing imports in a circle. These tests read the imports; they run no code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmae_cli"
# Each folder's floor: a module may import its own floor and the floors below.
FLOORS = {
    "api": 0,
    "runtime": 0,
    "config": 1,
    "plugins": 1,
    "data": 2,
    "models": 2,
    "smoothing": 3,
    "training": 3,
    "report": 3,
    "cli": 4,
    "__main__": 5,  # python -m dmae_cli
}
# The package itself (dmae_cli/__init__.py) re-exports the Python API, which sits on the
# smoothing floor, so it stands above the command line; every module may still read its
# `__version__` (an import of the package is not an edge, see `imports`).
PACKAGE_FLOOR = 5
# The stages: what one command runs. They share the floors below, never each other.
STAGES = {
    "dmae_cli.data.shard",
    "dmae_cli.training.pretrain",
    "dmae_cli.training.finetune",
    "dmae_cli.training.denoiser",
    "dmae_cli.smoothing.certify",
    "dmae_cli.smoothing.estimate",
    "dmae_cli.report.run",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The dmae_cli modules `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known and name != "dmae_cli"}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) for name, path in known.items()}


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return PACKAGE_FLOOR
    return FLOORS.get(parts[1], 0)


def test_every_folder_has_a_floor() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders <= set(FLOORS), f"give {folders - set(FLOORS)} a floor in FLOORS"


def test_imports_run_only_downwards() -> None:
    upward = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, targets in graph().items()
        for b in targets
        if floor(b) > floor(a)
    ]
    assert upward == []


def test_no_stage_imports_another_stage() -> None:
    edges = graph()
    assert set(edges) >= STAGES, f"unknown stage modules: {STAGES - set(edges)}"
    crossing = [f"{a} imports {b}" for a in STAGES for b in edges[a] if b in STAGES]
    assert crossing == []


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"a"}}, 1), ({"a": {"b"}, "b": set()}, 0)],
)
def test_the_cycle_check_sees_a_cycle(
    monkeypatch: pytest.MonkeyPatch, edges: dict[str, set[str]], expected: int
) -> None:
    monkeypatch.setitem(globals(), "graph", lambda: edges)
    if expected:
        with pytest.raises(AssertionError):
            test_no_import_cycles()
    else:
        test_no_import_cycles()
