"""Models: the input adapter, the DMAE encoder-decoder, and the helpers they share.

Images reach every model as float tensors in [0, 1] pixel space at the data set's native
resolution. `InputAdapter` is the first layer of every model: it resizes (only when the model's
input size differs) and normalises, so noise added by the caller is always pixel-space noise and
a certified radius is a pixel-space radius (PAPER.md §1-3).

The DMAE module keeps the encoder (a timm `VisionTransformer`) as `encoder` and the decoder
parts at the top level under MAE's names; `official_state_dict` / `load_official_state_dict`
translate to and from the layout of the official checkpoints (PAPER.md §5).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from dmae_cli.plugins import registry


class InputAdapter(nn.Module):
    """[0, 1] pixels at native size -> bicubic resize to the model's size -> mean/std normalise."""

    def __init__(
        self, input_size: int, model_size: int, mean: Sequence[float], std: Sequence[float]
    ):
        super().__init__()
        self.input_size = input_size
        self.model_size = model_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.model_size or pixels.shape[-2] != self.model_size:
            size = (self.model_size, self.model_size)
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False)
        return (pixels - self.mean) / self.std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised model-size images back to [0, 1] pixels (for pictures)."""
        return (x * self.std + self.mean).clamp(0, 1)


def build_backbone(
    name: str, *, img_size: int, patch_size: int, in_chans: int, **overrides: Any
) -> nn.Module:
    """A backbone from the registry; wrong overrides for the factory become one clear line."""
    factory = registry.backbones.get(name)
    try:
        return factory(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **overrides)
    except TypeError as exc:
        from dmae_cli.runtime.errors import UserError

        raise UserError(f"backbone '{name}' rejected its options {overrides}: {exc}") from exc


def sincos_pos_embed(grid: tuple[int, int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, shape (1, [1 +] H*W, dim); the cls slot is zero."""
    emb = build_sincos2d_pos_embed(list(grid), dim=dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), MAE's patch-major, channel-last order."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, L, patch*patch*C) -> (B, C, H, W); the inverse of `patchify` for square grids."""
    b, n, _ = patches.shape
    g = round(n**0.5)
    x = patches.reshape(b, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch, g * patch)


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random `(1 - mask_ratio)` share of each sample's tokens.

    x: (B, L, D). Returns the kept tokens (B, K, D), the binary mask (B, L) with 1 = removed
    (in the original order) and `ids_restore` (B, L) that undoes the per-sample shuffle.
    """
    b, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(b, length, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class DMAE(nn.Module):
    """Denoising masked autoencoder (PAPER.md §1) around a timm ViT encoder.

    `forward(noisy, clean)` takes pixel-space images in [0, 1]: the encoder sees the noisy ones
    (masked), and the loss compares the reconstruction with the clean ones over all patches.
    """

    def __init__(
        self,
        encoder: nn.Module,
        adapter: InputAdapter,
        *,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.norm_pix_loss = norm_pix_loss
        embed = encoder.patch_embed
        self.patch_size = embed.patch_size[0]
        self.in_chans = embed.proj.in_channels
        self.grid = tuple(embed.grid_size)
        dim = encoder.embed_dim
        # Fixed (non-trainable) sin-cos position embeddings for encoder and decoder.
        encoder.pos_embed.requires_grad_(False)
        encoder.pos_embed.data.copy_(sincos_pos_embed(self.grid, dim))

        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed(self.grid, decoder_embed_dim)
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim,
                decoder_num_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self.initialize_weights()

    # -- initialisation as MAE ---------------------------------------------------------------
    def initialize_weights(self) -> None:
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as if a linear layer
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # -- the four steps ------------------------------------------------------------------------
    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normalised (B, C, H, W) -> latent (B, 1+K, D), mask (B, L), ids_restore (B, L)."""
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:, :]
        tokens, mask, ids_restore = random_masking(tokens, mask_ratio, generator)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in enc.blocks:
            tokens = block(tokens)
        return enc.norm(tokens), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D) -> predicted patches (B, L, p*p*C) in the original order."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def target(self, clean: torch.Tensor) -> torch.Tensor:
        """The clean image, normalised and patchified; per-patch standardised with norm_pix_loss."""
        target = patchify(self.adapter(clean), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, clean: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """MSE against the clean target over *all* patches (DMAE's difference from MAE)."""
        return ((pred.float() - self.target(clean)) ** 2).mean()

    def forward(
        self,
        noisy: torch.Tensor,
        clean: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixel-space noisy and clean images -> (loss, predicted patches, mask)."""
        latent, mask, ids_restore = self.forward_encoder(self.adapter(noisy), mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(clean, pred), pred, mask

    # -- the official checkpoint layout ---------------------------------------------------------
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the key names of the official DMAE/MAE checkpoints."""
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("adapter."):
                continue
            out[key.removeprefix("encoder.")] = value
        return out


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Classifier(nn.Module):
    """The base classifier f of the smoothed model: [0, 1] pixels -> logits (PAPER.md §2).

    `InputAdapter` (resize + normalise) and then a timm ViT with global average pooling over
    the patch tokens and `fc_norm` before the linear head; noise is added by the caller, in
    pixel space, before `forward`.
    """

    def __init__(self, vit: nn.Module, adapter: InputAdapter):
        super().__init__()
        self.adapter = adapter
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(self.adapter(pixels))


def build_classifier(meta: dict[str, Any], drop_path: float = 0.0) -> Classifier:
    """A classifier from a checkpoint's self-description (see `pretrain.model_meta`)."""
    vit = build_backbone(
        meta["backbone"],
        img_size=meta["image_size"],
        patch_size=meta["patch_size"],
        in_chans=meta["channels"],
        **{
            **meta.get("backbone_options", {}),
            "num_classes": meta["num_classes"],
            "global_pool": meta.get("global_pool", "avg"),  # "token" for a linear probe
            "drop_path_rate": drop_path,
        },
    )
    if meta.get("head_batchnorm", False):  # linear probe as MAE: BatchNorm without affine
        vit.head = nn.Sequential(
            nn.BatchNorm1d(vit.head.in_features, affine=False, eps=1e-6), vit.head
        )
    adapter = InputAdapter(meta["input_size"], meta["image_size"], meta["mean"], meta["std"])
    return Classifier(vit, adapter)


# -- a fine-tuned classifier from its checkpoint ---------------------------------------------
CLASSIFIER_META = (
    "backbone",
    "image_size",
    "patch_size",
    "input_size",
    "channels",
    "mean",
    "std",
    "num_classes",
    "sigma",
)


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Classifier, dict[str, Any]]:
    """A classifier written by `dmae finetune`, in eval mode on `device`, and its meta.

    The checkpoint describes its own model (`meta`), so nothing else is needed; any file that
    is not such a classifier fails with one `UserError` line saying what it is instead.
    """
    from dmae_cli.runtime import checkpoint
    from dmae_cli.runtime.errors import UserError

    state = checkpoint.load_checkpoint(path)
    meta = state.get("meta")
    wanted = "a classifier from 'dmae finetune' (runs/<name>/finetune/sigma-<s>/best.pth)"
    if not isinstance(meta, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: not a dmae checkpoint (no self-description); expected {wanted}")
    if meta.get("stage") != "finetune":
        raise UserError(f"{path}: a {meta.get('stage', 'unknown')} checkpoint; expected {wanted}")
    absent = [key for key in CLASSIFIER_META if key not in meta]
    if absent:
        raise UserError(f"{path}: classifier checkpoint lacks {', '.join(absent)} in its meta")
    model = build_classifier(meta)
    checkpoint.load_exact(
        model, state["model"], str(path), "weights do not match the model its meta describes"
    )
    return model.to(device).eval(), meta
