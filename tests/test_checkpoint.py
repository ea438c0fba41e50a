from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmae_cli.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from dmae_cli.errors import UserError


class CreatesAFile:
    """Unpickling this object would create a file: what a hostile checkpoint does."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(
        {"model": {"w": torch.zeros(1)}, "payload": CreatesAFile(marker)}, tmp_path / "evil.pth"
    )
    assert not marker.exists()
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_corrupt_and_missing_checkpoints_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pth: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pth")


def test_atomic_writes_leave_no_temporaries(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.pth", {"model": {"w": torch.ones(2)}})
    atomic_write_text(tmp_path / "b.txt", "hello")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.txt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.pth")["model"]["w"], torch.ones(2))


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "c.txt", "old")

    def explode(f) -> None:
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    from dmae_cli.checkpoint import atomic_write

    with pytest.raises(UserError, match="could not write .*c.txt: No space left on device"):
        atomic_write(tmp_path / "c.txt", explode)
    assert (tmp_path / "c.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
