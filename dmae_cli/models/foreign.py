"""Classifiers trained elsewhere, made self-describing: what `dmae import` does.

A classifier fine-tuned by the official DMAE/MAE code (`{'model': state_dict, 'optimizer',
'epoch', 'scaler', 'args'}`, timm `VisionTransformer` keys with `fc_norm` and `head` under
global pooling), or any timm ViT classifier's state dict or `.safetensors` file, carries its
weights but not what a certification needs to rebuild it: the backbone's options, the input
size, the normalisation, the noise level it was trained for. `load_foreign` reads the shapes
from the weights (width, depth, patch size, channels, class count, prefix tokens, pooling),
takes the rest from the caller, builds the `Classifier` and loads every tensor exactly;
`import_classifier` writes it as a dmae checkpoint (weights + `ModelSpec`), which
`load_classifier` and `dmae certify --checkpoint` read like one from `dmae finetune`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmae_cli import __version__
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.classifier import Classifier, build_classifier
from dmae_cli.models.positions import prefix_in
from dmae_cli.models.spec import CLASSIFIER_FIELDS, ModelSpec, recorded
from dmae_cli.models.weights import DECODER_PREFIXES, filter_state_dict, unwrap
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# The description's fields the caller gives, by the `dmae import` option that gives them.
FLAGS = {
    "backbone": "--backbone",
    "backbone_options": "--option",
    "image_size": "--image-size",
    "input_size": "--input-size",
    "mean": "--mean",
    "std": "--std",
    "class_names": "--class-names",
    "dataset": "--dataset",
    "sigma": "--sigma",
}


@dataclass(frozen=True)
class Foreign:
    """What the caller says about a classifier that its weights do not."""

    sigma: float  # the noise level it was fine-tuned for
    mean: Sequence[float]  # the statistics its inputs were normalised with
    std: Sequence[float]
    backbone: str = "vit_base_patch16"  # the registry name it was built as (heads, mlp, norm)
    num_classes: int | None = None  # None: the head's
    image_size: int | None = None  # the model's input side; None: that of its position table
    input_size: int | None = None  # the data's native side; None: image_size
    class_names: Sequence[str] = ()
    dataset: str | None = None  # the data set plugin its classes are those of
    options: Mapping[str, Any] = field(default_factory=dict)  # more backbone options


@dataclass(frozen=True)
class Shapes:
    """A ViT classifier as its weights describe it."""

    width: int
    depth: int
    patch_size: int
    channels: int
    num_classes: int
    image_size: int
    global_pool: str  # "avg" with fc_norm (MAE's fine-tuning), "token" without
    prefix_options: dict[str, Any]  # class_token, reg_tokens, no_embed_class as timm takes them


def read_shapes(weights: Mapping[str, torch.Tensor], source: str) -> Shapes:
    """The shapes of the ViT classifier whose timm-named `weights` these are; one line naming
    what is missing or odd otherwise."""
    if any(k.startswith(DECODER_PREFIXES) for k in weights):
        raise UserError(
            f"{source}: a pre-training checkpoint (it has a decoder), not a classifier: "
            f"fine-tune it (dmae finetune RECIPE --init {source})"
        )
    needed = ("patch_embed.proj.weight", "head.weight", "pos_embed")
    absent = [k for k in needed if k not in weights]
    if absent:
        raise UserError(
            f"{source}: not a ViT classifier in timm's layout (no {', '.join(absent)}); "
            f"import takes a fine-tuned DMAE/MAE checkpoint or a timm VisionTransformer's"
        )
    proj, head, pos = (weights[k] for k in needed)
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3] or head.dim() != 2 or pos.dim() != 3:
        raise UserError(
            f"{source}: patch_embed.proj.weight {tuple(proj.shape)}, head.weight "
            f"{tuple(head.shape)}, pos_embed {tuple(pos.shape)}: not the shapes of a ViT with "
            f"square patches"
        )
    prefix = prefix_in(dict(weights), pos.shape[1])
    if prefix is None:
        raise UserError(f"{source}: its pos_embed {tuple(pos.shape)} is no square patch grid")
    side = int((pos.shape[1] - prefix.rows) ** 0.5)
    options: dict[str, Any] = {}
    if not prefix.cls:
        options["class_token"] = False
    if prefix.registers:
        options["reg_tokens"] = prefix.registers
    if not prefix.embedded and prefix.tokens:
        options["no_embed_class"] = True
    return Shapes(
        width=int(proj.shape[0]),
        depth=len({int(m.group(1)) for k in weights if (m := _BLOCK.match(k))}),
        patch_size=int(proj.shape[2]),
        channels=int(proj.shape[1]),
        num_classes=int(head.shape[0]),
        image_size=side * int(proj.shape[2]),
        global_pool="avg" if "fc_norm.weight" in weights else "token",
        prefix_options=options,
    )


def foreign_spec(shapes: Shapes, given: Foreign, source: str) -> ModelSpec:
    """The self-description of the imported classifier, every field checked as a checkpoint's."""
    if given.num_classes is not None and given.num_classes != shapes.num_classes:
        raise UserError(
            f"{source}: its head has {shapes.num_classes} classes, not {given.num_classes} "
            f"(--num-classes)"
        )
    names = list(given.class_names)
    if names and len(names) != shapes.num_classes:
        raise UserError(
            f"{len(names)} class names for a head of {shapes.num_classes} classes (--class-names)"
        )
    image_size = given.image_size or shapes.image_size
    options = {"embed_dim": shapes.width, "depth": shapes.depth}
    options.update(shapes.prefix_options)
    options.update(given.options)
    meta = {
        "dmae_version": __version__,
        "stage": "finetune",
        "backbone": given.backbone,
        "backbone_options": options,
        "image_size": image_size,
        "patch_size": shapes.patch_size,
        "input_size": given.input_size or image_size,
        "channels": shapes.channels,
        "mean": list(given.mean),
        "std": list(given.std),
        "num_classes": shapes.num_classes,
        "class_names": names,
        "dataset": given.dataset,
        "sigma": given.sigma,
        "global_pool": shapes.global_pool,
        "init": f"imported from {source}",
    }
    try:
        return ModelSpec.from_dict(
            {k: v for k, v in meta.items() if v is not None},
            source,
            require=CLASSIFIER_FIELDS,
            what="imported classifier",
        )
    except UserError as exc:  # say it of the option the value came from
        marker = f"{source}: checkpoint field meta."
        name, _, rest = str(exc).removeprefix(marker).partition(":")
        if not str(exc).startswith(marker) or name not in FLAGS:
            raise
        raise UserError(f"{FLAGS[name]}:{rest} (importing {source})") from exc


