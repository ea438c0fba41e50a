"""Plugins as a public API: `dmae plugins --check` on broken third-party distributions, and
the example plugin (plugins/dmae-example-certifier) used by name once it is installed.

Third-party distributions are throw-away .dist-info directories on a temporary sys.path
entry; every registry is refreshed before and after, so no other test sees them.
"""

from __future__ import annotations

import json
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
    assert "2 plugin(s) failed:" in summary
    assert "certifier dmae-exploding:exploding" in summary
    assert "certifier dmae-half:half" in summary

    result = runner.invoke(app, ["plugins", "--check", "--json"])
    assert result.exit_code == 1
    rows = {(r["distribution"], r["name"]): r for r in json.loads(result.stdout)}
    exploding, half = rows["dmae-exploding", "exploding"], rows["dmae-half", "half"]
    assert not exploding["ok"] and exploding["origin"] == "third-party"
    assert exploding["description"] == "failed to load: RuntimeError: boom at import"
    assert not half["ok"] and half["version"] == "0.3"
    assert half["description"] == (
        "violates the certifier contract: has no `predict(counts, request)` method"
    )
    builtins = [r for (dist, _), r in rows.items() if dist == "dmae"]
    assert {r["name"] for r in builtins if r["kind"] == "certifier"} == {"cohen", "sequential"}
    assert all(r["ok"] for r in builtins)
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
    assert row["origin"] == "third-party" and row["version"] == example and row["ok"]


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
