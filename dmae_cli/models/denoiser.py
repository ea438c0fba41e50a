"""A pre-trained DMAE used as a one-shot denoiser, and a classifier behind it.

Denoised smoothing (Salman et al., NeurIPS 2020): a classifier f trained only on clean images
is certified as f(D(x + noise)), D a denoiser. A DMAE was pre-trained to reconstruct the clean
image from a noisy, masked one; with no mask it reconstructs from the whole noisy image, which
is what D needs. `Denoiser` is that D: noisy [0, 1] pixels in, denoised [0, 1] pixels out, at
the data's native side; `Denoised(denoiser, classifier)` is f∘D, just another deterministic
base classifier, so the sampler adds the noise to its input (before D) and the certificate is
Cohen's, as for any classifier.

A DMAE pre-trained with `norm_pix_loss` predicts each patch standardised by the clean patch's
own mean and variance, which the noisy input does not give: its output is no image, and
`load_denoiser` refuses it rather than invent the missing statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.dmae import DMAE, unpatchify
from dmae_cli.models.spec import BUILD_FIELDS, ModelSpec, recorded
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError

DENOISER_STAGES = ("pretrain", "denoiser")
WANTED = (
    "a DMAE from 'dmae pretrain' (runs/<name>/pretrain/last.pth) or a denoiser tuned with "
    "'dmae finetune --denoiser-for'"
)


class Denoiser(nn.Module):
    """D: noisy [0, 1] pixels (B, C, S, S) at the data's native side S -> denoised ones, the
    same shape, clamped to [0, 1].

    The DMAE's own adapter resizes to its model size and normalises; the encoder sees every
    patch (no mask); the decoder's patch predictions are put back together and un-normalised
    with the adapter's mean and std. Differentiable: a denoiser can be tuned through it.
    """

    def __init__(self, dmae: DMAE, output_size: int) -> None:
        super().__init__()
        if dmae.norm_pix_loss:  # an invariant here: `load_denoiser` refuses such checkpoints
            raise ValueError("a DMAE with norm_pix_loss predicts no pixels; it cannot denoise")
        self.dmae = dmae
        self.output_size = output_size

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        dmae = self.dmae
        adapter: InputAdapter = dmae.adapter
        patches = dmae.reconstruct(adapter(noisy))
        images = unpatchify(patches, dmae.patch_size, dmae.in_chans).float()
        images = images * adapter.std + adapter.mean  # not `denormalise`: clamp after resizing
        if images.shape[-1] != self.output_size:
            # Back to the side where the classifier's own adapter expects the data: bicubic as
            # the adapter's resize, with antialiasing because this is usually a reduction
            # (224 -> 32), where sampling without it folds high frequencies back in as noise.
            size = (self.output_size, self.output_size)
            images = F.interpolate(
                images, size=size, mode="bicubic", align_corners=False, antialias=True
            )
        return images.clamp(0, 1)


class Denoised(nn.Module):
    """f∘D: the classifier applied to the denoiser's output. Noise added to its input lands
    before the denoiser, as denoised smoothing certifies it."""

    def __init__(self, denoiser: Denoiser, classifier: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(pixels))


def dmae_from_spec(spec: ModelSpec) -> DMAE:
    """The DMAE a pre-training checkpoint's spec describes, as `training.pretrain.build_dmae`
    builds it from a recipe (randomly initialised; its weights come from the file)."""
    if spec.decoder is None:
        raise ValueError("a DMAE's spec records its decoder")
    with torch.random.fork_rng(devices=[]):  # building draws random weights: leave no trace
        encoder = build_backbone(
            spec.backbone,
            img_size=spec.image_size,
            patch_size=spec.patch_size,
            in_chans=spec.channels,
            **spec.backbone_options,
        )
        adapter = InputAdapter(spec.input_size, spec.image_size, spec.mean, spec.std)
        return DMAE(
            encoder,
            adapter,
            decoder_embed_dim=spec.decoder.embed_dim,
            decoder_depth=spec.decoder.depth,
            decoder_num_heads=spec.decoder.num_heads,
            norm_pix_loss=bool(spec.norm_pix_loss),
        )


def load_denoiser(
    path: str | Path, device: str | torch.device = "cpu", state: dict[str, Any] | None = None
) -> tuple[Denoiser, ModelSpec]:
    """The denoiser in a DMAE checkpoint (`dmae pretrain`'s, or a tuned one), in eval mode on
    `device`, and its spec; any other file is one `UserError` line saying what it is instead.
    `state` is the file's contents when the caller has read it already."""
    if state is None:
        state = checkpoint.load_checkpoint(path)
    spec = denoiser_spec(path, state)
    dmae = dmae_from_spec(spec)
    checkpoint.load_exact(
        dmae, state["model"], str(path), "weights do not match the DMAE its meta describes"
    )
    return Denoiser(dmae, spec.input_size).to(device).eval(), spec


def denoiser_spec(path: str | Path, state: dict[str, Any]) -> ModelSpec:
    """The spec of a checkpoint that can denoise, or one `UserError` line saying why not."""
    meta = state.get("meta")
    if not isinstance(meta, dict) or not isinstance(state.get("model"), dict):
        raise UserError(
            f"{path}: not a dmae checkpoint (no self-description); expected {WANTED}. An "
            f"official DMAE/MAE file describes no model: continue pre-training from it with "
            f"'dmae pretrain --set pretrain.init={path} --set pretrain.norm_pix_loss=false'"
        )
    stage = recorded(meta, "stage")
    if stage == "finetune":
        raise UserError(
            f"{path}: a classifier (finetune) checkpoint, not a denoiser: a denoiser is a DMAE "
            f"from 'dmae pretrain' (or tuned by 'dmae finetune --denoiser-for'), and the "
            f"classifier goes behind it"
        )
    if stage not in DENOISER_STAGES:
        raise UserError(f"{path}: a {stage or 'unknown'} checkpoint; expected {WANTED}")
    spec = ModelSpec.from_dict(
        meta, str(path), require=(*BUILD_FIELDS, "decoder"), what="DMAE checkpoint"
    )
    if spec.norm_pix_loss is None:
        raise UserError(
            f"{path}: its meta does not say whether it was pre-trained with norm_pix_loss (a "
            f"DMAE that was cannot denoise); pre-train it again with a current dmae"
        )
    if spec.norm_pix_loss:
        raise UserError(
            f"{path}: pre-trained with norm_pix_loss, so its decoder predicts each patch "
            f"standardised by the clean patch's own mean and variance, which a noisy input does "
            f"not give: it cannot denoise; pre-train with 'pretrain.norm_pix_loss: false'"
        )
    return spec