def check_heads(spec: ModelSpec, shapes: Shapes, source: str) -> None:
    """The head count is in no tensor: a backbone of another default width would split the
    attention differently and load without a complaint. Unless the options name the heads,
    the backbone's own width must be the checkpoint's."""
    if "num_heads" in spec.backbone_options:
        return
    probe = build_backbone(
        spec.backbone, img_size=spec.patch_size, patch_size=spec.patch_size, in_chans=1, depth=1
    )
    width = int(getattr(probe, "embed_dim", 0))
    if width != shapes.width:
        raise UserError(
            f"{source}: the checkpoint's ViT is {shapes.width} wide, backbone "
            f"'{spec.backbone}' {width}: choose the backbone it was trained as (--backbone), "
            f"or give its heads (--option num_heads=N)"
        )


def load_foreign(source: str | Path, given: Foreign) -> tuple[Classifier, ModelSpec]:
    """The classifier in the file at `source` (an official DMAE/MAE fine-tuned checkpoint, a
    timm state dict or safetensors file), in eval mode, and its self-description."""
    path = str(source)
    state = checkpoint.load_checkpoint(source)
    if recorded(state.get("meta"), "stage") == "finetune":
        raise UserError(f"{path}: already a dmae classifier; certify it as it is")
    weights = unwrap(state, path)
    shapes = read_shapes(weights, path)
    spec = foreign_spec(shapes, given, path)
    check_heads(spec, shapes, path)
    model = build_classifier(spec)
    fitted = filter_state_dict({"model": weights}, model.vit, path).weights
    problems = checkpoint.state_mismatch(model.vit.state_dict(), fitted)
    if problems:
        raise UserError(
            f"{path}: the weights do not make a '{spec.backbone}' classifier ({problems})"
        )
    model.vit.load_state_dict(fitted)
    return model.eval(), spec


def import_classifier(source: str | Path, out: str | Path, given: Foreign) -> Path:
    """`load_foreign`, written to `out` as a dmae classifier checkpoint (atomically)."""
    if Path(out).resolve() == Path(source).resolve():
        raise UserError(f"--out {out} is the file being imported; give another path")
    model, spec = load_foreign(source, given)
    state = {"model": model.state_dict(), "meta": spec.to_dict()}
    return checkpoint.save_checkpoint(out, state)
