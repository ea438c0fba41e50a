"""Pre-training throughput: our training loop against a naive step, same model, same data.

Ours: `dmae_cli.train.Trainer` as `dmae pretrain` runs it (timm's fused SDPA attention, AdamW
with foreach/fused kernels, bf16 autocast on CUDA). Naive: the same DMAE with timm's attention
unfused, plain fp32 and a for-loop AdamW (`foreach=False`), stepped in a bare Python loop.

    python benchmarks/pretrain_step.py --device cpu
    python benchmarks/pretrain_step.py --device cuda --backbone vit_base_patch16 --image-size 224 \
        --patch-size 16 --batch-size 128 --decoder-dim 512 --decoder-depth 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dmae_cli.models import DMAE, InputAdapter, build_backbone
from dmae_cli.pretrain import dmae_loss
from dmae_cli.recipe import DataConfig, PretrainConfig
from dmae_cli.train import Trainer, build_loader


def build(args: argparse.Namespace, fused_attention: bool) -> DMAE:
    torch.manual_seed(0)
    size = args.image_size
    encoder = build_backbone(args.backbone, img_size=size, patch_size=args.patch_size, in_chans=3)
    model = DMAE(
        encoder,
        InputAdapter(size, size, [0.5] * 3, [0.25] * 3),
        decoder_embed_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=16 if args.decoder_dim % 16 == 0 else 4,
    )
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attention
    return model.to(args.device)


def images(args: argparse.Namespace, count: int) -> torch.Tensor:
    return torch.rand(
        count, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
    )


def ours(args: argparse.Namespace) -> float:
    model = build(args, fused_attention=True)
    count = args.steps * args.batch_size
    data = TensorDataset(images(args, count), torch.zeros(count))
    # Two epochs of `steps` updates: the first warms up, the second is the one measured.
    cfg = PretrainConfig(epochs=2, batch_size=args.batch_size, lr=1e-4, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model,
            lambda m, b: dmae_loss(m, b, sigma=0.25, mask_ratio=0.75),
            build_loader(data, DataConfig(), args.batch_size, 0),
            cfg,
            Path(tmp),
            torch.device(args.device),
            precision=args.precision,
            description="ours",
        )
        history = trainer.fit()
    return history[1]["images_per_s"]


def naive(args: argparse.Namespace) -> float:
    model = build(args, fused_attention=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=False)
    data = images(args, args.batch_size).to(args.device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(args.device)
            start = time.perf_counter()
        loss = dmae_loss(model, (data, None), sigma=0.25, mask_ratio=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the naive loop syncs every step, as most reference loops log every step
    _sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="vit_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decoder-dim", type=int, default=128)
    parser.add_argument("--decoder-depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()
    base = naive(args)
    fast = ours(args)
    print(
        f"device={args.device} backbone={args.backbone} image={args.image_size} "
        f"patch={args.patch_size} batch={args.batch_size} precision={args.precision}"
    )
    print(f"naive step: {base:9.1f} images/s")
    print(f"dmae step:  {fast:9.1f} images/s")
    print(f"ratio:      {fast / base:9.2f}x")


if __name__ == "__main__":
    main()
