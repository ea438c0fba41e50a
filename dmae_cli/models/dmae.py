"""The denoising masked autoencoder (DMAE) that pre-training trains.

DMAE corrupts each image with Gaussian noise in [0, 1] pixel space, masks a random share of its
patches, encodes the visible noisy patches with a ViT and reconstructs the *clean* image from
them; unlike MAE, the loss covers every patch, visible or masked. The encoder (a timm
`VisionTransformer`) is kept as `encoder` and the decoder parts at the top level under MAE's
names; `official_state_dict` gives the weights in the layout of the official DMAE/MAE
checkpoints (the encoder's keys without the `encoder.` prefix). Here too are the helpers it is
made of: patchify/unpatchify and per-sample random masking; the fixed 2-D sin-cos position
embeddings (MAE's table) are in `models.positions`.

The encoder may put any prefix tokens before the patches, as timm's ViT does: a cls token (the
paper's), register tokens, or none; with or without position rows for them (timm's
`no_embed_class`). The prefix tokens are never masked and pass through the decoder, which has a
zero position row for each, and are dropped from the reconstruction.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.positions import prefix_of, sincos_pos_embed
from dmae_cli.runtime.errors import UserError


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
    """Denoising masked autoencoder around a timm ViT encoder.

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
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.norm_pix_loss = norm_pix_loss
        embed = encoder.patch_embed
        self.patch_size = embed.patch_size[0]
        self.in_chans = embed.proj.in_channels
        self.grid = tuple(embed.grid_size)
        dim = encoder.embed_dim
        self.prefix = prefix_of(encoder)
        if dim % 4 or decoder_embed_dim % 4:
            raise UserError(
                f"DMAE's 2-D sin-cos position embeddings need widths divisible by 4: the encoder "
                f"has {dim}, the decoder {decoder_embed_dim} (pretrain.decoder_embed_dim)"
            )
        if encoder.pos_embed is not None:  # fixed (non-trainable), as MAE
            encoder.pos_embed.requires_grad_(False)
            encoder.pos_embed.data.copy_(sincos_pos_embed(self.grid, dim, self.prefix.rows))

        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed(self.grid, decoder_embed_dim, self.prefix.tokens)
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
        if self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # -- the four steps ------------------------------------------------------------------------
    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normalised (B, C, H, W) -> latent (B, P+K, D) with the P prefix tokens first,
        mask (B, L), ids_restore (B, L)."""
        tokens, mask, ids_restore = random_masking(self.embed_patches(x), mask_ratio, generator)
        return self.encode(tokens), mask, ids_restore

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised (B, C, H, W) -> patch tokens with their positions (B, L, D)."""
        enc = self.encoder
        tokens = enc.patch_embed(x)
        if tokens.dim() == 4:  # (B, H, W, D) from a ViT with dynamic_img_size
            tokens = tokens.flatten(1, 2)
        if enc.pos_embed is not None:
            tokens = tokens + enc.pos_embed[:, self.prefix.rows :, :]
        return tokens

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, K, D) -> latent (B, P+K, D): the prefix tokens put first, the blocks
        and the final norm applied."""
        enc = self.encoder
        tokens = torch.cat([self.prefix_tokens(tokens.shape[0]), tokens], dim=1)
        tokens = enc.norm_pre(tokens) if hasattr(enc, "norm_pre") else tokens
        for block in enc.blocks:
            tokens = block(tokens)
        return self.final_norm()(tokens)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """The encoder's cls and register tokens with their positions: (batch, P, D)."""
        enc = self.encoder
        parts = [t for t in (enc.cls_token, getattr(enc, "reg_token", None)) if t is not None]
        if not parts:
            return enc.patch_embed.proj.weight.new_zeros(batch, 0, enc.embed_dim)
        prefix = torch.cat(parts, dim=1)
        if self.prefix.rows and enc.pos_embed is not None:
            prefix = prefix + enc.pos_embed[:, : self.prefix.rows, :]
        return prefix.expand(batch, -1, -1)

    def final_norm(self) -> nn.Module:
        """The encoder's last norm: `norm`, or `fc_norm` where timm moved it after the pooling
        (a ViT without a cls token pools by average); per token they are the same LayerNorm."""
        enc = self.encoder
        norm = enc.norm
        if isinstance(norm, nn.Identity) and not isinstance(
            getattr(enc, "fc_norm", norm), nn.Identity
        ):
            return enc.fc_norm
        return norm

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, P+K, D) -> predicted patches (B, L, p*p*C) in the original order."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        p = self.prefix.tokens
        masked = self.mask_token.expand(b, length + p - x.shape[1], -1)
        patches = torch.cat([x[:, p:, :], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :p, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, p:, :]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised (B, C, H, W) -> predicted patches (B, L, p*p*C), every patch visible.

        The denoiser's path (`models.denoiser`): no masking and no shuffle, so it is
        deterministic and draws nothing from any random generator; `random_masking` with a
        mask ratio of 0 would keep every patch too, but shuffled, from the global generator.
        """
        tokens = self.embed_patches(x)
        b, length = tokens.shape[:2]
        in_order = torch.arange(length, device=tokens.device).expand(b, -1)
        return self.forward_decoder(self.encode(tokens), in_order)

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
        out: dict[str, torch.Tensor] = {}
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
