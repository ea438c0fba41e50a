"""The recipe's shape: typed, frozen config objects, their defaults, constraints and options.

Each field is declared once, here: its type, default, constraint (`dmae_cli.config.fields`)
and, for the fields a command takes as an option, that option's names and help (`flag`).
`dmae_cli.config.recipe` turns YAML into these objects; the commands build their options from
the flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmae_cli.config.fields import (
    MAX_TOKENS,
    all_non_negative,
    batch_size_setting,
    closed,
    device_name,
    flag,
    half_open,
    noise_level_or_levels,
    noise_levels,
    non_negative,
    number_or_word,
    open_interval,
    optional,
    parallel_setting,
    plain_name,
    positive,
    seed_range,
    side,
)

# A field that disagrees with another: (its key in the section, what it should be, its value).
Mismatch = tuple[str, str, Any]


def _divides(key: str, value: Any, whole: Any, whole_key: str) -> Mismatch | None:
    """`key` must divide `whole_key` (when both are positive integers; else other checks apply)."""
    if all(type(v) is int and v > 0 for v in (value, whole)) and whole % value:
        return key, f"a divisor of {whole_key} ({whole})", value
    return None


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # a name in the `dmae.datasets` registry
    root: str | None = None  # local path of the data; never downloaded
    image_size: int = field(default=16, metadata=side())  # native side: noise is added here
    options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset plugin
    num_workers: int = field(default=0, metadata=non_negative())
    pin_memory: bool = False
    persistent_workers: bool = False


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vit_tiny"  # a name in the `dmae.backbones` registry
    image_size: int = field(default=16, metadata=side())  # model input; resized if it differs
    patch_size: int = field(default=4, metadata=positive())
    options: dict[str, Any] = field(default_factory=dict)  # overrides for the backbone factory
    # The statistics the model normalises its inputs with: the data set's, those its init
    # checkpoint records (a dmae checkpoint), ImageNet's (the official DMAE/MAE weights) or
    # 0.5 (timm's augreg ViTs); a mismatch with the init checkpoint's is warned about.
    normalize: Literal["data", "checkpoint", "imagenet", "inception"] = "data"

    def mismatch(self) -> Mismatch | None:
        """Patches tile the input, in a grid a checkpoint's description allows; heads split the
        width (when the options give both)."""
        tiles = _divides("patch_size", self.patch_size, self.image_size, "model.image_size")
        if tiles is None and (self.image_size // self.patch_size) ** 2 > MAX_TOKENS:
            side = int(MAX_TOKENS**0.5)
            least = -(-self.image_size // side)
            grid = f"a grid of at most {side} x {side} on model.image_size {self.image_size}"
            return "patch_size", f"patches of {least} pixels or more ({grid})", self.patch_size
        return tiles or _divides(
            "options.num_heads",
            self.options.get("num_heads"),
            self.options.get("embed_dim"),
            "model.options.embed_dim",
        )


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings shared by pre-training and fine-tuning."""

    epochs: int = field(default=100, metadata=positive())
    batch_size: int = field(default=64, metadata=positive())  # per device
    accum_iter: int = field(default=1, metadata=positive())
    blr: float = field(default=1.5e-4, metadata=positive())  # lr = blr * effective batch / 256
    lr: float | None = field(default=None, metadata=optional(positive()))  # absolute, wins over blr
    min_lr: float = field(default=0.0, metadata=non_negative())
    warmup_epochs: float = field(default=40.0, metadata=non_negative())
    weight_decay: float = field(default=0.05, metadata=non_negative())
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = field(default=None, metadata=optional(positive()))
    save_every: int = field(default=20, metadata=positive())  # epochs between kept checkpoints


@dataclass(frozen=True)
class PretrainConfig(OptimConfig):
    # One noise level (the paper's 0.25) or a list of them, e.g. [0.25, 0.5, 1.0]: each image
    # then draws one level uniformly at random, so one DMAE learns to remove all of them and
    # serves as the denoiser of every certification sigma among them.
    sigma: float | tuple[float, ...] = field(default=0.25, metadata=noise_level_or_levels())
    mask_ratio: float = field(default=0.75, metadata=half_open(0.0, 1.0))
    norm_pix_loss: bool = True
    decoder_embed_dim: int = field(default=512, metadata=positive())
    decoder_depth: int = field(default=8, metadata=positive())
    decoder_num_heads: int = field(default=16, metadata=positive())
    init: str | None = None  # a DMAE/MAE checkpoint to continue from (e.g. CIFAR-10 after ImageNet)
    reconstructions: int = field(default=8, metadata=non_negative())  # rows in reconstructions.png

    @property
    def sigmas(self) -> tuple[float, ...]:
        """The noise levels, one or more: `sigma` as a tuple."""
        return self.sigma if isinstance(self.sigma, tuple) else (self.sigma,)

    def mismatch(self) -> Mismatch | None:
        return _divides(
            "decoder_num_heads",
            self.decoder_num_heads,
            self.decoder_embed_dim,
            "pretrain.decoder_embed_dim",
        )


