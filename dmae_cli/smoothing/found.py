"""Which recipe and which models a certification runs on, named by the user or found.

`dmae certify recipes/x.yaml` certifies runs/x/finetune/sigma-<s>/best.pth (else last.pth);
`dmae certify` without a recipe finds the latest fine-tuned model under ./runs and certifies
with the config.yaml saved next to it. A checkpoint read on the way (a bare one, for the data
set its meta names) is handed on in `Found.loaded`, so that the certification does not read
it again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmae_cli.config.recipe import Recipe, load_recipe, sigma_name
from dmae_cli.models.spec import recorded
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError

MODEL_FILES = ("best.pth", "last.pth")
# A `pipe:` command or a URL (webdataset opens `http://...` through a shell command too).
COMMAND_OR_URL = re.compile(r"pipe:|://", re.IGNORECASE)


@dataclass(frozen=True)
class Found:
    """The recipe to certify with, and the checkpoints read to find it, by resolved path."""

    recipe: Recipe
    loaded: dict[Path, dict[str, Any]] = field(default_factory=dict)


def model_path(recipe: Recipe, sigma: float) -> Path:
    """`certify.checkpoint`, else the run's fine-tuned model for `sigma` (best, else last)."""
    if recipe.certify.checkpoint:
        return Path(recipe.certify.checkpoint)
    run = recipe.stage_dir("finetune") / sigma_name(sigma)
    for name in MODEL_FILES:
        if (run / name).is_file():
            return run / name
    raise UserError(
        f"no fine-tuned model for sigma {sigma}: {run / MODEL_FILES[0]} not found; run "
        f"'dmae finetune' for this recipe and sigma first, or pass --checkpoint"
    )


def latest_model(runs_dir: Path, sigma: float) -> Path:
    """The most recently written fine-tuned model for `sigma` under `runs_dir` (any run)."""
    found = []
    for run in runs_dir.glob(f"*/finetune/{sigma_name(sigma)}"):
        files = [run / name for name in MODEL_FILES if (run / name).is_file()]
        if files:
            found.append(files[0])
    if not found:
        raise UserError(
            f"no fine-tuned model for sigma {sigma} under {runs_dir}/*/finetune/; give a "
            f"recipe (dmae certify recipes/digits.yaml --sigma {sigma}) or --checkpoint"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def resolve_recipe(
    path: Path | None, overrides: Sequence[str], typed: Mapping[str, Any] | None = None
) -> Found:
    """The recipe `dmae certify` runs: the file given, or else that of the model it certifies.

    `overrides` are the `--set` items, `typed` the command's options ({key path: value}),
    applied last. Without a file, the model is `certify.checkpoint` or the latest fine-tuned
    one for the first sigma under runs_dir, and the recipe is the `config.yaml` saved next to
    it (its run directory pinned to where the model was found); a bare checkpoint gets the
    defaults with the data set its meta names, and is handed on, read once.
    """
    if path is not None:
        return Found(load_recipe(path, overrides, typed))
    base = load_recipe(None, overrides, typed)  # the defaults: reads no file
    explicit = base.certify.checkpoint
    model = Path(explicit) if explicit else latest_model(Path(base.runs_dir), base.certify.sigma[0])
    # A found model lies at runs/<name>/finetune/sigma-<s>/: point the recipe there, so that
    # every sigma's model and the output directory come from the same run. A model named with
    # --checkpoint may lie anywhere (`./clf.pth` has no such parents): nothing is pinned.
    pinned = (
        []
        if explicit
        else [
            f"runs_dir={json.dumps(str(model.parents[3]))}",
            f"name={json.dumps(model.parents[2].name)}",
        ]
    )
    config = model.parent / "config.yaml"
    if config.is_file():
        recipe = load_recipe(config, [*pinned, *overrides], typed)
        refuse_untyped_sources(recipe, overrides, config)
        return Found(recipe)
    state = checkpoint.load_checkpoint(model)
    meta = state.get("meta")
    data = {
        "data.dataset": recorded(meta, "dataset"),
        "data.image_size": recorded(meta, "input_size"),
    }
    items = [f"{key}={json.dumps(value)}" for key, value in data.items() if value is not None]
    recipe = load_recipe(None, [*items, *pinned, *overrides], typed)
    return Found(recipe, {model.resolve(): state})


def refuse_untyped_sources(recipe: Recipe, overrides: Sequence[str], found: Path) -> None:
    """A config.yaml found beside a checkpoint is a data file, perhaps a stranger's: it may
    not make dmae run a command or open a URL. The user may, by typing the key in --set."""
    typed = [item.split("=", 1)[0].strip() for item in overrides]
    sources = {"data.root": recipe.data.root}
    sources.update({f"data.options.{k}": v for k, v in recipe.data.options.items()})
    for key, value in sources.items():
        texts = value if isinstance(value, list) else [value]
        if not any(isinstance(t, str) and COMMAND_OR_URL.search(t) for t in texts):
            continue
        if not any(key == t or key.startswith(t + ".") for t in typed):
            raise UserError(
                f"{found} (found beside the checkpoint) sets {key} to a command or URL; "
                f"give a recipe, or set it yourself with --set {key}=..."
            )
