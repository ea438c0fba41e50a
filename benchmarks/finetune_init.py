"""DMAE initialisation against random initialisation, at the same fine-tuning budget.

Fine-tunes one recipe at one sigma twice, everything equal but the starting weights: from the
recipe's pretraining run (or `--init PATH`) and from random weights (`--init none`). Prints the
noisy test accuracy (best epoch and last epoch), the clean accuracy and the time of each, as a
markdown table on stdout. Progress goes to stderr.

    dmae pretrain recipes/digits.yaml
    python benchmarks/finetune_init.py                      # digits, sigma 0.5
    python benchmarks/finetune_init.py --sigma 0.25 --set finetune.epochs=20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dmae_cli.config.recipe import load_recipe
from dmae_cli.training.finetune import run_finetune


def finetune_once(args: argparse.Namespace, init: str | None, out: Path) -> dict[str, float]:
    overrides = [*args.set, f"finetune.sigma=[{args.sigma}]"]
    if init is not None:
        overrides.append(f"finetune.init={json.dumps(init)}")
    recipe = load_recipe(args.recipe, overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    (run,) = run_finetune(recipe, out=out)
    return {
        "noisy_best": run.best["acc_noisy"],
        "noisy_last": run.history[-1]["acc_noisy"],
        "clean_best": run.best["acc_clean"],
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/digits.yaml")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--init", help="pretrained checkpoint (default: the recipe's pretrain run)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, repeatable")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        rows = {
            "DMAE init": finetune_once(args, args.init, base / "dmae"),
            "random init": finetune_once(args, "none", base / "random"),
        }
    print(f"\n{args.recipe}, sigma {args.sigma}, same fine-tuning budget\n")
    print("| start | noisy acc (best) | noisy acc (last) | clean acc (best) | wall s | cpu s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['noisy_best']:.1%} | {r['noisy_last']:.1%} | {r['clean_best']:.1%} "
            f"| {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