@dataclass(frozen=True)
class ProbeConfig(OptimConfig):
    """Linear probing (`--linear-probe`, MAE's recipe): LARS on the head of a frozen encoder."""

    epochs: int = field(default=90, metadata=positive())
    batch_size: int = field(default=512, metadata=positive())
    blr: float = field(default=0.1, metadata=positive())
    min_lr: float = field(default=0.0, metadata=non_negative())
    warmup_epochs: float = field(default=10.0, metadata=non_negative())
    weight_decay: float = field(default=0.0, metadata=non_negative())
    momentum: float = field(default=0.9, metadata=half_open(0.0, 1.0))  # LARS momentum


@dataclass(frozen=True)
class FinetuneConfig(OptimConfig):
    sigma: tuple[float, ...] = field(
        default=(0.25,),
        metadata=noise_levels(clean=True)
        | flag(
            "Noise level to train a model for; repeatable. 0 trains a clean classifier (no "
            "noise), e.g. for a denoiser in front of it.",
            "--sigma",
        ),
    )
    blr: float = field(default=5e-4, metadata=positive())
    min_lr: float = field(default=1e-6, metadata=non_negative())
    warmup_epochs: float = field(default=5.0, metadata=non_negative())
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = field(default=0.65, metadata=closed(0.0, 1.0))
    drop_path: float = field(default=0.1, metadata=half_open(0.0, 1.0))
    consistency: bool = True  # Jeong & Shin 2020; off means plain Gaussian augmentation ("RS")
    num_noise: int = field(default=2, metadata=positive())  # m noisy copies per image
    lbd: float | None = field(default=None, metadata=optional(non_negative()))  # None: by sigma
    eta: float | None = field(default=None, metadata=optional(non_negative()))  # None: by sigma
    label_smoothing: float = field(default=0.0, metadata=half_open(0.0, 1.0))
    mixup: float = field(default=0.0, metadata=non_negative())
    cutmix: float = field(default=0.0, metadata=non_negative())
    auto_augment: str | None = None  # timm RandAugment string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = field(default=0.0, metadata=closed(0.0, 1.0))  # random erasing
    init: str | None = field(
        default=None,
        metadata=flag(
            "Start from this checkpoint (ours, official DMAE/MAE, timm or .safetensors) or "
            "pretraining run directory (its last.pth), or 'none' for random weights; default: "
            "the recipe's pretrain run, last.pth.",
            metavar="PATH|none",
        ),
    )
    linear_probe: bool = field(  # trains with `probe` instead of the settings above
        default=False,
        metadata=flag(
            "Train only a BatchNorm + linear head on the frozen encoder's cls token (LARS, "
            "finetune.probe settings), into runs/<name>/linprobe/.",
            "--linear-probe",
        ),
    )
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    denoiser_for: str | None = field(  # trains a denoiser instead of a classifier
        default=None,
        metadata=flag(
            "Tune a DMAE denoiser for this frozen classifier (a dmae or `dmae import`ed "
            "checkpoint) instead of fine-tuning a classifier, into runs/<name>/denoiser/.",
            metavar="CLASSIFIER",
        ),
    )
    eval_every: int = field(default=1, metadata=positive())  # epochs between evaluations
    eval_noise_copies: int = field(default=1, metadata=positive())  # noise draws per test image


@dataclass(frozen=True)
class DenoiserConfig(OptimConfig):
    """Tuning a DMAE denoiser for a frozen classifier (`dmae finetune --denoiser-for`).

    The denoiser starts pre-trained and the objective only refines it, so the defaults are
    those of a short, gentle fine-tuning rather than of pre-training.
    """

    epochs: int = field(default=20, metadata=positive())  # on digits 20 beat 10 (97.2 vs 96.0%)
    batch_size: int = field(default=64, metadata=positive())
    # lr 2.5e-4 at batch 64: on digits 4x lower gains less in 20 epochs, 4x higher loses accuracy
    blr: float = field(default=1e-3, metadata=positive())
    min_lr: float = field(default=1e-6, metadata=non_negative())
    warmup_epochs: float = field(default=1.0, metadata=non_negative())  # Adam's moments settle
    weight_decay: float = field(default=0.0, metadata=non_negative())  # stay near pre-training
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's defaults: no reason to differ here
    save_every: int = field(default=5, metadata=positive())
    eval_every: int = field(default=1, metadata=positive())  # epochs between evaluations
    eval_noise_copies: int = field(default=1, metadata=positive())  # noise draws per test image


