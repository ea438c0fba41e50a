from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from dmae_cli.checkpoint import load_checkpoint
from dmae_cli.pretrain import run_pretrain
from dmae_cli.recipe import DataConfig, OptimConfig
from dmae_cli.train import Trainer, TrainingDiverged, base_lr, build_loader


def lr_curve(cfg: OptimConfig, n_items: int = 40) -> list[float]:
    data = torch.utils.data.TensorDataset(torch.zeros(n_items, 1))
    model = torch.nn.Linear(1, 1)
    trainer = Trainer(
        model,
        lambda m, b: m(b[0]).sum(),
        build_loader(data, DataConfig(), 4, 0),
        cfg,
        run_dir="unused",
        device=torch.device("cpu"),
    )
    lrs = []
    for update in range(trainer.total_updates):
        trainer.scheduler.step_update(update)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return lrs


def test_lr_follows_the_linear_scaling_rule() -> None:
    assert base_lr(OptimConfig(blr=1.5e-4, batch_size=64, accum_iter=8)) == pytest.approx(
        1.5e-4 * 512 / 256
    )
    assert base_lr(OptimConfig(blr=1.5e-4, lr=0.1)) == 0.1


def test_schedule_is_linear_warmup_then_cosine_per_update() -> None:
    cfg = OptimConfig(epochs=10, batch_size=4, lr=1.0, min_lr=0.1, warmup_epochs=2)
    lrs = lr_curve(cfg)  # 10 updates per epoch, 100 in all, 20 of warm-up
    assert len(lrs) == 100
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(0.5)  # linear: half-way through warm-up
    assert lrs[20] == pytest.approx(1.0)  # peak at the end of warm-up
    t = (60 - 20) / 80  # cosine over the remaining 80 updates
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[20:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_accumulation_counts_updates_not_batches() -> None:
    cfg = OptimConfig(epochs=1, batch_size=4, accum_iter=2, lr=1.0, warmup_epochs=0)
    assert len(lr_curve(cfg)) == 5


def test_pretraining_on_digits_lowers_the_loss(tiny_recipe) -> None:
    recipe = tiny_recipe("pretrain.epochs=4", "pretrain.warmup_epochs=1")
    result = run_pretrain(recipe)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0]
    run = recipe.stage_dir("pretrain")
    assert {"last.pth", "checkpoint-0004.pth", "metrics.jsonl", "config.yaml"} <= {
        p.name for p in run.iterdir()
    }
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3]
    state = load_checkpoint(run / "last.pth")
    assert state["epoch"] == 3 and state["meta"]["stage"] == "pretrain"
    assert state["meta"]["backbone"] == "vit_tiny" and state["meta"]["num_classes"] == 10


def test_two_epochs_equal_one_plus_resume_plus_one(tiny_recipe, tmp_path) -> None:
    straight = tiny_recipe("pretrain.epochs=2", "name=straight")
    run_pretrain(straight)
    split = tiny_recipe("pretrain.epochs=2", "name=split")
    first = run_pretrain(split, stop_after=1)
    assert len(first.history) == 1
    second = run_pretrain(split)  # resumes from last.pth automatically
    assert [h["epoch"] for h in second.history] == [1]
    a = load_checkpoint(straight.stage_dir("pretrain") / "last.pth")["model"]
    b = load_checkpoint(split.stage_dir("pretrain") / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    lines = (split.stage_dir("pretrain") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_recipe) -> None:
    recipe = tiny_recipe("pretrain.epochs=2", "pretrain.lr=1.0e+30", "pretrain.warmup_epochs=0")
    with pytest.raises(
        TrainingDiverged, match="loss became nan by update .*try a lower learning rate"
    ):
        run_pretrain(recipe)


def test_sigint_mid_epoch_saves_and_resumes_exactly(tiny_recipe, monkeypatch) -> None:
    import os
    import signal

    import dmae_cli.pretrain as pretrain_module
    from dmae_cli.interrupt import Interrupted

    straight = tiny_recipe("pretrain.epochs=2", "name=straight")
    run_pretrain(straight)

    calls = {"n": 0}
    real_loss = pretrain_module.dmae_loss

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:  # inside epoch 1 (22 updates per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    split = tiny_recipe("pretrain.epochs=2", "name=split")
    monkeypatch.setattr(pretrain_module, "dmae_loss", loss_then_signal)
    with pytest.raises(Interrupted, match="interrupted at epoch 1, update 8/22") as err:
        run_pretrain(split)
    assert err.value.exit_code == 130
    monkeypatch.setattr(pretrain_module, "dmae_loss", real_loss)
    state = load_checkpoint(split.stage_dir("pretrain") / "last.pth")
    assert state["epoch"] == 0 and state["position"]["updates_done"] == 8

    resumed = run_pretrain(split)
    assert [h["epoch"] for h in resumed.history] == [1]
    a = load_checkpoint(straight.stage_dir("pretrain") / "last.pth")["model"]
    b = load_checkpoint(split.stage_dir("pretrain") / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
