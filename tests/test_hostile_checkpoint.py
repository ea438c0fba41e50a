"""Checkpoints with a hostile or damaged inside, through every command that reads one: one line
naming the file and the field, never a traceback or an absurd allocation.

The readers: `dmae certify --checkpoint` (a classifier, rebuilt from its description),
`dmae finetune --init` (a pre-training run's encoder), `dmae pretrain` resuming from a planted
last.pth, `dmae pretrain --set pretrain.init=` (continuing from weights), and `dmae finetune`
resuming its own last.pth.

- the model's description (meta) of the wrong type or of absurd sizes:
  test_a_bad_description_is_one_line_where_it_is_read (certify rebuilds the model from it;
  the others build the recipe's model and do not read it: they run)
- a 1-D, 0-D or wrongly shaped pos_embed or cls_token:
  test_a_misshapen_pos_embed_is_one_line_before_any_resampling
- a meta or sparse tensor, or complex numbers, among the weights:
  test_a_tensor_that_is_not_weights_is_one_line
- a resume state of the wrong kind (rng 'abc', epoch 'abc', a position of another epoch, ...):
  test_a_damaged_resume_state_is_one_line_naming_the_field
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from dmae_cli.cli.app import app
from dmae_cli.models.spec import ModelSpec
from dmae_cli.runtime import checkpoint
from dmae_cli.runtime.errors import UserError
from tests.conftest import TINY_OVERRIDES, one_line_error, save_classifier, tiny_classifier_meta

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
TRAIN = ["pretrain.epochs=1", "pretrain.warmup_epochs=0", "finetune.epochs=1"]
TRAIN += ["finetune.warmup_epochs=0", "finetune.eval_every=1", "finetune.eval_noise_copies=1"]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def sets(*items: str) -> list[str]:
    return [x for item in [*TINY_OVERRIDES, *TRAIN, *items] for x in ("--set", item)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of tiny pre-training and fine-tuning: checkpoints as the commands write them."""
    root = tmp_path_factory.mktemp("trained")
    result = cli("pretrain", RECIPE, *sets(), "--out", root / "pretrain")
    assert result.exit_code == 0, result.output
    pretrain = root / "pretrain" / "last.pth"
    result = cli("finetune", RECIPE, *sets(), "--sigma", "0.5", "--init", pretrain, "--out", root)
    assert result.exit_code == 0, result.output
    classifier = save_classifier(root / "classifier.pth")
    return {"pretrain": pretrain, "finetune": root / "sigma-0.5" / "last.pth", "clf": classifier}


