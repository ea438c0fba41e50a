"""Bad inputs end with one line on stderr and exit code 2, never a traceback (issue #8).

Every test runs the real CLI (`typer.testing.CliRunner`, in process) and checks, through
`one_line_error`, exit code 2, exactly one line on stderr, no traceback, and that the line
names the problem (and, where there is one, the fix). The checklist, item by item:

- malformed YAML, unknown key, wrong type, out-of-range value:
  test_recipe_mistake_is_one_line (more cases: test_recipe.py, test_recipe_fuzz.py)
- a missing or empty data directory (imagefolder, cifar10, webdataset, no data.root):
  test_missing_or_empty_data_directory_is_one_line
- an unreadable or corrupt image, skipped and counted in metrics.jsonl (also when a DataLoader
  worker meets it), or fatal with `strict`:
  test_corrupt_image_is_skipped_and_counted, test_corrupt_image_with_strict_is_one_line
- a truncated or corrupt shard, the same two ways:
  test_truncated_shard_is_skipped_and_counted, test_truncated_shard_with_strict_is_one_line
- a corrupt checkpoint (junk or cut short) for certify --checkpoint, finetune --init, a
  pretrain resume and pretrain.init: test_corrupt_checkpoint_is_one_line
- a checkpoint of another architecture, listing the mismatched keys and shapes:
  test_checkpoint_of_another_architecture_lists_the_mismatched_keys
- a checkpoint of another number of classes:
  test_checkpoint_of_another_number_of_classes_is_one_line
- a TSV that is neither ours nor Cohen's:
  test_report_of_a_file_that_is_not_a_certification_result_is_one_line (malformed rows of
  a real results file: test_report.py)
- an unknown plugin name (backbone, dataset, certifier):
  test_unknown_plugin_name_is_one_line
- a run directory with nothing to resume, certify or report:
  test_nothing_to_resume_certify_or_report_is_one_line
- `DMAE_DEBUG=1` shows the traceback: test_debug_variable_shows_the_traceback
- numerical faults: a non-finite loss stops with its update number, keeps the last good
  checkpoint and suggests a lower lr:
  test_non_finite_loss_stops_at_its_update_keeps_the_checkpoint_and_suggests_a_lower_lr;
  gradient-norm spikes are logged, not fatal: test_train.py

Models are width 32, depth 2; data are digits or a few 16x16 images; the file takes about
20 seconds on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.models.adapter import InputAdapter
from dmae_cli.models.backbone import build_backbone
from dmae_cli.models.classifier import build_classifier
from dmae_cli.models.dmae import DMAE
from dmae_cli.runtime import checkpoint
from tests.conftest import (
    TINY_OVERRIDES,
    one_line_error,
    save_classifier,
    tiny_classifier_meta,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
runner = CliRunner()


def cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def sets(*items: str) -> list[str]:
    """`--set` for each item, after the tiny-model overrides."""
    return [x for item in [*TINY_OVERRIDES, *items] for x in ("--set", item)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- checkpoints of the digits recipe's tiny model, or of another one ----------------------------


def tiny_dmae(width: int, patch_size: int = 4) -> DMAE:
    encoder = build_backbone(
        "vit_tiny",
        img_size=16,
        patch_size=patch_size,
        in_chans=1,
        embed_dim=width,
        depth=2,
        num_heads=2,
    )
    adapter = InputAdapter(16, 16, [0.5], [0.25])
    return DMAE(encoder, adapter, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def save_pretrain_run(run_dir: Path, width: int, patch_size: int = 4, **state) -> Path:
    """A `last.pth` as `dmae pretrain` writes it, of a DMAE of encoder width `width`."""
    model = tiny_dmae(width, patch_size).state_dict()
    optimizer = {"state": {}, "param_groups": []}
    state = {"model": model, "optimizer": optimizer, "epoch": 0, "rng": [], **state}
    return checkpoint.save_checkpoint(
        run_dir / "last.pth", {**state, "meta": {"stage": "pretrain"}}
    )


def corrupt_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x02 certainly not a checkpoint")
    return path


def truncated_checkpoint(path: Path) -> Path:
    """A real checkpoint cut in half, as a full disk or an interrupted copy leaves it."""
    save_classifier(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# -- the recipe ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pretrain: {epochs: [1,\n", "(line 2): malformed YAML"),
        ("pretrain:\n  epohcs: 3\n", "unknown key 'pretrain.epohcs'; did you mean 'epochs'?"),
        ("pretrain:\n  epochs: ten\n", "pretrain.epochs: expected an integer, got 'ten'"),
        ("pretrain:\n  mask_ratio: 1.5\n", "mask_ratio: expected a number in [0.0, 1.0), got 1.5"),
    ],
    ids=["malformed-yaml", "unknown-key", "wrong-type", "out-of-range"],
)
def test_recipe_mistake_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    line = one_line_error(cli("pretrain", recipe))
    assert str(recipe) in line and expected in line


# -- data ------------------------------------------------------------------------------------------
def write_images(root: Path, count: int = 3) -> Path:
    """root/train/{a,b}/ with `count` random 16x16 RGB PNGs each."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(count):
            path = root / "train" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return root


