"""Plugin registries: one per entry-point group, loaded lazily, failures contained.

Backbones, datasets and certifiers are found through Python entry points, first-party ones
included, so the core never imports a plugin module by name. Listing reads only metadata;
a plugin's module is imported the first time it is asked for. A plugin that fails to import is
reported as a warning naming it and its error, and every other plugin keeps working.

`DMAE_PLUGINS` restricts which distributions may provide plugins: `all` (default), `builtin`
(only the `dmae` distribution, what the test suite uses) or a comma-separated list of
distribution names (`dmae` is always included).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dmae_cli.api import contract_problems
from dmae_cli.runtime.errors import UserError

try:  # Python >= 3.10 has a stdlib version, the backport follows the newest API.
    import importlib_metadata as metadata
except ImportError:  # pragma: no cover - the dependency is declared for < 3.12 only
    from importlib import metadata  # type: ignore[no-redef]

BUILTIN_DISTRIBUTION = "dmae"
PLUGINS_ENV = "DMAE_PLUGINS"

T = TypeVar("T")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the rest of the registry is unaffected."""


@dataclass
class PluginEntry:
    """One registered plugin: where it comes from and, once loaded, the object itself."""

    name: str
    kind: str
    distribution: str
    version: str
    target: str  # "module:attribute", or a description for plugins registered in code
    loader: Callable[[], Any] = field(repr=False)
    in_code: bool = False  # registered with `Registry.add`, not an entry point
    _obj: Any = field(default=None, repr=False)
    _loaded: bool = field(default=False, repr=False)

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION

    @property
    def qualified_name(self) -> str:
        return f"{self.distribution}:{self.name}"

    def load(self) -> Any:
        """Import the plugin and check it against its contract (both once); raise on failure."""
        if not self._loaded:
            obj = self.loader()
            problems = contract_problems(self.kind, obj)
            if problems:
                raise ContractError(f"violates the {self.kind} contract: {'; '.join(problems)}")
            self._obj, self._loaded = obj, True
        return self._obj


class ContractError(Exception):
    """A plugin loaded but does not implement its contract (see `dmae_cli.api`)."""


def allowed_distributions() -> set[str] | None:
    """The distributions `DMAE_PLUGINS` allows, or None for all of them."""
    value = os.environ.get(PLUGINS_ENV, "all").strip()
    if value in ("", "all"):
        return None
    if value == "builtin":
        return {BUILTIN_DISTRIBUTION}
    names = {part.strip() for part in value.split(",") if part.strip()}
    return names | {BUILTIN_DISTRIBUTION}


class Registry(Generic[T]):
    """The plugins of one kind, found through the entry-point group `dmae.<kind>s`."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: list[PluginEntry] | None = None
        self._added: list[PluginEntry] = []

    # -- discovery --------------------------------------------------------------------------
    def _discover(self) -> list[PluginEntry]:
        allowed = allowed_distributions()
        found: list[PluginEntry] = []
        for ep in metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            if allowed is not None and dist not in allowed:
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            found.append(PluginEntry(ep.name, self.kind, dist, version, ep.value, ep.load))
        return found

    def entries(self) -> list[PluginEntry]:
        """Every plugin of this kind, without importing any of them."""
        if self._entries is None:
            self._entries = self._discover()
        return sorted(self._entries + self._added, key=lambda e: (e.name, not e.builtin))

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def __iter__(self) -> Iterator[PluginEntry]:
        return iter(self.entries())

    def refresh(self) -> None:
        """Forget what was discovered (after installing or removing a distribution)."""
        self._entries = None

    # -- registration in code (tests, notebooks) ---------------------------------------------
    def add(self, name: str, obj: T, distribution: str = "__main__") -> PluginEntry:
        """Register `obj` under `name` without an entry point; undo with `remove`."""
        entry = PluginEntry(name, self.kind, distribution, "0", repr(obj), lambda: obj, True)
        self._added.append(entry)
        return entry

    def remove(self, name: str) -> None:
        self._added = [e for e in self._added if e.name != name]

    # -- lookup ------------------------------------------------------------------------------
    def entry(self, name: str) -> PluginEntry:
        """The entry for `name` or `distribution:name`; one clear error when it is ambiguous."""
        dist, _, short = name.rpartition(":")
        matches = [
            e for e in self.entries() if e.name == short and (not dist or e.distribution == dist)
        ]
        if not matches:
            available = ", ".join(self.names()) or "none"
            raise UserError(f"unknown {self.kind} '{name}'; available: {available}")
        if len(matches) > 1:
            options = ", ".join(e.qualified_name for e in matches)
            raise UserError(
                f"{self.kind} '{name}' is provided by several distributions; pick one of: {options}"
            )
        return matches[0]

    def get(self, name: str) -> T:
        """Load and return the plugin object; an import failure becomes one clear error."""
        entry = self.entry(name)
        try:
            return entry.load()
        except Exception as exc:  # a broken plugin must never take the CLI down with it
            raise UserError(
                f"{self.kind} '{name}' from {entry.distribution} {describe_failure(exc)}"
            ) from exc

    def load_all(self) -> dict[str, T]:
        """Load every plugin, warning about (and skipping) those that fail."""
        loaded: dict[str, T] = {}
        for entry in self.entries():
            try:
                loaded[entry.qualified_name] = entry.load()
            except Exception as exc:
                warnings.warn(
                    f"{self.kind} plugin '{entry.name}' from {entry.distribution} "
                    f"{describe_failure(exc)}",
                    PluginWarning,
                    stacklevel=2,
                )
        return loaded


def describe_failure(exc: BaseException) -> str:
    """'failed to load: ImportError: ...' or 'violates the ... contract: ...'."""
    if isinstance(exc, ContractError):
        return str(exc)
    return f"failed to load: {type(exc).__name__}: {exc}"


backbones: Registry[Any] = Registry("backbone", "dmae.backbones")
datasets: Registry[Any] = Registry("dataset", "dmae.datasets")
certifiers: Registry[Any] = Registry("certifier", "dmae.certifiers")

REGISTRIES: dict[str, Registry[Any]] = {
    "backbone": backbones,
    "dataset": datasets,
    "certifier": certifiers,
}
