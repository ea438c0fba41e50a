"""Graceful interruption: SIGINT/SIGTERM finish the current step instead of killing the run.

Long stages poll `GracefulStop.requested()` at safe points (after an optimizer update, after a
certified example); when it fires they save what they have and raise `Interrupted`, which the
CLI turns into one line saying how to resume and exit code 130 (SIGINT) or 143 (SIGTERM).
A second Ctrl-C stops at once, the shell's usual promise.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

from dmae_cli.runtime import distributed
from dmae_cli.runtime.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(UserError):
    """A stage stopped on a signal after saving its progress; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """Within this context SIGINT/SIGTERM only set a flag that `requested()` reports."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum

    def requested(self) -> int:
        """The signal number if any rank was asked to stop, else 0 (a collective under DDP)."""
        if not distributed.is_distributed():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