def changed(source: Path, path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the checkpoint at `source`, with `change` applied to its contents."""
    state = checkpoint.load_checkpoint(source)
    change(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    return checkpoint.save_checkpoint(path, state)


# -- the readers -----------------------------------------------------------------------------------
def certify_checkpoint(tmp: Path, path: Path):
    items = ["certify.sigma=[0.5]", f"runs_dir={tmp / 'runs'}"]
    return cli("certify", RECIPE, *sets(*items), "--checkpoint", path)


def finetune_init(tmp: Path, path: Path):
    return cli("finetune", RECIPE, *sets(), "--sigma", "0.5", "--init", path, "--out", tmp / "ft")


def finetune_resume(tmp: Path, path: Path, init: Path):
    """`dmae finetune` into an output directory whose sigma-0.5/last.pth is the given file."""
    planted = tmp / "ft" / "sigma-0.5" / "last.pth"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(path.read_bytes())
    return finetune_init(tmp, init)


def pretrain_resume(tmp: Path, path: Path):
    """`dmae pretrain` into a run directory whose last.pth is the given file."""
    run = tmp / "pre"
    run.mkdir(exist_ok=True)
    (run / "last.pth").write_bytes(path.read_bytes())
    return cli("pretrain", RECIPE, *sets(), "--out", run)


def pretrain_init(tmp: Path, path: Path):
    return cli("pretrain", RECIPE, *sets(f"pretrain.init={path}"), "--out", tmp / "p")


# -- the description -------------------------------------------------------------------------------
BAD_META = {
    "backbone_options-5": ({"backbone_options": 5}, "backbone_options"),
    "mean-abc": ({"mean": "abc"}, "mean"),
    "image_size-65536": ({"image_size": 65536}, "image_size"),
    "8192-pixels-in-1-pixel-patches": ({"image_size": 8192, "patch_size": 1}, "patch_size"),
    "input-of-16384-squared-pixels": ({"input_size": 16384}, "input_size"),
    "a-65536-wide-65536-deep-vit": (
        {"backbone_options": {"embed_dim": 65536, "depth": 65536, "num_heads": 1}},
        "backbone_options",
    ),
}


@pytest.mark.parametrize(("meta", "field"), BAD_META.values(), ids=list(BAD_META))
def test_a_bad_description_is_one_line_where_it_is_read(
    tmp_path: Path, trained: dict[str, Path], meta: dict[str, Any], field: str
) -> None:
    bad = changed(trained["clf"], tmp_path / "bad.pth", lambda s: s["meta"].update(meta))
    line = one_line_error(certify_checkpoint(tmp_path, bad))
    assert f"bad.pth: checkpoint field meta.{field}: expected " in line


@pytest.mark.parametrize("meta", [m for m, _ in list(BAD_META.values())[:3]])
@pytest.mark.parametrize("command", ["finetune --init", "pretrain resume", "pretrain.init"])
def test_a_bad_description_is_not_read_by_the_training_commands(
    tmp_path: Path, trained: dict[str, Path], command: str, meta: dict[str, Any]
) -> None:
    """They build the recipe's model and take the weights: the description plays no part."""
    bad = changed(trained["pretrain"], tmp_path / "bad.pth", lambda s: s["meta"].update(meta))
    run = {"finetune --init": finetune_init, "pretrain resume": pretrain_resume}
    result = run.get(command, pretrain_init)(tmp_path, bad)
    assert result.exit_code == 0, result.output


def test_sizes_taken_together_are_bounded() -> None:
    fine = {**tiny_classifier_meta(), "image_size": 4096, "patch_size": 16, "input_size": 4096}
    assert ModelSpec.from_dict(fine).image_size == 4096
    wide = {"embed_dim": 65536, "num_heads": 1}  # one block of that width: 5e10 parameters
    for change in ({"backbone_options": wide}, {"image_size": 4096, "patch_size": 8}):
        with pytest.raises(UserError, match="x.pth: checkpoint field meta"):
            ModelSpec.from_dict({**tiny_classifier_meta(), **change}, "x.pth")


# -- position embeddings and tokens ----------------------------------------------------------------
BAD_TENSORS = {
    "pos_embed-1-d": ("pos_embed", torch.zeros(32)),
    "pos_embed-0-d": ("pos_embed", torch.tensor(0.5)),
    "pos_embed-batch-of-2": ("pos_embed", torch.zeros(2, 17, 32)),
    "pos_embed-other-width": ("pos_embed", torch.zeros(1, 17, 64)),
    "pos_embed-not-a-square": ("pos_embed", torch.zeros(1, 7, 32)),
    "pos_embed-no-patches": ("pos_embed", torch.zeros(1, 1, 32)),
    "pos_embed-integers": ("pos_embed", torch.zeros(1, 5, 32, dtype=torch.int64)),
    "cls_token-0-d": ("cls_token", torch.tensor(0.5)),
}
# what a command says: certify and a resume load exactly, finetune --init resamples pos_embed
SAYS = {
    "certify --checkpoint": "weights do not match the model its meta describes",
    "pretrain resume": "does not match this recipe's model",
    "finetune --init": "cannot use its pos_embed",
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
@pytest.mark.parametrize("command", list(SAYS))
def test_a_misshapen_pos_embed_is_one_line_before_any_resampling(
    tmp_path: Path, trained: dict[str, Path], command: str, case: str
) -> None:
    name, tensor = BAD_TENSORS[case]
    certify = command.startswith("certify")
    source, key = (trained["clf"], "vit.") if certify else (trained["pretrain"], "encoder.")
    bad = changed(source, tmp_path / "bad.pth", lambda s: s["model"].update({key + name: tensor}))
    runs = {"certify --checkpoint": certify_checkpoint, "pretrain resume": pretrain_resume}
    line = one_line_error(runs.get(command, finetune_init)(tmp_path, bad))
    shape = str(tuple(tensor.shape))
    if command == "finetune --init" and case in ("cls_token-0-d", "pos_embed-other-width"):
        # nothing to resample: the fit check names the tensor of another shape or width
        own = "(1, 1, 32)" if name == "cls_token" else "(1, 17, 32)"
        assert f"{name} {shape} in the checkpoint, {own} in the model" in line
    else:
        assert SAYS[command] in line and shape in line


ODD = {
    "meta": (lambda t: torch.empty(t.shape, device="meta"), "is a meta tensor"),
    "sparse": (lambda t: t.to_sparse(), "is a sparse_coo tensor"),
    "complex": (lambda t: t.to(torch.complex64), "holds complex numbers"),
}


@pytest.mark.parametrize("kind", list(ODD))
@pytest.mark.parametrize("command", [*SAYS, "pretrain.init"])
def test_a_tensor_that_is_not_weights_is_one_line(
    tmp_path: Path, trained: dict[str, Path], command: str, kind: str
) -> None:
    make, says = ODD[kind]
    certify = command.startswith("certify")
    source, key = (trained["clf"], "vit.") if certify else (trained["pretrain"], "encoder.")
    key += "blocks.0.attn.qkv.weight"
    odd = lambda s: s["model"].update({key: make(s["model"][key])})  # noqa: E731
    bad = changed(source, tmp_path / "bad.pth", odd)
    runs = {
        "certify --checkpoint": certify_checkpoint,
        "pretrain resume": pretrain_resume,
        "pretrain.init": pretrain_init,
    }
    line = one_line_error(runs.get(command, finetune_init)(tmp_path, bad))
    assert f"tensor {key} {says}" in line


def test_pretrain_init_recomputes_position_embeddings_whatever_they_were(
    tmp_path: Path, trained: dict[str, Path]
) -> None:
    bad = changed(
        trained["pretrain"],
        tmp_path / "bad.pth",
        lambda s: s["model"].update({"encoder.pos_embed": torch.zeros(32)}),
    )
    result = pretrain_init(tmp_path, bad)
    assert result.exit_code == 0, result.output


# -- resume state ----------------------------------------------------------------------------------
def _rng(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda s: change(s["rng"][0])


POSITION = {"epoch": 1, "updates_done": 3, "loss_sum": 6.0, "seen": 192}
DAMAGED = {
    "rng-abc": (lambda s: s.update(rng="abc"), "rng: expected a list"),
    "rng-empty": (lambda s: s.update(rng=[]), "rng: expected a list of random generator states"),
    "rng-of-a-string": (lambda s: s.update(rng=["abc"]), "rng[0]: expected a mapping"),
    "rng-torch-abc": (_rng(lambda r: r.update(torch="abc")), "rng[0].torch: expected"),
    "rng-torch-short": (_rng(lambda r: r.update(torch=r["torch"][:9])), "rng[0].torch"),
    "rng-numpy-missing": (_rng(lambda r: r.pop("numpy")), "rng[0].numpy: expected a mapping"),
    "rng-numpy-keys-short": (
        _rng(lambda r: r["numpy"].update(keys=r["numpy"]["keys"][:10])),
        "rng[0].numpy.keys: expected a tensor of 624 integers",
    ),
    "rng-numpy-pos-huge": (_rng(lambda r: r["numpy"].update(pos=10**6)), "rng[0].numpy.pos"),
    "rng-python-short": (
        _rng(lambda r: r["python"].update(state=[1, 2, 3])),
        "rng[0].python: expected the state of random.getstate()",
    ),
    "rng-python-version": (_rng(lambda r: r["python"].update(version=9)), "rng[0].python"),
    "epoch-abc": (lambda s: s.update(epoch="abc"), "epoch: expected an integer >= -1, got 'abc'"),
    "epoch-negative": (lambda s: s.update(epoch=-5), "epoch: expected an integer >= -1, got -5"),
    "position-abc": (lambda s: s.update(position="abc"), "position: expected a mapping"),
    "position-of-another-epoch": (
        lambda s: s.update(position={**POSITION, "epoch": 7}),
        "position: expected a mapping of epoch (1)",
    ),
    "position-negative-updates": (
        lambda s: s.update(position={**POSITION, "updates_done": -3}),
        "position: expected",
    ),
    "position-loss-nan": (
        lambda s: s.update(position={**POSITION, "loss_sum": float("nan")}),
        "position: expected",
    ),
    "model-abc": (lambda s: s.update(model="abc"), "model: expected a state dict, got 'abc'"),
    "optimizer-abc": (lambda s: s.update(optimizer="abc"), "optimizer: expected a state dict"),
}


@pytest.mark.parametrize(("change", "words"), DAMAGED.values(), ids=list(DAMAGED))
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_damaged_resume_state_is_one_line_naming_the_field(
    tmp_path: Path, trained: dict[str, Path], stage: str, change: Callable, words: str
) -> None:
    bad = changed(trained[stage], tmp_path / "bad.pth", change)
    if stage == "pretrain":
        result = pretrain_resume(tmp_path, bad)
    else:
        result = finetune_resume(tmp_path, bad, trained["pretrain"])
    line = one_line_error(result)
    assert f"last.pth: checkpoint field {words}" in line
    assert "remove it to start the run afresh" in line


def test_a_sound_position_resumes(tmp_path: Path, trained: dict[str, Path]) -> None:
    """The checks let through what an interrupted run writes."""
    good = changed(
        trained["pretrain"], tmp_path / "good.pth", lambda s: s.update(position=POSITION)
    )
    result = pretrain_resume(tmp_path, good)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "update 3" in result.output


def test_rng_state_round_trips_and_a_bad_one_touches_no_generator() -> None:
    state = checkpoint.rng_state()
    assert checkpoint.rng_problem(state) is None
    expected = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    before = torch.get_rng_state()
    bad = {**state, "python": {**state["python"], "state": [0] * 3}}
    with pytest.raises(ValueError, match=r"rng\.python: expected"):
        checkpoint.set_rng_state(bad)
    assert torch.equal(torch.get_rng_state(), before)  # checked before the first is restored
