"""`dmae finetune`: the noise-robust base classifiers, one per sigma."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmae_cli.cli.base import OutOpt, RecipeArg, SetOpt, app, user_errors
from dmae_cli.cli.options import recipe_options
from dmae_cli.config.recipe import Recipe, load_recipe
from dmae_cli.runtime import ui

CLEAN = "clean classifier (trained without noise: not a smoothing model)"


@app.command()
@user_errors
@recipe_options("finetune")
def finetune(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    typed: dict[str, Any] | None = None,  # --sigma, --init, ...: see FinetuneConfig
    out: OutOpt = None,
) -> None:
    """Fine-tune the noise-robust base classifier, one model per sigma.

    Gaussian noise in pixel space plus consistency regularisation; evaluates
    clean and noisy test accuracy every finetune.eval_every epochs. Each sigma
    writes runs/<name>/finetune/sigma-<s>/ (config.yaml, metrics.jsonl,
    last.pth, best.pth by noisy accuracy; with --out DIR, DIR/sigma-<s>/) and
    resumes automatically when run again.

    --sigma 0 trains a clean classifier, without noise, to certify behind a
    denoiser. --denoiser-for CLASSIFIER tunes instead the DMAE of --init
    (default the recipe's pretrain run) as a denoiser for that frozen
    classifier, one per sigma, with the recipe's denoiser: settings, into
    runs/<name>/denoiser/sigma-<s>/ (best.pth by the noisy accuracy of the
    classifier behind it).

    Examples:

      dmae finetune recipes/digits.yaml

      dmae finetune recipes/vitb.yaml --sigma 0.5 --init /ckpt/dmae-base.pth

      dmae finetune recipes/vitb.yaml --linear-probe

      dmae finetune recipes/digits.yaml --init none --set finetune.consistency=false

      dmae finetune recipes/digits.yaml --sigma 0

      dmae finetune recipes/digits.yaml --sigma 0.25 --denoiser-for clean.pth
    """
    from dmae_cli.training.finetune import run_finetune

    cfg = load_recipe(recipe, overrides or [], typed)
    if cfg.finetune.denoiser_for is not None:
        _tune_denoisers(cfg, out)
        return
    for run in run_finetune(cfg, out=out):
        best = run.best
        name = f"sigma {run.sigma}" + (f": {CLEAN}" if run.sigma == 0 else "")
        if best and run.sigma == 0:
            ui.info(
                f"{name}: best accuracy {best['acc_clean']:.1%} (epoch {best['epoch'] + 1}) "
                f"-> {run.run_dir}/best.pth"
            )
        elif best:
            ui.info(
                f"{name}: best noisy accuracy {best['acc_noisy']:.1%} "
                f"(clean {best['acc_clean']:.1%}, epoch {best['epoch'] + 1}) -> "
                f"{run.run_dir}/best.pth"
            )
        else:
            ui.info(f"{name}: outputs in {run.run_dir}/")


def _tune_denoisers(cfg: Recipe, out: Path | None) -> None:
    """`--denoiser-for`: one tuned denoiser per sigma, and where each went."""
    from dmae_cli.training.denoiser import run_denoiser

    for run in run_denoiser(cfg, out=out):
        best, target = run.best, f"denoiser for {cfg.finetune.denoiser_for}"
        if best:
            ui.info(
                f"sigma {run.sigma}: {target}: best noisy accuracy of classifier(denoiser) "
                f"{best['acc_noisy']:.1%} (clean {best['acc_clean']:.1%}, epoch "
                f"{best['epoch'] + 1}) -> {run.run_dir}/best.pth"
            )
        else:
            ui.info(f"sigma {run.sigma}: {target}: outputs in {run.run_dir}/")
