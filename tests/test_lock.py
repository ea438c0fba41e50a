"""Two runs into one directory: the second stops with one line naming the first one's pid."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.lock import LOCK_NAME, run_lock
from tests.conftest import TINY_OVERRIDES, one_line_error, save_classifier

HOLD = """
import sys, time
from pathlib import Path
from dmae_cli.runtime.lock import run_lock
with run_lock(Path(sys.argv[1]), *sys.argv[2:]):
    print("holding", flush=True)
    time.sleep(60)
"""


@contextmanager
def held(directory: Path, *name: str) -> Iterator[int]:
    """Another process holding `directory`'s lock (or `directory/name`); yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory), *name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with held(tmp_path) as pid:
        refused = pytest.raises(UserError, match=rf"another dmae run \(pid {pid}\)")
        with refused, run_lock(tmp_path):
            pass
    # The OS released the dead holder's lock: the directory is free again, the stale file too.
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()  # a run that ends leaves nothing behind


def test_a_lock_file_removed_by_its_holder_is_not_taken_for_a_lock(tmp_path: Path) -> None:
    """The holder removes its file as it finishes: a run that opened the old file must not
    count the lock it then gets on it (a third run could lock a new file at the same time)."""
    from dmae_cli.runtime import lock

    stale = (tmp_path / LOCK_NAME).open("a+")
    (tmp_path / LOCK_NAME).unlink()
    assert not lock._same_file(tmp_path / LOCK_NAME, stale)
    stale.close()


def test_other_ranks_of_a_torchrun_job_do_not_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_ends_and_reentry_later_works(tmp_path: Path) -> None:
    with run_lock(tmp_path / "a" / "run"):
        pass
    assert not (tmp_path / "a").exists()  # a run that wrote nothing leaves no folders
    with run_lock(tmp_path / "run"):
        (tmp_path / "run" / "out.txt").write_text("kept")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["out.txt"]
    started = time.monotonic()
    with run_lock(tmp_path / "run"):
        pass
    assert time.monotonic() - started < 5


# -- every command that writes a run takes the lock -------------------------------------------
def tiny_sets(tmp_path: Path) -> list[str]:
    return [x for o in [*TINY_OVERRIDES, f"runs_dir={tmp_path}"] for x in ("--set", o)]


def test_every_writing_command_refuses_a_held_output(tmp_path: Path) -> None:
    model = save_classifier(tmp_path / "model.pth")
    out = tmp_path / "out"
    cases = [  # (the lock another run holds, the command that must refuse)
        ((out / "pre",), f"pretrain recipes/digits.yaml --out {out / 'pre'}"),
        (
            (out / "ft" / "sigma-0.5",),
            f"finetune recipes/digits.yaml --sigma 0.5 --init none --out {out / 'ft'}",
        ),
        (
            (out / "cert", ".sigma-0.5.tsv.lock"),
            f"certify recipes/digits.yaml --checkpoint {model} --sigma 0.5 -n 16 --n0 4 "
            f"--max-examples 2 --out {out / 'cert'}",
        ),
        ((out, ".d.lock"), f"shard digits --split test --out {out / 'd'}"),
    ]
    for lock, command in cases:
        args = command.split()
        if args[0] != "shard":
            args += tiny_sets(tmp_path)
        with held(*lock) as pid:
            result = CliRunner().invoke(app, args)
        line = one_line_error(result)
        assert f"another dmae run (pid {pid})" in line, (args[0], line)
    assert not list(out.glob("pre/*.pth")) and not list(out.glob("d-*"))
