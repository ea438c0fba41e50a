"""DMAE initialisation against random initialisation, with fair baselines.

Fine-tunes one recipe at one sigma from the DMAE encoder and from random weights, everything
else equal, and prints a markdown table on stdout (progress goes to stderr):

- DMAE init: the recipe as it is (its learning rate and layer-wise lr decay).
- random init, recipe: the same recipe from random weights. Unfair to random weights: layer
  decay < 1 shrinks the lr of the lower blocks, which is meant for a pre-trained encoder.
- random init, layer decay 1.0, at each base lr of `--blr` (the sweep), same epochs.
- random init at equal compute: the best lr of the sweep, trained for the fine-tuning epochs
  plus as many more as the pre-training cost. That cost is counted in floating-point operations
  (torch's FlopCounterMode on one training step of each model, plus fine-tuning's evaluations),
  which a loaded machine cannot skew; the CPU seconds of both are printed as a cross-check.

Each model is then certified (Cohen, `--certify-n` samples, the recipe's test split), so the
table also says what the initialisation is worth in certified accuracy.

    python benchmarks/finetune_init.py                      # digits, sigma 0.5, about 20 min
    python benchmarks/finetune_init.py --out /tmp/init-runs --blr 4e-3 1.6e-2 --certify-n 0
    nice -n 10 python benchmarks/finetune_init.py --jobs 6       # the sweep side by side
    python benchmarks/finetune_init.py --init runs/digits/pretrain/last.pth --pretrain-flops 1.1e14
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmae_cli.config.recipe import Recipe, load_recipe
from dmae_cli.data.loading import load_dataset
from dmae_cli.models.classifier import build_classifier
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.training.finetune import classifier_spec, run_finetune
from dmae_cli.training.objective import build_objective
from dmae_cli.training.pretrain import build_dmae, dmae_loss, run_pretrain

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Row:
    name: str
    epochs: int
    blr: float
    layer_decay: float
    noisy_best: float
    clean_best: float
    cpu_s: float
    checkpoint: Path
    certified: dict[float, float] = field(default_factory=dict)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def recipe_for(args: argparse.Namespace, extra: list[str]) -> Recipe:
    return load_recipe(args.recipe, [*args.set, f"finetune.sigma=[{args.sigma}]", *extra])


def step_flops(model: torch.nn.Module, loss_fn: Any, batch: Any) -> float:
    """Floating-point operations of one forward and backward pass on `batch`."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    return float(counter.get_total_flops())


def pretrain_flops(recipe: Recipe) -> float:
    """The pre-training run's operations: one step's, times the steps of every epoch."""
    train_set = load_dataset(recipe, "train", augment=False)
    p = recipe.pretrain
    images = torch.stack([train_set[i][0] for i in range(p.batch_size)])
    model = build_dmae(recipe, train_set.info)

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return dmae_loss(m, b, sigma=p.sigma, mask_ratio=p.mask_ratio)

    per_image = step_flops(model, loss, (images, None)) / p.batch_size
    return per_image * len(train_set) * p.epochs


def finetune_epoch_flops(recipe: Recipe, sigma: float) -> float:
    """One fine-tuning epoch's operations, with its share of the periodic evaluations."""
    train_set = load_dataset(recipe, "train", augment=False)
    test_set = load_dataset(recipe, "test", augment=False)
    cfg = recipe.finetune
    batch = [train_set[i] for i in range(cfg.batch_size)]
    images, labels = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
    model = build_classifier(classifier_spec(recipe, train_set.info, test_set.info, sigma))
    objective = build_objective(cfg, sigma, train_set.info.num_classes)
    train = step_flops(model, objective, (images, labels)) / cfg.batch_size * len(train_set)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    per_eval = counter.get_total_flops() * len(test_set) * (1 + cfg.eval_noise_copies)
    return train + per_eval / cfg.eval_every


def finetune(args: argparse.Namespace, name: str, extra: list[str], out: Path) -> Row:
    recipe = recipe_for(args, extra)
    say(f"== {name}: {' '.join(extra)}")
    cpu = time.process_time()
    (run,) = run_finetune(recipe, out=out)
    cfg = recipe.finetune
    return Row(
        name,
        cfg.epochs,
        cfg.blr,
        cfg.layer_decay,
        run.best["acc_noisy"],
        run.best["acc_clean"],
        time.process_time() - cpu,
        run.run_dir / "best.pth",
    )


