"""Certify a classifier you already have: the four ways, side by side, on digits.

Runs the user's commands (`python -m dmae_cli ...`, as `dmae ...`), in this order, into one runs
directory, and prints a markdown table of certified accuracy on the same test images:

1. `dmae pretrain`: the DMAE of the recipe (noise sigma 0.25, `norm_pix_loss: false`);
2. `dmae finetune --sigma S`: the paper's way, a classifier fine-tuned with noise at S;
3. `dmae finetune --sigma 0`: a clean classifier, trained without noise (the one "you have");
4. `dmae finetune --denoiser-for CLEAN --sigma S`: the DMAE tuned for that frozen classifier;
5. `dmae certify` at S four times, each into its own directory under <out>/ways/:
   `clean` (the clean classifier alone: not a smoothing model), `clean+denoiser` (behind the
   pretraining checkpoint as a denoiser), `clean+tuned` (behind the tuned denoiser) and
   `noise-trained` (the classifier of step 2);
6. `dmae report` of the four directories (markdown), then the table below it.

Every stage resumes, so a second run with the same --out only certifies what is missing.
`--check` exits 1 unless the clean classifier + denoiser is at least 30 points above the clean
classifier alone at r = 0.25 and the tuned denoiser at least as good as the untuned one.

    python benchmarks/denoised_smoothing.py --out /tmp/denoised            # about 25 min, 2 cores
    python benchmarks/denoised_smoothing.py --out /tmp/d --n 200 --max-examples 60 --check
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dmae_cli.config.recipe import load_recipe, sigma_name

ROOT = Path(__file__).resolve().parents[1]
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
WAYS = {
    "clean": "clean classifier alone (not a smoothing model)",
    "clean+denoiser": "clean classifier + DMAE denoiser",
    "clean+tuned": "clean classifier + tuned DMAE denoiser",
    "noise-trained": "classifier fine-tuned with noise (the paper's way)",
}
GAIN = 0.30  # the denoiser's least gain over the clean classifier alone at r = 0.25


@dataclass
class Stage:
    name: str
    wall_s: float
    cpu_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/digits.yaml")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dmae-denoised"))
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n", type=int, default=1000, help="certification samples per image")
    parser.add_argument("--max-examples", type=int, help="default: the whole test split")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets hold")
    return parser.parse_args(argv)


def dmae(args: argparse.Namespace, stages: list[Stage], name: str, *command: str) -> None:
    """One dmae command, with the run's overrides; its wall and CPU time go to `stages`."""
    sets = [f"runs_dir={args.out}", *args.sets]
    full = [sys.executable, "-m", "dmae_cli", *command, *(x for s in sets for x in ("--set", s))]
    say(f"{name}: dmae {' '.join(command)}")
    before, tick = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(full, cwd=ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    stages.append(Stage(name, time.perf_counter() - tick, cpu))
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def run(args: argparse.Namespace) -> list[Stage]:
    """Every stage; the run files end in <out>/ways/<way>/."""
    recipe, s, stages = args.recipe, f"{args.sigma:g}", []
    cfg = load_recipe(recipe, [f"runs_dir={args.out}", *args.sets])  # where each stage writes
    clean = cfg.stage_dir("finetune") / sigma_name(0.0) / "best.pth"
    noisy = cfg.stage_dir("finetune") / sigma_name(args.sigma) / "best.pth"
    denoisers = {
        "clean+denoiser": cfg.stage_dir("pretrain") / "last.pth",
        "clean+tuned": cfg.stage_dir("denoiser") / sigma_name(args.sigma) / "best.pth",
    }
    dmae(args, stages, "pretrain", "pretrain", recipe)
    dmae(args, stages, "finetune with noise", "finetune", recipe, "--sigma", s)
    dmae(args, stages, "finetune clean", "finetune", recipe, "--sigma", "0")
    tune = ["finetune", recipe, "--denoiser-for", str(clean), "--sigma", s]
    dmae(args, stages, "tune denoiser", *tune)
    common = ["certify", recipe, "--sigma", s, "--n", str(args.n)]
    if args.max_examples:
        common += ["--max-examples", str(args.max_examples)]
    for way in WAYS:
        model = noisy if way == "noise-trained" else clean
        extra = ["--denoiser", str(denoisers[way])] if way in denoisers else []
        out = ["--out", str(args.out / "ways" / way)]
        dmae(args, stages, f"certify {way}", *common, "--checkpoint", str(model), *extra, *out)
    return stages


def certified(tsv: Path) -> dict[float, float]:
    """Certified accuracy at each of RADII from a run file's Cohen columns."""
    with tsv.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    hits = {
        r: sum(1 for row in rows if row["correct"] == "1" and float(row["radius"]) >= r)
        for r in RADII
    }
    return {r: hits[r] / len(rows) for r in RADII} | {-1.0: len(rows)}


def table(args: argparse.Namespace) -> tuple[str, dict[str, dict[float, float]]]:
    results = {
        way: certified(args.out / "ways" / way / f"sigma-{args.sigma!r}.tsv") for way in WAYS
    }
    lines = [
        "| way | images | " + " | ".join(f"r = {r:g}" for r in RADII) + " |",
        "|---|---|" + "---|" * len(RADII),
    ]
    for way, label in WAYS.items():
        cells = " | ".join(f"{100 * results[way][r]:.1f}" for r in RADII)
        lines.append(f"| {label} | {results[way][-1.0]:.0f} | {cells} |")
    return "\n".join(lines), results


def verdict(results: dict[str, dict[float, float]]) -> list[tuple[str, bool]]:
    gain = results["clean+denoiser"][0.25] - results["clean"][0.25]
    tuned = results["clean+tuned"][0.25] - results["clean+denoiser"][0.25]
    return [
        (f"denoiser over clean alone at r = 0.25: {100 * gain:+.1f} points (>= +30)", gain >= GAIN),
        (f"tuned over untuned denoiser at r = 0.25: {100 * tuned:+.1f} points (>= 0)", tuned >= 0),
    ]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    stages = run(args)
    ways = [str(args.out / "ways" / way) for way in WAYS]
    report = subprocess.run(
        [sys.executable, "-m", "dmae_cli", "report", *ways, "--format", "markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    text, results = table(args)
    cfg = load_recipe(args.recipe, [f"runs_dir={args.out}", *args.sets]).certify
    print(
        f"`{' '.join(sys.argv)}`: sigma {args.sigma:g}, {cfg.certifier}, n0 = {cfg.n0}, "
        f"n = {args.n}, alpha {cfg.alpha:g}\n"
    )
    print(text + "\n")
    for line, ok in verdict(results):
        print(f"- {line}: {'met' if ok else 'NOT met'}")
    print("\n| stage | wall s | CPU s |\n|---|---|---|")
    for stage in stages:
        print(f"| {stage.name} | {stage.wall_s:.0f} | {stage.cpu_s:.0f} |")
    print("\n`dmae report` of the four directories:\n\n" + report.stdout.strip())
    if report.returncode != 0:
        print(report.stderr, file=sys.stderr)
        return 1
    return 1 if args.check and not all(ok for _, ok in verdict(results)) else 0


if __name__ == "__main__":
    sys.exit(main())
