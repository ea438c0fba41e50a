"""torch.distributed from the torchrun environment; every helper is a no-op on one process.

A process joins the group once, with the first stage that needs it (`process_group(device)`,
or `init_from_env`), and keeps it for its next stages (`dmae demo` runs four): a group left and
joined again under torchrun finds the first one's addresses in torchrun's store and fails. It
leaves the group at exit, from an `atexit` handler, while the interpreter is still whole: a
rank that exits with its gloo group alive can abort in the interpreter's teardown (`terminate
called without an active exception`, exit -6) after its work is done. `agreed()` makes a
stage's preparation fail on every rank when it fails on one, so no rank waits for a partner
that has given up; a collective that fails because another rank died is one line (`PeerLost`).
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dmae_cli.runtime.errors import UserError

# Seconds a collective waits for the other ranks (torch's default, 30 min, when unset): how
# long a rank whose peer froze, rather than died, takes to give up.
TIMEOUT_ENV = "DMAE_DIST_TIMEOUT"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def timeout() -> timedelta | None:
    """How long a collective waits for a missing rank: DMAE_DIST_TIMEOUT seconds, or None for
    torch's default."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 7 * 86400:
        raise UserError(f"{TIMEOUT_ENV}={text!r}: expected seconds, a number in (0, 604800]")
    return timedelta(seconds=seconds)


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) until the process
    exits; nothing when joined already or not under torchrun."""
    if is_distributed() or not launched_by_torchrun():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    wait = timeout()
    dist.init_process_group(backend=backend, **({"timeout": wait} if wait else {}))
    atexit.register(destroy)  # after everything registered before: torch's own exit handlers


def destroy() -> None:
    """Leave the process group (shut its threads down); nothing when there is none."""
    if is_distributed():
        dist.destroy_process_group()


class PeerLost(UserError):
    """Another rank stopped answering (it died, or its node did): one line, exit code 1."""

    exit_code = 1


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The torchrun process group, joined for the block (and the rest of the process) unless
    it is already; a collective of the block that fails because another rank is gone becomes
    `PeerLost`, one line."""
    init_from_env(device)
    try:
        yield
        return
    except RuntimeError as exc:
        if not is_distributed() or not lost_peer(exc):
            raise
        reason = _first_sentence(exc)
        # Its frames hold the DDP model, whose reducer must go before the group does at exit
        # (a reducer outliving its group can abort the process as it ends).
        exc.__traceback__ = None
    raise PeerLost(  # outside the handler: no context keeps those frames either
        f"rank {rank()}: lost contact with the other ranks ({reason}); the job cannot go on: "
        "the log of the rank that stopped first says why; rerun the same command to resume "
        "from the run's last checkpoint"
    )


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing for want of another rank (not a bug of ours):
    torch's distributed errors, and gloo's, which arrive as plain RuntimeErrors."""
    return isinstance(exc, dist.DistError) or "/gloo/" in str(exc)


def _first_sentence(exc: BaseException) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))  # gloo's [file:line]
    return text.split(". ")[0].rstrip(".") or type(exc).__name__


@contextmanager
def agreed() -> Iterator[None]:
    """Run the block on every rank; a `UserError` on any rank is raised on every rank.

    The block must hold no collective of its own: a rank that failed early would not join it.
    One process: the block as it is."""
    if not is_distributed():
        yield
        return
    problem: UserError | None = None
    try:
        yield
    except UserError as exc:
        problem = exc
    problems = gather_objects(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    failed = [(r, p) for r, p in enumerate(problems) if p is not None]
    if failed:
        first, message = failed[0]
        raise UserError(f"rank {first}: {message}")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks (itself on one process)."""
    if not is_distributed():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (a one-element list on one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun; the model itself on one process."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type != "cuda":
        return DistributedDataParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(model, device_ids=[index])
