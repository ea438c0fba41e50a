"""The fine-tuning objective: consistency regularisation and noise on the copies, in pixel
space before the model's input adapter."""

from __future__ import annotations

import math

import pytest
import torch

from dmae_cli.models.classifier import build_classifier
from dmae_cli.training.objective import Objective, consistency_defaults, consistency_loss
from tests.test_finetune import meta


def test_consistency_loss_matches_a_hand_computed_example() -> None:
    # One image, two noisy copies, two classes: p1 = (1/2, 1/2), p2 = (3/4, 1/4).
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    avg = (0.625, 0.375)
    kl1 = avg[0] * math.log(0.625 / 0.5) + avg[1] * math.log(0.375 / 0.5)  # KL(avg || p1)
    kl2 = avg[0] * math.log(0.625 / 0.75) + avg[1] * math.log(0.375 / 0.25)  # KL(avg || p2)
    entropy = -(avg[0] * math.log(avg[0]) + avg[1] * math.log(avg[1]))
    expected = 2.0 * (kl1 + kl2) / 2 + 0.5 * entropy
    assert consistency_loss(logits, lbd=2.0, eta=0.5).item() == pytest.approx(expected, rel=1e-6)
    # The other KL direction, KL(p_i || avg), gives a different number: the direction matters.
    reverse = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    reverse += 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    assert abs(2.0 * reverse / 2 + 0.5 * entropy - expected) > 1e-4


def test_consistency_is_zero_kl_when_copies_agree() -> None:
    logits = torch.tensor([[[2.0, -1.0, 0.5]], [[2.0, -1.0, 0.5]]])
    p = torch.softmax(logits[0, 0], -1)
    entropy = -(p * p.log()).sum().item()
    assert consistency_loss(logits, lbd=2.0, eta=0.0).item() == pytest.approx(0.0, abs=1e-7)
    assert consistency_loss(logits, lbd=2.0, eta=1.0).item() == pytest.approx(entropy, rel=1e-5)


def test_consistency_gradients_stay_finite_when_a_softmax_underflows() -> None:
    logits = torch.tensor([[[200.0, -200.0]], [[-200.0, 200.0]], [[300.0, -300.0]]])
    logits.requires_grad_(True)
    loss = consistency_loss(logits, lbd=2.0, eta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_consistency_defaults_follow_the_paper() -> None:
    assert consistency_defaults(0.25) == (2.0, 0.5)
    assert consistency_defaults(0.5) == (2.0, 0.5)
    assert consistency_defaults(1.0) == (2.0, 0.1)
    assert consistency_defaults(0.12) == (2.0, 0.5)  # nearest paper sigma
    assert consistency_defaults(0.75) == (2.0, 0.1)  # the midpoint takes the larger sigma's rule
    assert consistency_defaults(2.0) == (2.0, 0.1)


def test_noise_is_added_in_pixel_space_before_the_adapter() -> None:
    torch.manual_seed(0)
    model = build_classifier(meta())
    seen: list[torch.Tensor] = []
    model.adapter.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    clean = torch.rand(256, 1, 8, 8)
    objective = Objective(sigma=0.5, num_noise=2, lbd=2.0, eta=0.5)
    objective(model, (clean, torch.randint(0, 10, (256,))))
    (noisy,) = seen
    assert noisy.shape == (512, 1, 8, 8)  # native resolution: the adapter resizes afterwards
    noise = noisy - clean.repeat(2, 1, 1, 1)
    # The raw pixel-space sigma, not sigma / std (which noise after normalising would give).
    assert noise.std().item() == pytest.approx(0.5, rel=0.03)
    assert not torch.allclose(noise[:256], noise[256:])  # independent noise per copy


def test_objective_without_consistency_is_cross_entropy_on_noisy_copies() -> None:
    model = build_classifier(meta())
    batch = (torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(1)
    plain = Objective(sigma=0.25, consistency=False)(model, batch)
    torch.manual_seed(1)
    with_reg = Objective(sigma=0.25, consistency=True, lbd=2.0, eta=0.5)(model, batch)
    assert with_reg.item() > plain.item()  # the same noise; consistency adds a positive term


def test_mixup_objective_runs_with_soft_targets() -> None:
    from timm.data import Mixup

    model = build_classifier(meta())
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    loss = Objective(sigma=0.25, mixup=mixup)(model, (torch.rand(4, 1, 8, 8), torch.arange(4)))
    assert torch.isfinite(loss)
    loss.backward()
