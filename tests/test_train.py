from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

from dmae_cli.config.recipe import DataConfig, OptimConfig
from dmae_cli.data.loading import build_loader
from dmae_cli.runtime.checkpoint import load_checkpoint
from dmae_cli.runtime.errors import UserError
from dmae_cli.training.health import SpikeDetector, TrainingDiverged
from dmae_cli.training.optim import base_lr, fused_adamw
from dmae_cli.training.pretrain import run_pretrain
from dmae_cli.training.trainer import Trainer


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("pretrain.norm_pix_loss=true", "norm_pix_loss: trained with False, this run asks for"),
        ("pretrain.sigma=[0.25, 0.5]", "noise_levels: trained with [0.25], this run asks for"),
    ],
)
def test_resuming_with_another_objective_is_one_line(tiny_recipe, change, message) -> None:
    """The weights fit either way, so only the meta can tell: a DMAE half trained without
    norm_pix_loss, resumed with it, would end up a model that can no longer denoise."""
    first = tiny_recipe("pretrain.epochs=2")
    run_pretrain(first, stop_after=1)
    with pytest.raises(UserError, match=re.escape(message)):
        run_pretrain(tiny_recipe("pretrain.epochs=2", change))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_recipe) -> None:
    # The CLI's view (update number, the kept checkpoint, its contents): test_bad_inputs.py.
    recipe = tiny_recipe("pretrain.epochs=2", "pretrain.lr=1.0e+30", "pretrain.warmup_epochs=0")
    with pytest.raises(
        TrainingDiverged,
        match=r"(loss|gradient norm) became (nan|inf) at update \d+ \(epoch 0\); no checkpoint "
        r"was written yet; lower pretrain.lr \(now 1e\+30\) or set pretrain.clip_grad",
    ):
        run_pretrain(recipe)


# -- gradient-norm spikes --------------------------------------------------------------------
def test_spike_detector_flags_a_jump_and_follows_a_lasting_change() -> None:
    detector = SpikeDetector(factor=5.0, warmup=4, decay=0.9)
    assert [detector.observe(n) for n in (2.0, 1.0, 3.0, 2.0)] == [None] * 4  # warm-up
    assert detector.average == pytest.approx(2.0)
    assert detector.observe(30.0) == pytest.approx(15.0)  # 15x the average: a spike
    assert detector.average < 3.0  # entered capped at 5x: one spike barely moves the average
    assert detector.observe(2.5) is None
    # A lasting 4x change of scale is never a spike; the average follows it.
    assert all(detector.observe(8.0) is None for _ in range(60))
    assert detector.average == pytest.approx(8.0, rel=0.01)


def spiky_trainer(tmp_path, spike_at: int, clip_grad: float | None) -> Trainer:
    """A linear model on constant data (steady gradients) whose loss is scaled 1000x at one
    update (1-based), so that exactly that update's gradient norm spikes."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.ones(64, 4), torch.zeros(64))
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = ((model(batch[0]).squeeze(-1) - 5.0) ** 2).mean()
        return loss * 1000 if len(calls) == spike_at else loss

    cfg = OptimConfig(epochs=3, batch_size=4, lr=1e-4, warmup_epochs=0, clip_grad=clip_grad)
    return Trainer(
        torch.nn.Linear(4, 1),
        loss_fn,
        build_loader(data, DataConfig(), 4, 0),
        cfg,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        section="pretrain",
    )


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_a_gradient_norm_spike_is_logged_and_counted(tmp_path, capsys, clip_grad) -> None:
    trainer = spiky_trainer(tmp_path, spike_at=30, clip_grad=clip_grad)  # epoch 1, update 14
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_spikes"] for r in records] == [0, 1, 0]
    assert [r["grad_spike_updates"] for r in records] == [[], [30], []]
    assert records[1]["grad_norm_max"] > 100 * records[0]["grad_norm_max"]
    assert all(0 < r["grad_norm"] <= r["grad_norm_max"] for r in records)
    err = capsys.readouterr().err
    assert "warning: gradient-norm spike at update 30 (epoch 1): norm" in err
    assert (
        "clipped to 1" in err if clip_grad else "not clipped (pretrain.clip_grad is unset)" in err
    )
    assert err.count("gradient-norm spike") == 1


def test_sigint_mid_epoch_saves_and_resumes_exactly(tiny_recipe, monkeypatch) -> None:
    import os
    import signal

    import dmae_cli.training.pretrain as pretrain_module
    from dmae_cli.runtime.interrupt import Interrupted

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


def test_adamw_is_fused_where_torch_has_it_and_plain_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groups = [{"params": list(torch.nn.Linear(3, 3).parameters()), "weight_decay": 0.05}]
    assert fused_adamw(groups, 1e-3, (0.9, 0.95)).defaults["fused"]  # CPU: torch >= 2.4
    real = torch.optim.AdamW

    def no_fused_kernel(params, **kwargs):  # an older torch, or a device without the kernel
        optimizer = real(params, **kwargs)
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    optimizer = fused_adamw(groups, 1e-3, (0.9, 0.95))
    assert not optimizer.defaults["fused"]
    assert not optimizer.param_groups[0]["fused"]  # the failed try left nothing behind
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
