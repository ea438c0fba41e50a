"""The base classifier of the smoothed model, built from a `ModelSpec` or loaded from the
checkpoint `dmae finetune` writes.

Randomized smoothing certifies g(x) = argmax_c P(f(x + noise) = c) with Gaussian noise in [0, 1]
pixel space; `Classifier` is f: the `InputAdapter` (resize + normalise) and then a timm ViT with
global average pooling over the patch tokens and `fc_norm` before the linear head (a linear
probe pools the cls token instead, with a BatchNorm before its head, as MAE does).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.spec import CLASSIFIER_FIELDS, ModelSpec, recorded
from dmae_cli.models.weights import filter_state_dict
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError


class Classifier(nn.Module):
    """The base classifier f of the smoothed model: [0, 1] pixels -> logits.

    Noise is added by the caller, in pixel space, before `forward`.
    """

    def __init__(self, vit: nn.Module, adapter: InputAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(self.adapter(pixels))


def build_classifier(spec: ModelSpec | Mapping[str, Any], drop_path: float = 0.0) -> Classifier:
    """A classifier from a model's self-description (a `ModelSpec`, or its plain-dict form)."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    vit = build_backbone(
        spec.backbone,
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        in_chans=spec.channels,
        **{
            **spec.backbone_options,
            "num_classes": spec.num_classes,
            # "token" for a linear probe
            "global_pool": "avg" if spec.global_pool is None else spec.global_pool,
            "drop_path_rate": drop_path,
        },
    )
    if spec.head_batchnorm:  # linear probe as MAE: BatchNorm without affine
        vit.head = nn.Sequential(
            nn.BatchNorm1d(vit.head.in_features, affine=False, eps=1e-6), vit.head
        )
    adapter = InputAdapter(spec.input_size, spec.image_size, spec.mean, spec.std)
    return Classifier(vit, adapter)


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu", state: dict[str, Any] | None = None
) -> tuple[Classifier, ModelSpec]:
    """A classifier written by `dmae finetune`, in eval mode on `device`, and its spec.

    The checkpoint describes its own model (`meta`), so nothing else is needed; any file that
    is not such a classifier fails with one `UserError` line saying what it is instead.
    `state` is the file's contents when the caller has read it already (it is not read again).
    """
    if state is None:
        state = checkpoint.load_checkpoint(path)
    meta = state.get("meta")
    wanted = "a classifier from 'dmae finetune' (runs/<name>/finetune/sigma-<s>/best.pth)"
    if not isinstance(meta, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: not a dmae checkpoint (no self-description); expected {wanted}")
    stage = recorded(meta, "stage")
    if stage != "finetune":
        raise UserError(f"{path}: a {stage or 'unknown'} checkpoint; expected {wanted}")
    spec = ModelSpec.from_dict(
        meta, str(path), require=CLASSIFIER_FIELDS, what="classifier checkpoint"
    )
    model = build_classifier(spec)
    weights = filter_state_dict(state, model, str(path)).weights
    checkpoint.load_exact(
        model, weights, str(path), "weights do not match the model its meta describes"
    )
    return model.to(device).eval(), spec
