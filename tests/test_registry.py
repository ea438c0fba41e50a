from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dmae_cli.api import contract_problems
from dmae_cli.plugins import registry
from dmae_cli.plugins.registry import PluginWarning, Registry
from dmae_cli.runtime.errors import UserError

BACKBONES = ["vit_base_patch16", "vit_huge_patch14", "vit_large_patch16", "vit_small", "vit_tiny"]


def make_distribution(
    root: Path, name: str, group: str, entries: dict[str, str], modules: dict[str, str]
) -> None:
    """A minimal installed distribution (a .dist-info with entry points) on a sys.path entry."""
    info = root / f"{name.replace('-', '_')}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_distribution(
        tmp_path,
        "dmae-broken",
        "dmae.backbones",
        {
            "vit_broken": "broken_backbone:factory",
            "vit_extra": "extra_backbone:factory",
            "vit_tiny": "extra_backbone:factory",
        },
        {
            "broken_backbone": "raise ImportError('needs a package that is not installed')\n",
            "extra_backbone": '''
                def factory(**kw):
                    """An extra backbone from a third party."""
                    return kw
            ''',
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DMAE_PLUGINS", "all")
    return tmp_path


def test_builtins_are_registered_through_entry_points() -> None:
    assert registry.backbones.names() == BACKBONES
    assert {"digits", "cifar10", "imagefolder"} <= set(registry.datasets.names())
    entry = registry.backbones.entry("vit_tiny")
    assert entry.builtin and entry.distribution == "dmae"
    assert entry.target == "dmae_plugins.backbones:vit_tiny"


def test_listing_does_not_import(third_party: Path) -> None:
    reg = Registry("backbone", "dmae.backbones")
    assert "vit_broken" in reg.names()  # listed from metadata; its import would fail


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(UserError) as err:
        registry.backbones.get("vit_gigantic")
    assert str(err.value) == f"unknown backbone 'vit_gigantic'; available: {', '.join(BACKBONES)}"


def test_broken_plugin_is_contained(third_party: Path) -> None:
    reg = Registry("backbone", "dmae.backbones")
    with pytest.raises(
        UserError, match="backbone 'vit_broken' from dmae-broken failed to load: ImportError"
    ):
        reg.get("vit_broken")
    with pytest.warns(PluginWarning, match="vit_broken.*dmae-broken.*needs a package"):
        loaded = reg.load_all()
    assert "dmae:vit_base_patch16" in loaded and "dmae-broken:vit_extra" in loaded
    assert reg.get("vit_extra")(img_size=8) == {"img_size": 8}


def test_duplicate_names_need_a_distribution(third_party: Path) -> None:
    reg = Registry("backbone", "dmae.backbones")
    with pytest.raises(UserError, match="pick one of: dmae:vit_tiny, dmae-broken:vit_tiny$"):
        reg.get("vit_tiny")
    assert reg.entry("dmae:vit_tiny").builtin
    assert reg.entry("dmae-broken:vit_tiny").distribution == "dmae-broken"


def test_builtin_only_hides_third_party(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMAE_PLUGINS", "builtin")
    assert "vit_extra" not in Registry("backbone", "dmae.backbones").names()
    monkeypatch.setenv("DMAE_PLUGINS", "dmae-broken")
    assert "vit_extra" in Registry("backbone", "dmae.backbones").names()


class FakeCertifier:
    """Abstains always."""

    name = "fake"

    def certify(self, counts, request):
        return None

    def predict(self, counts, request):
        return -1


def test_add_and_remove_in_code() -> None:
    reg = Registry("certifier", "dmae.certifiers")
    reg.add("fake", FakeCertifier)
    try:
        assert reg.get("fake") is FakeCertifier
    finally:
        reg.remove("fake")
    assert "fake" not in reg.names()


def test_a_plugin_that_breaks_its_contract_is_reported() -> None:
    class NoPredict:
        name = "half"

        def certify(self, counts, request):
            return None

    reg = Registry("certifier", "dmae.certifiers")
    reg.add("half", NoPredict, distribution="dmae-half")
    with pytest.raises(UserError) as err:
        reg.get("half")
    assert str(err.value) == (
        "certifier 'half' from dmae-half violates the certifier contract: "
        "has no `predict(counts, request)` method"
    )
    with pytest.warns(PluginWarning, match="half.*violates"):
        loaded = reg.load_all()
    assert "dmae:cohen" in loaded  # the others still load


@pytest.mark.parametrize(
    ("kind", "obj", "problem"),
    [
        ("backbone", lambda size: None, "factory(*, img_size, patch_size, in_chans, **overrides)"),
        ("dataset", lambda: None, "factory(split, *, root, image_size, augment, **options)"),
        ("certifier", lambda level: None, "factory(**options) must work with no options"),
        ("certifier", 42, "expected a callable factory, got int"),
    ],
)
def test_contract_problems_name_the_contract(kind: str, obj: object, problem: str) -> None:
    assert contract_problems(kind, obj)[0].startswith(problem)
