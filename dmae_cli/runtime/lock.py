"""One run per output at a time.

Two commands writing the same outputs at once would interleave their files (a `metrics.jsonl`
holding epochs 0, 1, 2, 0, 1, 2) or do the same work twice. A run therefore holds an exclusive
`flock` on a lock file beside its outputs while it writes; the file names the holder's pid. The
operating system drops the lock when the process ends, however it ends (a SIGKILL included), so
a stale lock file never blocks the next run; a run that ends normally removes its file. Under
torchrun only rank 0 takes it: the ranks of one run share their outputs by design.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from dmae_cli.runtime import distributed
from dmae_cli.runtime.errors import UserError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(directory: Path, name: str = LOCK_NAME, what: str | None = None) -> Iterator[None]:
    """Hold the lock `directory/name` for the duration; one clear line if another run holds it.
    `what` names the outputs in that line (default: the directory)."""
    if not _rank_zero():
        yield
        return
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    handle = _acquire(path, what or str(directory))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then finds no stale file
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        for folder in created:  # a run that stopped before writing leaves no empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()


def _acquire(path: Path, what: str) -> IO[str]:
    """Open and lock `path`. A holder may remove the file between our open and our lock, so
    the lock only counts when the path still names the file we locked."""
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(
                f"{what} is in use by another dmae run (pid {holder}); wait for it to finish, "
                "or give this run another --out"
            ) from None
        if _same_file(path, handle):
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle
        handle.close()  # we locked a file its holder had just removed: try the new one


def _same_file(path: Path, handle: IO[str]) -> bool:
    try:
        named, held = path.stat(), os.fstat(handle.fileno())
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _rank_zero() -> bool:
    """Rank 0 of a torchrun job, also before the process group is joined."""
    if distributed.is_distributed():
        return distributed.rank() == 0
    return os.environ.get("RANK", "0") == "0"
