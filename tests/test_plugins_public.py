"""Plugins as a public API: `dmae plugins --check` on broken third-party distributions, and
the example plugin (plugins/dmae-example-certifier) used by name once it is installed.

Third-party distributions are throw-away .dist-info directories on a temporary sys.path
entry; every registry is refreshed before and after, so no other test sees them.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.plugins import registry
from dmae_cli.smoothing.runfile import COLUMNS, Row, read_lines
from tests.test_certify import RECIPE, save_classifier
from tests.test_registry import make_distribution

runner = CliRunner()


def refresh_all() -> None:
    for reg in registry.REGISTRIES.values():
        reg.refresh()


@pytest.fixture
def all_plugins(monkeypatch: pytest.MonkeyPatch):
    """Every installed distribution may provide plugins (the suite defaults to built-ins)."""
    monkeypatch.setenv("DMAE_PLUGINS", "all")
    refresh_all()
    yield
    refresh_all()  # monkeypatch undoes sys.path and DMAE_PLUGINS after this; lookups are lazy


@pytest.fixture
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, all_plugins: None) -> None:
    """Two third-party certifiers: one whose module raises on import, one without `predict`."""
    make_distribution(
        tmp_path / "exploding",
        "dmae-exploding",
        "dmae.certifiers",
        {"exploding": "exploding_certifier:Exploding"},
        {"exploding_certifier": "raise RuntimeError('boom at import')\n"},
    )
    make_distribution(
        tmp_path / "half",
        "dmae-half",
        "dmae.certifiers",
        {"half": "half_certifier:Half"},
        {
            "half_certifier": '''
                class Half:
                    """Certifies, but cannot predict."""

                    name = "half"

                    def certify(self, counts, request):
                        return None
            '''
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path / "exploding"))
    monkeypatch.syspath_prepend(str(tmp_path / "half"))
    refresh_all()


def test_check_reports_both_broken_plugins_and_keeps_the_builtins(broken: None) -> None:
    result = runner.invoke(app, ["plugins", "--check"])
    assert result.exit_code == 1, result.output
    summary = " ".join(result.stderr.split())  # rich wraps long lines
    assert "2 plugin(s) failed" in summary
    assert "certifier dmae-exploding:exploding" in summary
    assert "certifier dmae-half:half" in summary

    result = runner.invoke(app, ["plugins", "--check", "--json"])
    assert result.exit_code == 1
    rows = {(r["distribution"], r["name"]): r for r in json.loads(result.stdout)}
    exploding, half = rows["dmae-exploding", "exploding"], rows["dmae-half", "half"]
    assert exploding["status"] == "failed" and exploding["origin"] == "third-party"
    assert exploding["error"] == "failed to load: RuntimeError: boom at import"
    assert exploding["description"] == ""  # its module has no docstring, its METADATA no summary
    assert half["status"] == "failed" and half["version"] == "0.3"
    assert half["error"].startswith("violates the certifier contract: has no `predict")
    assert half["description"] == "Certifies, but cannot predict."
    builtins = [r for (dist, _), r in rows.items() if dist == "dmae"]
    assert {r["name"] for r in builtins if r["kind"] == "certifier"} == {"cohen", "sequential"}
    assert all(r["status"] in ("ok", "not checked: needs data") for r in builtins)
    assert all(r["error"] is None for r in builtins if r["status"] == "ok")
    assert registry.certifiers.get("cohen")().name == "cohen"  # built-ins still work


def test_check_passes_with_builtins_only() -> None:
    assert runner.invoke(app, ["plugins", "--check"]).exit_code == 0


# -- the example plugin, when installed (CI installs it) ---------------------------------------
@pytest.fixture
def example(all_plugins: None) -> str:
    """The installed example plugin's version (the test is skipped without it)."""
    pytest.importorskip("dmae_example_certifier")
    return metadata.version("dmae-example-certifier")


def test_example_plugin_is_listed_as_third_party(example: str) -> None:
    result = runner.invoke(app, ["plugins", "--json", "--check"])
    assert result.exit_code == 0, result.output
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "two-sided"]
    assert row["kind"] == "certifier" and row["distribution"] == "dmae-example-certifier"
    assert row["origin"] == "third-party" and row["version"] == example
    assert row["status"] == "ok" and row["error"] is None and row["api"] in (1, 2)


def test_example_plugin_certifies_by_name(example: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    save_classifier(runs / "digits" / "finetune" / "sigma-0.5" / "best.pth")
    args = ["--n", "30", "--n0", "5", "--max-examples", "3", "--set", f"runs_dir={runs}"]
    result = runner.invoke(
        app, ["certify", RECIPE, "--sigma", "0.5", "--certifier", "two-sided", *args]
    )
    assert result.exit_code == 0, result.output
    tsv = runs / "digits" / "certify" / "sigma-0.5.tsv"
    assert tsv.read_text().splitlines()[0].split("\t") == list(COLUMNS)
    rows = [Row.parse(line) for line in read_lines(tsv).values()]
    assert len(rows) == 3
    for r in rows:
        assert (r.certifier, r.n, r.n0) == ("two-sided", 30, 5) or r.stop == "skipped"
        assert r.radius >= 0 and (r.radius > 0) <= (r.predict >= 0)


# -- listing: metadata only, a table that fits ---------------------------------------------------
def test_listing_imports_no_plugin(broken: None) -> None:
    """A plugin whose import raises is listed like any other; only --check imports it."""
    for module in ("exploding_certifier", "half_certifier"):
        sys.modules.pop(module, None)
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert "exploding_certifier" not in sys.modules and "half_certifier" not in sys.modules
    assert rows["exploding"]["status"] == "-" and rows["exploding"]["error"] is None
    assert rows["half"]["description"] == "Certifies, but cannot predict."  # read, not run
    assert rows["vit_tiny"]["description"].startswith("ViT-Ti (Touvron et al. 2021)")


def test_the_table_fits_80_columns_and_never_cuts_a_name(
    broken: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("vit_large_patch16", "exploding", "dmae-exploding", "cohen"):
        assert sum(f" {name} " in f" {line} " for line in lines) >= 1, name
    row = next(line for line in lines if line.startswith("vit_large_patch16 "))
    assert "ViT-L/16" in row  # the description shares the row, shortened, not on lines below
    assert not any(line.startswith(" " * 20) for line in lines)  # no wrapped continuation


def test_check_marks_a_certifier_of_api_1(all_plugins: None) -> None:
    class OldStyle:
        """Abstains, through API 1's counts callback."""

        name = "old-style"

        def certify(self, counts, request):  # type: ignore[no-untyped-def]
            return None

        def predict(self, counts, request):  # type: ignore[no-untyped-def]
            return -1

    registry.certifiers.add("old-style", OldStyle, distribution="dmae-old")
    try:
        result = runner.invoke(app, ["plugins", "--check", "--json"])
        table = runner.invoke(app, ["plugins", "--check"], env={"COLUMNS": "100"})
    finally:
        registry.certifiers.remove("old-style")
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "old-style"]
    assert row["status"] == "ok" and row["api"] == 1
    assert "ok (API 1)" in next(line for line in table.stdout.splitlines() if "old-style" in line)
