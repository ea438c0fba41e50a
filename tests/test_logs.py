"""Progress in a batch job's log, and TensorBoard.

When stderr is not a terminal (SLURM, Kubernetes, `2> log`), a redrawn rich bar writes nothing
until it stops: a log showed the pretraining header and then nothing for hours. There progress
is plain lines: one per epoch, at most one per `ui.LINE_INTERVAL` seconds in between, the last,
and never a control character. `logging.tensorboard: true` writes the epoch records to
`<stage dir>/tensorboard/` too; without the package the stage stops in one line before training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress, TextColumn
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.runtime import ui

from .conftest import TINY_OVERRIDES, one_line_error

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(lines: list[str]) -> None:
    for line in lines:
        assert "\x1b" not in line and "\r" not in line, repr(line)


def test_lines_are_throttled_by_the_clock_and_the_last_is_always_written() -> None:
    clock, lines = Clock(), []
    speed = TextColumn("[bold]{task.fields[speed]}")
    bar = ui.LineProgress(speed, interval=30.0, clock=clock, write=lines.append)
    with bar:
        task = bar.add_task("certify sigma-0.5", total=100, speed="")
        for step in range(1, 101):
            clock.now = step * 2.0  # an example every 2 s: a line every 15 examples
            bar.update(task, advance=1, speed=f"{step * 10:,} noisy/s")
    assert len(lines) == 100 * 2 // 30 + 1, lines  # 6 throttled, then the last
    assert lines[0] == "certify sigma-0.5 15/100 150 noisy/s elapsed 0:00:30 eta 0:02:50"
    assert lines[-1] == "certify sigma-0.5 100/100 1,000 noisy/s elapsed 0:03:20 eta 0:00:00"
    plain(lines)


def test_flush_writes_only_news_and_an_error_writes_nothing_more() -> None:
    clock, lines = Clock(), []
    bar = ui.LineProgress(interval=30.0, clock=clock, write=lines.append)
    with bar:
        task = bar.add_task("pretrain", total=10, completed=4)  # resumed at 4
        clock.now = 1.0
        bar.update(task, completed=6)
        bar.flush(task)
        bar.flush(task)  # nothing new: no second line
    assert lines == ["pretrain 6/10 elapsed 0:00:01 eta 0:00:02"]  # 2 updates/s since 4
    with pytest.raises(KeyError), bar:
        bar.update(task, completed=7)
        raise KeyError("boom")
    assert len(lines) == 1


def test_a_terminal_keeps_the_rich_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "console", Console(stderr=True, force_terminal=True))
    assert isinstance(ui.progress(), Progress)
    monkeypatch.setattr(ui, "console", Console(stderr=True, force_terminal=False))
    assert isinstance(ui.progress(), ui.LineProgress)


def _stage_lines(stderr: str, stage: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(stage + " ")]


def test_demo_in_a_log_writes_every_stage_epoch_by_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(ui, "LINE_INTERVAL", 1e9)  # a slow machine's extra lines tested below
    tiny = [
        *TINY_OVERRIDES,
        f"runs_dir={tmp_path}",
        "pretrain.epochs=2",
        "pretrain.batch_size=256",
        "finetune.epochs=2",
        "finetune.batch_size=128",
        "finetune.eval_noise_copies=1",
        "finetune.sigma=[0.5]",
        "certify.sigma=[0.5]",
        "certify.n0=4",
        "certify.n=16",
        "certify.batch_size=16",
        "certify.max_examples=3",
    ]
    args = ["demo"] + [item for override in tiny for item in ("--set", override)]
    result = CliRunner().invoke(app, args)  # stderr is a pipe here, as in a batch job
    assert result.exit_code == 0, result.output
    plain(result.stderr.splitlines())
    pretrain = _stage_lines(result.stderr, "pretrain")
    assert [line.split(" epoch ")[1].split()[0] for line in pretrain] == ["1/2", "2/2"]
    assert all(" loss " in line and " lr " in line and " img/s " in line for line in pretrain)
    assert all(" eta " in line for line in pretrain)
    finetune = _stage_lines(result.stderr, "finetune sigma-0.5")
    assert [line.split(" epoch ")[1].split()[0] for line in finetune] == ["1/2", "2/2"]
    certify = _stage_lines(result.stderr, "certify sigma-0.5")
    assert len(certify) == 1 and certify[0].startswith("certify sigma-0.5 3/3 ")
    assert " noisy/s " in certify[0] and " eta 0:00:00" in certify[0]


def pretrain(tmp_path: Path, *overrides: str) -> object:
    sets = [*TINY_OVERRIDES, f"runs_dir={tmp_path}", "pretrain.batch_size=128", *overrides]
    args = ["pretrain", "recipes/digits.yaml"] + [x for s in sets for x in ("--set", s)]
    return CliRunner().invoke(app, args)


def test_lines_between_epochs_follow_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """11 updates an epoch, a log point every 10: with no interval a line at each log point."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(ui, "LINE_INTERVAL", 0.0)
    result = pretrain(tmp_path, "pretrain.epochs=2")
    assert result.exit_code == 0, result.output
    lines = _stage_lines(result.stderr, "pretrain")
    assert [line.split()[1] for line in lines] == ["10/22", "11/22", "21/22", "22/22"]
    plain(lines)


def test_tensorboard_gets_each_epoch_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(ROOT)
    result = pretrain(tmp_path, "pretrain.epochs=2", "logging.tensorboard=true")
    assert result.exit_code == 0, result.output
    run = tmp_path / "digits" / "pretrain"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "images_per_s"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [r["update"] for r in records]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_tensorboard_without_the_package_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    result = pretrain(tmp_path, "pretrain.epochs=1", "logging.tensorboard=true")
    line = one_line_error(result)
    assert line.startswith("error: logging.tensorboard: the tensorboard package is not installed")
    assert "dmae[tensorboard]" in line
    assert not (tmp_path / "digits" / "pretrain" / "metrics.jsonl").exists()
    assert not (tmp_path / "digits" / "pretrain" / "last.pth").exists()


def test_tensorboard_groups_evaluation_and_a_resume_replaces_the_epochs_it_reruns(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmae_cli.training.metrics import MetricsFile

    def record(epoch: int, loss: float) -> dict:
        extra = {"acc_clean": 0.5 + epoch / 10, "acc_noisy": 0.25, "grad_spike_updates": [3]}
        return {"epoch": epoch, "update": 10 * (epoch + 1), "loss": loss, "lr": 1e-3, **extra}

    first = MetricsFile(tmp_path / "metrics.jsonl", tensorboard=True)
    for epoch in range(3):
        first.append(record(epoch, loss=1.0))
    first.board.writer.close()
    resumed = MetricsFile(tmp_path / "metrics.jsonl", tensorboard=True)  # killed after epoch 0
    for epoch in (1, 2):
        resumed.append(record(epoch, loss=2.0))
    resumed.board.writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [
        (10, 1.0),
        (20, 2.0),
        (30, 2.0),
    ]
    assert [s.value for s in events.Scalars("eval/acc_clean")] == pytest.approx([0.5, 0.6, 0.7])
    assert "eval/acc_noisy" in events.Tags()["scalars"]
    assert not any("spike_updates" in tag for tag in events.Tags()["scalars"])
