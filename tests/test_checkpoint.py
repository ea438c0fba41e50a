from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dmae_cli.runtime.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from dmae_cli.runtime.errors import UserError


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


def test_the_official_training_scripts_arguments_load_and_open_no_other_door(
    tmp_path: Path,
) -> None:
    """DMAE/MAE's `save_model` stores its argparse Namespace beside the weights: that file used
    to be refused as a pickle that could run code. The Namespace is allowed, nothing else."""
    import argparse

    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, input_size=224)
    state = {"model": {"w": torch.zeros(1)}, "epoch": 3, "scaler": {"scale": 65536.0}}
    torch.save({**state, "optimizer": {"state": {}, "param_groups": []}, "args": args},
               tmp_path / "official.pth")  # fmt: skip
    loaded = load_checkpoint(tmp_path / "official.pth")
    assert loaded["args"].model == "mae_vit_base_patch16" and loaded["epoch"] == 3
    marker = tmp_path / "pwned"
    sneaky = argparse.Namespace(model="x", payload=CreatesAFile(marker))
    torch.save({**state, "args": sneaky}, tmp_path / "sneaky.pth")
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(tmp_path / "sneaky.pth")
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


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """mkstemp makes its files 0600: every checkpoint, config and run header came out
    unreadable to the colleagues the umask lets read a plain `open`'s files."""
    umask = os.umask(0o022)
    os.umask(umask)
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    save_checkpoint(tmp_path / "last.pth", {"model": {}})
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    for name in ("atomic.txt", "last.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain
    (tmp_path / "atomic.txt").chmod(0o640)  # a file the user restricted keeps its mode
    atomic_write_text(tmp_path / "atomic.txt", "y")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "c.txt", "old")

    def explode(f) -> None:
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    from dmae_cli.runtime.checkpoint import atomic_write

    with pytest.raises(UserError, match="could not write .*c.txt: No space left on device"):
        atomic_write(tmp_path / "c.txt", explode)
    assert (tmp_path / "c.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """A real SIGKILL (no `except` runs) half-way through `atomic_write`: the old file stays
    whole, and the orphaned temporary is what `remove_stale_temporaries` cleans on resume."""
    import signal
    import subprocess
    import sys
    import time

    from dmae_cli.runtime.checkpoint import remove_stale_temporaries

    target, ready = tmp_path / "last.pth", tmp_path / "half-written"
    save_checkpoint(target, {"epoch": 1})
    writer = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from dmae_cli.runtime.checkpoint import atomic_write\n"
        "def half(f):\n"
        "    f.write(b'x' * 4096)\n"
        "    f.flush()\n"
        "    Path(sys.argv[2]).touch()\n"
        "    time.sleep(60)\n"
        "atomic_write(sys.argv[1], half)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(target), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    ready.unlink()
    assert load_checkpoint(target) == {"epoch": 1}
    assert len(list(tmp_path.glob(".last.pth.*.tmp"))) == 1
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


class Killed(BaseException):
    """Stands in for a SIGKILL at one point of a run: nothing after it happens."""


def kill_when_saving(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make the first `save_checkpoint` of a file called `name` die before writing it."""
    from dmae_cli.runtime import checkpoint

    real = checkpoint.save_checkpoint

    def save(path: str | Path, state: dict) -> Path:
        if Path(path).name == name:
            monkeypatch.setattr(checkpoint, "save_checkpoint", real)
            raise Killed
        return real(path, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


@pytest.mark.parametrize(
    "killed_at",
    [
        "last.pth",  # epoch 0's first checkpoint: its metrics line must not be kept twice
        "checkpoint-0002.pth",  # the periodic file: the epoch must not count as done
    ],
)
def test_a_kill_while_saving_an_epoch_reruns_it_whole(
    tiny_recipe, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None, killed_at: str
) -> None:
    from dmae_cli.training.pretrain import run_pretrain

    recipe = tiny_recipe("pretrain.epochs=2")
    kill_when_saving(monkeypatch, killed_at)
    with pytest.raises(Killed):
        run_pretrain(recipe)
    run_pretrain(recipe)
    run = recipe.stage_dir("pretrain")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert (run / "checkpoint-0002.pth").is_file()


def test_a_torn_metrics_line_is_dropped_on_resume(tiny_recipe, one_torch_thread: None) -> None:
    from dmae_cli.training.pretrain import run_pretrain

    run_pretrain(tiny_recipe("pretrain.epochs=1"))
    run = tiny_recipe().stage_dir("pretrain")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "lo')  # a power cut in the middle of the next line
    run_pretrain(tiny_recipe("pretrain.epochs=2"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


# -- hostile checkpoints: recognised by what they hold, never by torch's wording ----------------
class CallsOut:
    """Unpickling this object calls `function(*args)`."""

    def __init__(self, function: object, *args: object) -> None:
        self.call = (function, args)

    def __reduce__(self):
        return self.call


def hostile_payloads(marker: Path) -> dict[str, object]:
    import builtins
    import os
    import posix

    return {
        "os.system": CallsOut(os.system, f"touch {marker}"),
        "posix.system": CallsOut(posix.system, f"touch {marker}"),
        "builtins.eval": CallsOut(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "Path.touch": CreatesAFile(marker),
    }


@pytest.mark.parametrize("payload", ["os.system", "posix.system", "builtins.eval", "Path.touch"])
def test_every_hostile_global_is_refused_without_advice_to_unsafe_loading(
    tmp_path: Path, payload: str
) -> None:
    marker = tmp_path / "pwned"
    evil = {"model": {"w": torch.zeros(1)}, "payload": hostile_payloads(marker)[payload]}
    torch.save(evil, tmp_path / "evil.pth")
    with pytest.raises(UserError) as caught:
        load_checkpoint(tmp_path / "evil.pth")
    message = str(caught.value)
    assert "refused to load" in message and "could run code" in message
    assert "weights_only" not in message and "will likely succeed" not in message
    assert len(message.splitlines()) == 1 and not marker.exists()


def test_damaged_files_never_quote_the_advice_to_load_unsafely(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    for name in ("legacy.pth", "junk.pth"):
        with pytest.raises(UserError, match="not a readable checkpoint") as caught:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(caught.value) and "likely succeed" not in str(caught.value)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's zip writer turns the OSError of a full disk into a RuntimeError."""
    import errno
    import os

    save_checkpoint(tmp_path / "last.pth", {"model": {"w": torch.ones(2)}})
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, raw) -> None:
            self.raw, self.written = raw, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.raw.write(data)

        def __getattr__(self, name: str):
            return getattr(self.raw, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.raw.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    big = {"model": {"w": torch.randn(10_000)}}
    with pytest.raises(UserError, match=r"could not write .*last.pth: No space left on device"):
        save_checkpoint(tmp_path / "last.pth", big)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary left
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["model"]["w"], torch.ones(2))