def empty_class_folder(root: Path) -> Path:
    write_images(root)
    (root / "train" / "c").mkdir()
    return root


@pytest.mark.parametrize(
    ("dataset", "make_root", "expected"),
    [
        ("imagefolder", lambda p: p / "nowhere", "is not a directory"),
        ("imagefolder", lambda p: p, "has no train/ directory of class folders"),
        ("imagefolder", empty_class_folder, "/train/c' has no images"),
        ("cifar10", lambda p: p, "lacks data_batch_1"),
        ("webdataset", lambda p: p, "no manifest for split 'train'"),
        ("imagefolder", lambda p: None, "needs data.root"),
    ],
    ids=["missing", "empty", "empty-class", "cifar10-empty", "webdataset-empty", "no-root"],
)
def test_missing_or_empty_data_directory_is_one_line(
    tmp_path: Path, dataset: str, make_root, expected: str
) -> None:
    root = make_root(tmp_path / "data")
    if root is not None and root.name == "data":
        root.mkdir(exist_ok=True)
    given = [f"data.root={root}"] if root is not None else []
    result = cli("pretrain", RECIPE, *sets(f"data.dataset={dataset}", *given), "--out", tmp_path)
    line = one_line_error(result)
    assert f"dataset '{dataset}'" in line and expected in line


def imagefolder_pretrain(tmp_path: Path, root: Path, *items: str):
    """One epoch of `dmae pretrain` on the class folders under `root` (batch 2)."""
    data = [
        "data.dataset=imagefolder",
        f"data.root={root}",
        "pretrain.batch_size=2",
        "pretrain.epochs=1",
        "pretrain.warmup_epochs=0",
    ]
    return cli("pretrain", RECIPE, *sets(*data, *items), "--out", tmp_path / "run")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_skipped_and_counted(tmp_path: Path, workers: int) -> None:
    root = write_images(tmp_path / "images")
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    result = imagefolder_pretrain(tmp_path, root, f"data.num_workers={workers}")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["skipped"] == 1  # counted even when a DataLoader worker met it


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_with_strict_is_one_line(tmp_path: Path, workers: int) -> None:
    root = write_images(tmp_path / "images")
    bad = root / "train" / "b" / "0.png"
    bad.write_bytes(b"GIF89a nothing more")
    strict = "data.options={strict: true}"
    line = one_line_error(
        imagefolder_pretrain(tmp_path, root, strict, f"data.num_workers={workers}")
    )
    assert f"cannot decode image '{bad}'" in line and "option strict" in line


