"""The Trainer's components on their own: one update (`train_step`), the `Checkpointer` and the
epoch log. The loop that joins them runs in test_train.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dmae_cli.config.recipe import OptimConfig
from dmae_cli.runtime import checkpoint
from dmae_cli.training.checkpointer import Checkpointer, Position
from dmae_cli.training.metrics import EpochLog, MetricsFile
from dmae_cli.training.optim import build_optimizer
from dmae_cli.training.step import train_step, unwrap


def squared_error(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def batches(count: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 3, generator=g), torch.randn(size, generator=g)) for _ in range(count)
    ]


def linear_and_sgd() -> tuple[torch.nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, accum: int):
    return train_step(
        model,
        squared_error,
        iter(data),
        optimizer,
        accum=accum,
        clip_grad=None,
        amp_dtype=None,
        device=torch.device("cpu"),
    )


def test_accumulated_micro_batches_update_like_one_large_batch() -> None:
    data = batches(3)
    small, opt_small = linear_and_sgd()
    result = step(small, opt_small, data, accum=3)
    large, opt_large = linear_and_sgd()
    whole = (torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    step(large, opt_large, [whole], accum=1)
    for a, b in zip(small.parameters(), large.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert result.losses.shape == (3,) and result.examples == 12
    assert result.grad_norm is not None and result.grad_norm.dim() == 0  # a tensor: no sync
    assert all(p.grad is None for p in small.parameters())  # zeroed for the next update


def test_too_few_micro_batches_are_not_stepped() -> None:
    model, optimizer = linear_and_sgd()
    before = [p.clone() for p in model.parameters()]
    result = step(model, optimizer, batches(2), accum=3)
    assert result.grad_norm is None and result.losses.shape == (2,)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert step(model, optimizer, [], accum=3) is None


class RecordingDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: records which passes ran under `no_sync`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.synced: list[bool] = []
        self.in_no_sync = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.synced.append(not self.in_no_sync)
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


def test_gradients_are_all_reduced_only_on_the_last_micro_batch() -> None:
    model, optimizer = linear_and_sgd()
    wrapped = RecordingDDP(model)
    step(wrapped, optimizer, batches(4), accum=4)
    assert wrapped.synced == [False, False, False, True]
    assert unwrap(wrapped) is model


def checkpointer(tmp_path: Path, save_every: int = 2, epochs: int = 5) -> Checkpointer:
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    meta = {"stage": "pretrain", "backbone": "vit_tiny"}
    return Checkpointer(tmp_path, model, optimizer, meta, epochs, save_every, torch.device("cpu"))


def test_a_checkpoint_keeps_its_layout_and_retention(tmp_path: Path) -> None:
    saver = checkpointer(tmp_path)
    written: list[str] = []
    real = checkpoint.save_checkpoint

    def save(path: Path, state: dict) -> Path:
        written.append(Path(path).name)
        return real(path, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save_checkpoint", save)
        for epoch in range(5):
            saver.save_epoch(epoch, lambda: written.append("metrics"))
    # Every save_every epochs and after the last; last.pth after the epoch's other files.
    assert written == [
        *["metrics", "last.pth"],
        *["checkpoint-0002.pth", "metrics", "last.pth"],
        *["metrics", "last.pth"],
        *["checkpoint-0004.pth", "metrics", "last.pth"],
        *["checkpoint-0005.pth", "metrics", "last.pth"],
    ]
    state = checkpoint.load_checkpoint(tmp_path / "last.pth")
    assert list(state) == ["model", "optimizer", "scaler", "epoch", "rng", "meta"]
    assert state["epoch"] == 4 and state["scaler"] is None and len(state["rng"]) == 1
    assert state["meta"] == {"stage": "pretrain", "backbone": "vit_tiny"}


def test_an_interrupted_epoch_resumes_at_its_position(tmp_path: Path) -> None:
    saver = checkpointer(tmp_path)
    saver.save_interrupted(Position(epoch=3, updates_done=7, loss_sum=2.5, seen=28))
    state = checkpoint.load_checkpoint(tmp_path / "last.pth")
    assert state["epoch"] == 2  # the last complete epoch
    assert state["position"] == {"epoch": 3, "updates_done": 7, "loss_sum": 2.5, "seen": 28}
    resumed = checkpointer(tmp_path).resume()
    assert resumed is not None and resumed.start_epoch == 3
    assert resumed.position == Position(3, 7, 2.5, 28)
    assert checkpointer(tmp_path / "empty").resume() is None


def test_the_epoch_log_reads_only_what_is_new_and_resumes_with_the_sums_before() -> None:
    log = EpochLog(updates=4, accum=2, device=torch.device("cpu"), loss_before=3.0, done=1, seen=8)
    model, optimizer = linear_and_sgd()
    for _ in range(2):
        log.record(step(model, optimizer, batches(2), accum=2))
    total, losses, norms = log.read()
    assert log.done == 3 and len(losses) == 4 and len(norms) == 2 and log.seen == 24
    assert total == pytest.approx(3.0 + sum(losses))
    assert log.read()[1:] == ([], [])  # nothing new since


def test_metrics_lines_of_epochs_to_rerun_are_dropped(tmp_path: Path) -> None:
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for epoch in range(3):
        metrics.append({"epoch": epoch, "loss": 1.0})
    with metrics.path.open("a") as f:
        f.write('{"epoch": 3, "lo')  # torn by a kill
    metrics.truncate(2)
    assert metrics.path.read_text() == '{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "loss": 1.0}\n'