@dataclass(frozen=True)
class CertifyConfig:
    sigma: tuple[float, ...] = field(
        default=(0.25,),
        metadata=noise_levels() | flag("Noise level(s): --sigma 0.25 0.5.", "--sigma"),
    )
    certifier: str = field(  # a name in the `dmae.certifiers` registry
        default="cohen", metadata=flag("Certifier plugin, e.g. cohen or sequential.")
    )
    options: dict[str, Any] = field(default_factory=dict)  # passed to the certifier factory
    checkpoint: str | None = field(
        default=None,
        metadata=flag(
            "Classifier to certify; default: runs/<name>/finetune/sigma-<s>/best.pth, else "
            "last.pth.",
            metavar="PATH",
        ),
    )
    denoiser: str | None = field(
        default=None,
        metadata=flag(
            "Certify the classifier behind this DMAE denoiser (a pretraining or tuned "
            "denoiser checkpoint): noise, then denoiser, then classifier.",
            metavar="PATH",
        ),
    )
    n0: int = field(default=100, metadata=positive() | flag("Selection samples per image."))
    n: int = field(
        default=100_000,
        metadata=positive() | flag("Estimation samples per image, the budget.", "--n", "-n"),
    )
    alpha: float = field(
        default=0.001,
        metadata=open_interval(0.0, 1.0) | flag("Failure probability of each certificate."),
    )
    # Noisy copies drawn and classified per batch: an integer >= 1, or auto (also 0): on CUDA
    # the largest power of two that fits in free memory, up to 4096; on CPU 256.
    batch_size: Any = field(
        default=1000,
        metadata=batch_size_setting()
        | flag(
            "Noisy copies per batch, or auto: the largest that fits on the GPU, 256 on a CPU.",
            metavar="N|auto",
            parse=number_or_word,
        ),
    )
    split: str = field(default="test", metadata=flag("Split to certify: test (= val) or train."))
    start: int = field(default=0, metadata=non_negative() | flag("First example index."))
    end: int | None = field(  # None: to the end of the split
        default=None, metadata=optional(positive()) | flag("Stop before this example index.")
    )
    interval: int = field(
        default=1,
        metadata=positive() | flag("Every k-th example; the paper takes every 50th."),
    )
    max_examples: int | None = field(
        default=None, metadata=optional(positive()) | flag("At most this many examples.")
    )
    skip_wrong: bool = field(
        default=False,
        metadata=flag(
            "Skip estimation once the selected class is wrong, as the official evaluation; "
            "certified accuracy is unchanged."
        ),
    )
    radii: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0),
        metadata=all_non_negative(),
    )
    compile: bool = field(
        default=False,
        metadata=flag(
            "torch.compile the classifier: faster batches after a compilation of minutes; "
            "needs a C++ compiler (CPU) or Triton (CUDA)."
        ),
    )
    # Examples certified side by side, their draws packed into shared forward passes (a
    # sequential certifier's small looks fill a batch together); rows are written per group.
    together: int = field(default=8, metadata=positive())
    # Forward passes run at once, on a CPU only, each on one core: auto is one per core torch
    # uses there (a small model runs 1.4-1.9x faster so than as one pass spread over every
    # core), 1 on CUDA and with compile.
    parallel: Any = field(default="auto", metadata=parallel_setting())


@dataclass(frozen=True)
class LoggingConfig:
    # Training curves also in <stage dir>/tensorboard/ (`pip install dmae[tensorboard]`);
    # metrics.jsonl stays the record `dmae report` and resuming read.
    tensorboard: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str = field(default="run", metadata=plain_name())  # outputs in runs_dir/<name>/
    seed: int = field(
        default=0,
        metadata=seed_range() | flag("Random seed; certify draws its noise from it."),
    )
    # auto: CUDA when present, else CPU; a device the machine lacks stops the stage at its start
    device: str = field(default="auto", metadata=device_name())
    # auto: bf16 autocast on CUDA; on a CPU fp32 for training, and for certification bf16 when the
    # CPU has native bf16 (AVX512-BF16 or AMX), else fp32 (see dmae_cli/runtime/precision.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)  # --denoiser-for
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.runs_dir) / self.name / stage


def sigma_name(sigma: float) -> str:
    """The directory/file stem for one noise level: 0.25 -> 'sigma-0.25', 1 -> 'sigma-1.0'."""
    return f"sigma-{float(sigma)!r}"
