"""`dmae finetune`: the noise-robust base classifiers, one per sigma."""

from __future__ import annotations

from typing import Any

from dmae_cli.cli.base import OutOpt, RecipeArg, SetOpt, app, user_errors
from dmae_cli.cli.options import recipe_options
from dmae_cli.config.recipe import load_recipe
from dmae_cli.runtime import ui


@app.command()
@user_errors
@recipe_options("finetune")
def finetune(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    typed: dict[str, Any] | None = None,  # --sigma, --init, --linear-probe: see FinetuneConfig
    out: OutOpt = None,
) -> None:
    """Fine-tune the noise-robust base classifier, one model per sigma.

    Gaussian noise in pixel space plus consistency regularisation; evaluates clean and noisy
    test accuracy every finetune.eval_every epochs. Each sigma writes
    runs/<name>/finetune/sigma-<s>/ (config.yaml, metrics.jsonl, last.pth, best.pth by noisy
    accuracy; with --out DIR, DIR/sigma-<s>/) and resumes automatically when run again.

    Examples:

      dmae finetune recipes/digits.yaml

      dmae finetune recipes/vitb.yaml --sigma 0.5 --init /ckpt/dmae-base.pth

      dmae finetune recipes/vitb.yaml --linear-probe

      dmae finetune recipes/digits.yaml --init none --set finetune.consistency=false
    """
    from dmae_cli.training.finetune import run_finetune

    cfg = load_recipe(recipe, overrides or [], typed)
    for run in run_finetune(cfg, out=out):
        best = run.best
        if best:
            ui.info(
                f"sigma {run.sigma}: best noisy accuracy {best['acc_noisy']:.1%} "
                f"(clean {best['acc_clean']:.1%}, epoch {best['epoch'] + 1}) -> "
                f"{run.run_dir}/best.pth"
            )
        else:
            ui.info(f"sigma {run.sigma}: outputs in {run.run_dir}/")