def certify(args: argparse.Namespace, row: Row, out: Path) -> dict[float, float]:
    """Certified accuracy of `row`'s model at each radius of `RADII`."""
    overrides = [
        f"certify.checkpoint={json.dumps(str(row.checkpoint))}",
        f"certify.sigma=[{args.sigma}]",
        f"certify.n={args.certify_n}",
        "certify.certifier=cohen",
    ]
    say(f"== certify {row.name}")
    (result,) = run_certify(load_recipe(args.recipe, [*args.set, *overrides]), out=out)
    return {r: result.accuracy(r) for r in RADII}


def pretrained(args: argparse.Namespace, base: Path) -> tuple[str, float, float | None]:
    """The encoder to start from, the pre-training's operations and its CPU seconds."""
    recipe = load_recipe(args.recipe, args.set)
    flops = args.pretrain_flops or pretrain_flops(recipe)
    if args.init:
        return args.init, flops, None
    say("== pretrain")
    cpu = time.process_time()
    result = run_pretrain(recipe, out=base / "pretrain")
    return str(result.run_dir / "last.pth"), flops, time.process_time() - cpu


def one_thread() -> None:
    torch.set_num_threads(1)


def run(args: argparse.Namespace, base: Path) -> None:
    """Fine-tune, then certify, every row; `--jobs` of them at once, each on one thread."""
    init, flops, pretrain_cpu = pretrained(args, base)
    epochs = recipe_for(args, []).finetune.epochs
    epoch_flops = finetune_epoch_flops(recipe_for(args, []), args.sigma)
    extra_epochs = round(flops / epoch_flops)
    flat = ["finetune.init=none", "finetune.layer_decay=1.0"]
    jobs = [("DMAE init", [f"finetune.init={json.dumps(init)}"], base / "dmae")]
    if not args.skip_recipe_row:
        jobs.append(("random init, recipe", ["finetune.init=none"], base / "random"))
    sweep = [
        ("random init, ld 1.0", [*flat, f"finetune.blr={b}"], base / f"blr-{b}") for b in args.blr
    ]
    totals = {"random init, equal FLOPs": epochs + extra_epochs}
    totals |= {f"random init, {e} epochs": e for e in args.also_epochs}

    def long_jobs(blrs: list[float]) -> list[tuple[str, list[str], Path]]:
        return [
            (name, [*flat, f"finetune.blr={b}", f"finetune.epochs={e}"], base / f"ep{e}-blr{b}")
            for b in blrs
            for name, e in totals.items()
        ]

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=one_thread) as pool:

        def train(work: list[tuple[str, list[str], Path]]) -> list[Row]:
            return list(pool.map(finetune, *zip(*[(args, *job) for job in work], strict=True)))

        first = long_jobs(args.long_blr) if args.long_blr else []  # longest first
        rows = train([*first, *jobs, *sweep])
        rows = rows[len(first) :] + rows[: len(first)]
        best = max(rows[len(jobs) : len(jobs) + len(sweep)], key=lambda r: r.noisy_best)
        if not args.long_blr:
            rows += train(long_jobs([best.blr]))
        if args.certify_n:
            chosen = [r for r in rows if r.epochs != epochs or r is best or r is rows[0]]
            chosen += [r for r in rows if r.name == "random init, recipe"]
            outs = [base / "certify" / r.checkpoint.parent.parent.name for r in chosen]
            certified = pool.map(certify, [args] * len(chosen), chosen, outs)
            for row, accuracy in zip(chosen, certified, strict=True):
                row.certified = accuracy
    cost = {"pretrain_flops": flops, "finetune_epoch_flops": epoch_flops}
    print_table(args, rows, cost, extra_epochs, pretrain_cpu)


