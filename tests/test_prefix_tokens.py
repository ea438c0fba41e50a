"""Backbones with any prefix tokens: timm ViTs with register tokens, without position rows for
the prefix (`no_embed_class`), or without a cls token pre-train, fine-tune and certify.

Before, a register or no_embed_class ViT stopped pre-training with a 60-line "The size of
tensor a (21) must match the size of tensor b (17)", and fine-tuning one from a plain
checkpoint blamed the checkpoint ("12 position embeddings do not form a square grid").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.classifier import build_classifier, load_classifier
from dmae_cli.models.dmae import DMAE
from dmae_cli.models.weights import load_encoder
from dmae_cli.training.pretrain import dmae_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH = {"embed_dim": 32, "depth": 2, "num_heads": 2}
PREFIXES = {
    "registers": {"reg_tokens": 4},
    "no-embed-class": {"no_embed_class": True},
    "registers-no-embed-class": {"reg_tokens": 4, "no_embed_class": True},
    "no-class-token": {"class_token": False, "global_pool": "avg"},
}


def dmae_with(options: dict[str, Any]) -> DMAE:
    encoder = build_backbone("vit_tiny", img_size=16, patch_size=4, in_chans=1, **WIDTH, **options)
    adapter = InputAdapter(16, 16, mean=[0.3], std=[0.4])
    return DMAE(encoder, adapter, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def classifier_meta(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "backbone": "vit_tiny",
        "backbone_options": {**WIDTH, **options},
        "image_size": 16,
        "patch_size": 4,
        "input_size": 16,
        "channels": 1,
        "mean": [0.3],
        "std": [0.4],
        "num_classes": 10,
        "sigma": 0.5,
        "stage": "finetune",
    }


@pytest.mark.parametrize("options", PREFIXES.values(), ids=list(PREFIXES))
def test_pretrain_finetune_and_certify_forward(tmp_path: Path, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = dmae_with(options)
    images = torch.rand(8, 1, 16, 16)
    # a pre-training step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = dmae_loss(model, (images, None), sigma=0.25, mask_ratio=0.75)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    _, pred, mask = model(images, images, 0.75)
    assert pred.shape == (8, 16, 16) and mask.shape == (8, 16)
    torch.save({"model": model.state_dict()}, tmp_path / "pre.pth")
    # fine-tuning from it: every encoder tensor is taken, the prefix layout is the same
    classifier = build_classifier(classifier_meta(options))
    report = load_encoder(classifier.vit, tmp_path / "pre.pth")
    assert report.prefix is None and report.resampled is None
    assert torch.equal(classifier.vit.pos_embed, model.encoder.pos_embed)
    assert not [k for k in report.missing if not k.startswith(("head.", "fc_norm."))]
    logits = classifier(images)
    F.cross_entropy(logits, torch.arange(8)).backward()
    assert logits.shape == (8, 10)
    # a certification-sized batch of noisy copies
    classifier.eval()
    with torch.no_grad():
        assert classifier(torch.rand(256, 1, 16, 16)).shape == (256, 10)


def test_registers_through_the_stages(tiny_recipe) -> None:
    """The commands' own path: `dmae pretrain`, then `dmae finetune` from its checkpoint."""
    from dmae_cli.training.finetune import run_finetune
    from dmae_cli.training.pretrain import run_pretrain

    options = "model.options={embed_dim: 32, depth: 2, num_heads: 2, reg_tokens: 4}"
    recipe = tiny_recipe(options, "pretrain.epochs=1", "finetune.epochs=1", "finetune.sigma=[0.5]")
    run_pretrain(recipe, stop_after=2)
    (run,) = run_finetune(recipe, stop_after=2)
    model, spec = load_classifier(run.run_dir / "last.pth")
    assert spec.backbone_options["reg_tokens"] == 4 and model.vit.num_prefix_tokens == 5
    with torch.no_grad():
        assert model(torch.rand(4, 1, 16, 16)).shape == (4, 10)