@pytest.fixture(scope="module")
def truncated_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The digits train split in 8 shards, the third cut in the middle of a member."""
    from dmae_cli.data.shard import ShardConfig, run_shard

    root = tmp_path_factory.mktemp("shards")
    config = ShardConfig(dataset="digits", out=str(root / "digits-train"), max_count=200)
    run_shard(config)
    shard = root / "digits-train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    return root, shard


def shard_pretrain(tmp_path: Path, root: Path, *items: str):
    data = ["data.dataset=webdataset", f"data.root={root}", "pretrain.epochs=1"]
    return cli("pretrain", RECIPE, *sets(*data, *items), "--out", tmp_path / "run")


def test_truncated_shard_is_skipped_and_counted(
    tmp_path: Path, truncated_shards: tuple[Path, Path]
) -> None:
    result = shard_pretrain(tmp_path, truncated_shards[0])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["skipped"] >= 1


def test_truncated_shard_with_strict_is_one_line(
    tmp_path: Path, truncated_shards: tuple[Path, Path]
) -> None:
    root, shard = truncated_shards
    line = one_line_error(shard_pretrain(tmp_path, root, "data.options={strict: true}"))
    assert f"shard '{shard}'" in line and "dataset 'webdataset'" in line


# -- checkpoints -----------------------------------------------------------------------------------
def certify_checkpoint(tmp_path: Path, path: Path):
    items = ["certify.sigma=[0.5]", f"runs_dir={tmp_path / 'runs'}"]
    return cli("certify", RECIPE, *sets(*items), "--checkpoint", path)


def finetune_init(tmp_path: Path, path: Path):
    out = tmp_path / "finetune"
    return cli("finetune", RECIPE, *sets(), "--sigma", "0.5", "--init", path, "--out", out)


def pretrain_resume(tmp_path: Path, path: Path):
    """`dmae pretrain` into a run directory whose last.pth is the given file."""
    run = tmp_path / "pretrain"
    run.mkdir(exist_ok=True)
    (run / "last.pth").write_bytes(path.read_bytes())
    return cli("pretrain", RECIPE, *sets("pretrain.epochs=1"), "--out", run)


def pretrain_init(tmp_path: Path, path: Path):
    return cli("pretrain", RECIPE, *sets(f"pretrain.init={path}"), "--out", tmp_path / "p")


LOADERS = {
    "certify --checkpoint": certify_checkpoint,
    "finetune --init": finetune_init,
    "pretrain resume": pretrain_resume,
    "pretrain.init": pretrain_init,
}


@pytest.mark.parametrize("corruption", ["junk", "truncated"])
@pytest.mark.parametrize("command", list(LOADERS))
def test_corrupt_checkpoint_is_one_line(tmp_path: Path, command: str, corruption: str) -> None:
    if corruption == "junk":
        bad = corrupt_file(tmp_path / "bad.pth")
    else:
        bad = truncated_checkpoint(tmp_path / "bad.pth")
    line = one_line_error(LOADERS[command](tmp_path, bad))
    name = "last.pth" if command == "pretrain resume" else "bad.pth"
    assert f"{name}: not a readable checkpoint" in line
    if command == "pretrain resume":
        assert "remove it to start the run afresh" in line


def test_checkpoint_of_another_architecture_lists_the_mismatched_keys(tmp_path: Path) -> None:
    # certify: a classifier whose weights are not the model its meta describes (width 64)
    wide = save_classifier(tmp_path / "wide.pth", width=64)
    state = checkpoint.load_checkpoint(wide)
    state["meta"] = tiny_classifier_meta(width=32)
    checkpoint.save_checkpoint(wide, state)
    line = one_line_error(certify_checkpoint(tmp_path, wide))
    assert "weights do not match the model its meta describes" in line
    assert "vit.cls_token (1, 1, 64) in the checkpoint, (1, 1, 32) in the model" in line
    assert "and " in line and "more" in line  # dozens of tensors: a few named, the rest counted

    # certify: weights of a cls-token classifier (norm, no fc_norm) under a meta of avg pooling
    token = build_classifier({**tiny_classifier_meta(), "global_pool": "token"})
    pooled = tmp_path / "pooled.pth"
    checkpoint.save_checkpoint(
        pooled, {"model": token.state_dict(), "meta": tiny_classifier_meta()}
    )
    line = one_line_error(certify_checkpoint(tmp_path, pooled))
    assert "2 tensors missing from the checkpoint: vit.fc_norm.weight, vit.fc_norm.bias" in line
    assert "2 tensors not in the model: vit.norm.weight, vit.norm.bias" in line

    # finetune --init: the encoder of a wider pretraining run
    run = tmp_path / "wide-run"
    save_pretrain_run(run, width=64)
    line = one_line_error(finetune_init(tmp_path, run / "last.pth"))
    assert "encoder has width 64, the model 32" in line
    assert "cls_token (1, 1, 64) in the checkpoint, (1, 1, 32) in the model" in line

    # pretrain: resuming, continuing from it (pretrain.init), redrawing its pictures
    for result in (
        pretrain_resume(tmp_path, run / "last.pth"),
        pretrain_init(tmp_path, run / "last.pth"),
        cli("pretrain", RECIPE, *sets(), "--pictures-only", "--out", run),
    ):
        line = one_line_error(result)
        assert "does not match" in line
        assert "encoder.cls_token (1, 1, 64) in the checkpoint, (1, 1, 32) in the model" in line

    # finetune --init: another patch size (16x16 images in 8x8 patches)
    save_pretrain_run(tmp_path / "patch8", width=32, patch_size=8)
    line = one_line_error(finetune_init(tmp_path, tmp_path / "patch8" / "last.pth"))
    assert "patch_embed.proj.weight (32, 1, 8, 8) in the checkpoint, (32, 1, 4, 4)" in line
    assert "the patch size or the number of channels differs" in line

    # pretrain.init: a classifier has no tensor a DMAE could use
    line = one_line_error(pretrain_init(tmp_path, save_classifier(tmp_path / "clf.pth")))
    assert "no tensor of the checkpoint matches the DMAE model" in line

    # pretrain resume: the model fits, the optimizer state is of other parameter groups
    mine = tmp_path / "mine"
    save_pretrain_run(mine, width=32)
    line = one_line_error(pretrain_resume(tmp_path, mine / "last.pth"))
    assert "its optimizer state does not fit this run's parameter groups" in line


def test_checkpoint_of_another_number_of_classes_is_one_line(tmp_path: Path) -> None:
    # certify: a classifier of 100 classes for the 10 classes of digits
    wrong = save_classifier(tmp_path / "c100.pth", num_classes=100)
    line = one_line_error(certify_checkpoint(tmp_path, wrong))
    assert "images of 100 classes, but dataset 'digits'" in line and "10 classes" in line

    # finetune: resuming a run whose last.pth was trained for another number of classes
    out = tmp_path / "finetune"
    resumable = {"optimizer": {}, "epoch": 0, "rng": []}
    save_classifier(out / "sigma-0.5" / "last.pth", num_classes=100, **resumable)
    line = one_line_error(finetune_init(tmp_path, Path("none")))
    assert "does not match this recipe's model" in line
    assert "vit.head.weight (100, 32) in the checkpoint, (10, 32) in the model" in line
    assert "another number of classes" in line


# -- report ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("results.csv", b"idx,label,predict,radius,correct\n0,1,1,0.5,1\n", "by commas"),
        ("log.tsv", b"epoch\tloss\n0\t0.5\n", "lacks label, predict, radius, correct"),
        ("sigma-0.5.json", b'{"sigma": 0.5}\n', "not a certification result"),
        ("best.pth", b"PK\x03\x04\x00\x00\x08\x00\xff\xfe", "not a UTF-8 text file"),
    ],
    ids=["csv", "other-tsv", "json", "checkpoint"],
)
def test_report_of_a_file_that_is_not_a_certification_result_is_one_line(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    line = one_line_error(cli("report", path))
    assert str(path) in line and expected in line
    # other malformed TSVs (wrong field counts, bad numbers, repeats): test_report.py


# -- plugins ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "command", "expected"),
    [
        ("backbone", ["pretrain", RECIPE, "--set", "model.backbone=vit_enormous"], "vit_tiny"),
        ("dataset", ["pretrain", RECIPE, "--set", "data.dataset=mnist"], "digits, imagefolder"),
        ("certifier", ["certify", RECIPE, "--certifier", "nope"], "cohen, sequential"),
        ("dataset", ["shard", "mnist", "--out", "{tmp}/shards"], "digits, imagefolder"),
    ],
    ids=["backbone", "dataset", "certifier", "shard-dataset"],
)
def test_unknown_plugin_name_is_one_line(
    tmp_path: Path, kind: str, command: list[str], expected: str
) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    if args[0] != "shard":
        args += ["--set", f"runs_dir={tmp_path}"]
    if args[0] == "certify":  # a model, so that certify gets as far as the plugin
        args += ["--checkpoint", str(save_classifier(tmp_path / "model.pth"))]
    line = one_line_error(cli(*args))
    assert f"unknown {kind} '" in line and "available:" in line and expected in line


# -- nothing to resume, certify or report ----------------------------------------------------------
def nothing_there(tmp_path: Path, case: str):
    runs = tmp_path / "runs"
    (runs / "digits" / "pretrain").mkdir(parents=True)  # a run that never finished an epoch
    at = ["--set", f"runs_dir={runs}"]
    if case == "report-empty-run":
        return cli("report", runs / "digits")
    if case == "certify-no-model":
        return cli("certify", RECIPE, "--sigma", "0.5", *at)
    if case == "certify-no-runs":
        return cli("certify", "--sigma", "0.5", *at)
    if case == "finetune-no-pretrain":
        return cli("finetune", RECIPE, *at)
    if case == "finetune-init-empty-run":
        return cli("finetune", RECIPE, *at, "--init", runs / "digits" / "pretrain")
    if case == "pretrain-resume-missing":
        return cli("pretrain", RECIPE, *sets(f"runs_dir={runs}"), "--resume", runs / "none.pth")
    if case == "pretrain-resume-classifier":
        best = save_classifier(runs / "best.pth")
        return cli("pretrain", RECIPE, *sets(f"runs_dir={runs}"), "--resume", best)
    assert case == "pictures-only-no-run"
    return cli("pretrain", RECIPE, *at, "--pictures-only")


@pytest.mark.parametrize(
    ("case", "problem", "advice"),
    [
        ("report-empty-run", "no certification results", "run 'dmae certify' first"),
        ("certify-no-model", "no fine-tuned model for sigma 0.5: ", "run 'dmae finetune'"),
        ("certify-no-runs", "no fine-tuned model for sigma 0.5 under", "or --checkpoint"),
        ("finetune-no-pretrain", "no pretraining run at", "run 'dmae pretrain'"),
        ("finetune-init-empty-run", "is a directory without last.pth", "run 'dmae pretrain'"),
        ("pretrain-resume-missing", "none.pth: nothing to resume", "takes a last.pth"),
        ("pretrain-resume-classifier", "not a resumable", "takes a last.pth"),
        ("pictures-only-no-run", "no checkpoint to draw", "run 'dmae pretrain' first"),
    ],
)
def test_nothing_to_resume_certify_or_report_is_one_line(
    tmp_path: Path, case: str, problem: str, advice: str
) -> None:
    line = one_line_error(nothing_there(tmp_path, case))
    assert problem in line and advice in line


# -- the debug variable ----------------------------------------------------------------------------
def test_debug_variable_shows_the_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("pretrain: {epochs: [1,\n")
    assert "Traceback" not in one_line_error(cli("pretrain", recipe))  # without the variable
    command = [sys.executable, "-m", "dmae_cli", "pretrain", str(recipe)]
    env = {**os.environ, "DMAE_PLUGINS": "builtin", "OMP_NUM_THREADS": "1", "DMAE_DEBUG": "1"}
    loud = subprocess.run(command, capture_output=True, text=True, env=env)
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr
    assert "RecipeError" in loud.stderr and "malformed YAML" in loud.stderr


# -- numerical faults ------------------------------------------------------------------------------
def test_non_finite_loss_stops_at_its_update_keeps_the_checkpoint_and_suggests_a_lower_lr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dmae_cli.training.pretrain as pretrain_module

    real_loss, calls = pretrain_module.dmae_loss, []

    def nan_from_update_26(*args, **kwargs):
        calls.append(1)  # 22 updates per epoch: the 26th is the 4th of epoch 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 26 else loss

    monkeypatch.setattr(pretrain_module, "dmae_loss", nan_from_update_26)
    run = tmp_path / "run"
    result = cli("pretrain", RECIPE, *sets("pretrain.epochs=3"), "--out", run)
    # stderr is a log here (no terminal): progress lines up to the finished epoch, then the error
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    *progress, line = result.stderr.strip().splitlines()
    assert all(text.startswith("pretrain ") for text in progress)
    assert progress[-1].startswith("pretrain 22/66 epoch 1/3 loss ")
    assert line.startswith("error: ")
    assert "loss became nan at update 26 (epoch 1)" in line
    assert f"the last good checkpoint {run / 'last.pth'} is kept" in line
    assert "lower pretrain.blr (now 0.004" in line and "pretrain.clip_grad" in line
    state = checkpoint.load_checkpoint(run / "last.pth")
    assert state["epoch"] == 0 and "position" not in state
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