def print_table(
    args: argparse.Namespace,
    rows: list[Row],
    cost: dict[str, float],
    extra_epochs: int,
    pretrain_cpu: float | None,
) -> None:
    per_epoch_cpu = rows[0].cpu_s / rows[0].epochs
    print(f"\n{args.recipe}, sigma {args.sigma}\n")
    if cost["pretrain_flops"] > 0:
        print(
            f"pre-training: {cost['pretrain_flops']:.3g} FLOPs = {extra_epochs} fine-tuning "
            f"epochs of {cost['finetune_epoch_flops']:.3g} FLOPs"
            + (
                f" (CPU time: {pretrain_cpu:.0f} s = {pretrain_cpu / per_epoch_cpu:.0f} epochs "
                f"of {per_epoch_cpu:.1f} s)"
                if pretrain_cpu is not None
                else ""
            )
            + "\n"
        )
    radii = [r for r in RADII if any(row.certified for row in rows)]
    head = " | ".join(f"cert. r={r:g}" for r in radii)
    print(
        f"| start | epochs | blr | layer decay | noisy acc (best) | clean acc | CPU s |"
        f"{' ' + head + ' |' if radii else ''}"
    )
    print("|---" * (7 + len(radii)) + "|")
    for r in rows:
        cells = "".join(f" {r.certified[x]:.1%} |" if r.certified else " |" for x in radii)
        print(
            f"| {r.name} | {r.epochs} | {r.blr:g} | {r.layer_decay:g} | {r.noisy_best:.1%} "
            f"| {r.clean_best:.1%} | {'-' if math.isnan(r.cpu_s) else f'{r.cpu_s:.0f}'} |"
            f"{cells if radii else ''}"
        )


def collect(args: argparse.Namespace, base: Path) -> None:
    """The table of a run directory `--out` left (one stopped before its end, say): each
    finished fine-tuning from its best.pth and config.yaml, certified accuracy from
    certify/<run>/ when there, e.g. written by `dmae certify` with the settings of `certify`."""
    from dmae_cli.runtime.checkpoint import load_checkpoint
    from dmae_cli.smoothing.runfile import Row as RunRow
    from dmae_cli.smoothing.runfile import read_lines, tsv_path

    names = {"dmae": "DMAE init", "random": "random init, recipe", "blr": "random init, ld 1.0"}
    rows = []
    for run in base.glob("*/sigma-*/best.pth"):
        recipe = load_recipe(run.parent / "config.yaml")
        cfg, metrics = recipe.finetune, load_checkpoint(run)["metrics"]
        name = names.get(run.parent.parent.name.split("-")[0], "random init, ld 1.0, longer")
        history = (run.parent / "metrics.jsonl").read_text().splitlines()
        trained = json.loads(history[-1])["epoch"] + 1 if history else 0
        if trained < cfg.epochs:  # stopped early: its best so far, marked as such
            name += f" (stopped after {trained} epochs)"
        row = Row(name, cfg.epochs, cfg.blr, cfg.layer_decay, metrics["acc_noisy"],
                  metrics["acc_clean"], float("nan"), run)  # fmt: skip
        tsv = tsv_path(base / "certify" / run.parent.parent.name, args.sigma)
        done = [RunRow.parse(line) for line in read_lines(tsv).values()]
        if done:
            row.name += f" [{len(done)} images certified]"
            row.certified = {
                r: sum(x.correct and x.radius >= r for x in done) / len(done) for r in RADII
            }
        rows.append(row)
    rows.sort(key=lambda r: (r.name != "DMAE init", r.epochs, r.name, r.blr))
    print_table(args, rows, {"pretrain_flops": 0.0, "finetune_epoch_flops": 1.0}, 0, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/digits.yaml")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--init", help="a pretrained checkpoint (default: pre-train one here)")
    parser.add_argument(
        "--pretrain-flops", type=float, help="the pre-training's cost (default: counted)"
    )
    parser.add_argument("--blr", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    parser.add_argument("--certify-n", type=int, default=1000, help="0: no certification")
    parser.add_argument("--set", action="append", default=[], help="recipe override, repeatable")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument(
        "--also-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also train the best random init for this many epochs in all (e.g. equal wall time)",
    )
    parser.add_argument(
        "--long-blr",
        type=float,
        nargs="*",
        default=[],
        help="run the long rows at these lrs, beside the sweep (default: after it, at its best)",
    )
    parser.add_argument(
        "--skip-recipe-row", action="store_true", help="no random init with the recipe's lr"
    )
    parser.add_argument("--collect", type=Path, help="only print the table of this --out dir")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunings at once, one thread each")
    args = parser.parse_args()
    if not math.isfinite(args.sigma) or args.sigma <= 0:
        parser.error("--sigma must be positive")
    if args.collect:
        collect(args, args.collect)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.out or Path(tmp))


if __name__ == "__main__":
    main()
