"""A shard manifest is a data file: the shard names it lists never run a command, never name a
URL and never lead out of the manifest's directory, however they are spelled.

`pipe:` sources stay possible where the user types them (covered in test_shard.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dmae_cli.data.manifest import bad_shard_name, listed_shard
from dmae_cli.data.shard import ShardConfig, run_shard
from dmae_cli.runtime.errors import UserError
from dmae_plugins.datasets.webdataset import webdataset

MANIFEST = "x-manifest.json"
FIRST = "x-000000.tar"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits' test split as two shards `x-000000.tar`, `x-000001.tar` and `x-manifest.json`."""
    root = tmp_path_factory.mktemp("written")
    run_shard(ShardConfig(out=str(root / "x"), dataset="digits", split="test", max_count=200))
    return root


@pytest.fixture
def shards(written: Path, tmp_path: Path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(written, target)
    return target


def rename_first(root: Path, name: str) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["shards"][0]["name"] = name
    (root / MANIFEST).write_text(json.dumps(manifest))


# Each spelling takes the canary (a bare file name a command would create in the working
# directory: a name with no '/' passed the old check) and the outside directory; the symlink
# case also plants its link.
def symlink_out(root: Path, canary: Path, outside: Path) -> str:
    (root / "evil.tar").symlink_to(outside / FIRST)
    return "evil.tar"


HOSTILE: dict[str, Callable[[Path, Path, Path], str]] = {
    "pipe": lambda r, c, o: f"pipe:touch {c}; cat {FIRST}",
    "space-pipe": lambda r, c, o: f" pipe:touch {c}; cat {FIRST}",
    "upper-pipe": lambda r, c, o: f"PIPE:touch {c}; cat {FIRST}",
    "file-url": lambda r, c, o: f"file:{o / FIRST}",
    "http-url": lambda r, c, o: "http://example.invalid/x-000000.tar",
    "dotdot": lambda r, c, o: f"../outside/{FIRST}",
    "absolute": lambda r, c, o: str(o / FIRST),
    "symlink-outside": symlink_out,
}


@pytest.mark.parametrize("root_kind", ["dot", "manifest-relative", "manifest-absolute"])
@pytest.mark.parametrize("spelling", sorted(HOSTILE))
def test_hostile_shard_names_in_a_manifest_are_refused_and_run_nothing(
    shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spelling: str,
    root_kind: str,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(shards / FIRST, outside / FIRST)
    canary = shards / "owned"
    rename_first(shards, HOSTILE[spelling](shards, Path(canary.name), outside))
    monkeypatch.chdir(shards)
    root = {"dot": ".", "manifest-relative": MANIFEST, "manifest-absolute": str(shards / MANIFEST)}
    with pytest.raises(UserError, match="shard"):
        stream = webdataset("test", root=root[root_kind], image_size=16, augment=False)
        list(stream)
    assert not canary.exists()


def test_listed_shards_are_opened_as_files_never_through_a_url_opener(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webdataset as wds

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a listed shard went through webdataset.gopen")

    monkeypatch.setattr(wds, "gopen", refuse)
    monkeypatch.setattr(wds.gopen, "gopen", refuse, raising=False)
    monkeypatch.chdir(shards)
    stream = webdataset("test", root=".", image_size=16, augment=False)
    assert len(list(stream)) == 360 and stream.skipped == 0


def test_a_symlink_inside_the_directory_is_followed(shards: Path) -> None:
    (shards / FIRST).rename(shards / "real.tar")
    (shards / FIRST).symlink_to("real.tar")
    stream = webdataset("test", root=str(shards), image_size=16, augment=False)
    assert len(list(stream)) == 360


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b.tar", "a\\b.tar", "pipe:ls", " x.tar", "x.tar\n", "x\0.tar", 3, None],
)
def test_bad_shard_names(name: object) -> None:
    assert bad_shard_name(name) is not None
    with pytest.raises(ValueError, match="bad shard name"):
        listed_shard(Path("/shards/x-manifest.json"), name)


def test_plain_names_resolve_inside_the_manifest_directory(tmp_path: Path) -> None:
    assert bad_shard_name("in1k-train-000123.tar") is None
    assert listed_shard(tmp_path / MANIFEST, "a b.tar") == tmp_path.resolve() / "a b.tar"


def test_resuming_dmae_shard_refuses_a_manifest_naming_files_elsewhere(
    shards: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"keep me")
    rename_first(shards, "../victim.tar")
    config = ShardConfig(out=str(shards / "x"), dataset="digits", split="test", max_count=200)
    with pytest.raises(UserError, match="bad shard name"):
        run_shard(config)
    run_shard(ShardConfig(**{**config.__dict__, "overwrite": True}))
    assert victim.read_bytes() == b"keep me"


# -- a config.yaml found beside a checkpoint is a data file too ---------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("options", {"manifest": "pipe:touch owned"}),
        ("options", {"urls_test": ["x.tar", " PIPE:touch owned"]}),
        ("options", {"urls": "a.tar::http://example.invalid/b.tar"}),
        ("root", "pipe:touch owned"),
    ],
)
def test_certify_refuses_commands_from_a_config_found_beside_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: object
) -> None:
    import yaml
    from typer.testing import CliRunner

    from dmae_cli.cli.app import app
    from tests.conftest import one_line_error, save_classifier

    run = tmp_path / "stranger"
    run.mkdir()
    save_classifier(run / "best.pth")
    data = {"dataset": "webdataset", key: value}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["certify", "--checkpoint", str(run / "best.pth")])
    line = one_line_error(result)
    assert "found beside the checkpoint" in line and f"data.{key}" in line
    assert not (tmp_path / "owned").exists()
