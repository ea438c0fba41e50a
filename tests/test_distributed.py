"""Two-process gloo training must match one process with twice the per-device batch."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dmae_cli.config.recipe import load_recipe
from dmae_cli.runtime.checkpoint import load_checkpoint
from dmae_cli.training.pretrain import run_pretrain
from tests.conftest import TINY_OVERRIDES, as_torchrun_rank

EPOCHS = ["pretrain.epochs=3", "pretrain.warmup_epochs=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: str, data: list[str]) -> None:
    """One torchrun-like process: the environment torchrun would set, then the real stage."""
    as_torchrun_rank(rank, port)
    # A rank that exits with its gloo group alive can abort in the interpreter's teardown:
    # record that the group is left (by dmae's exit handler, as this process ends).
    destroy = torch.distributed.destroy_process_group

    def leave(*args: object) -> None:
        (Path(out) / f"rank{rank}.left").touch()
        destroy(*args)

    torch.distributed.destroy_process_group = leave
    recipe = load_recipe(
        "recipes/digits.yaml",
        [*TINY_OVERRIDES, *EPOCHS, *data, "pretrain.batch_size=32", f"runs_dir={out}"],
    )
    result = run_pretrain(recipe, out=Path(out) / "ddp")
    # Only rank 0 writes the run; every rank reports its own live parameters and loss here.
    report = {
        "loss": result.history[-1]["loss"],
        "model": result.model.state_dict(),
        "kept_for_the_next_stage": torch.distributed.is_initialized(),
    }
    torch.save(report, Path(out) / f"rank{rank}.pt")


def shards_of_digits(tmp_path: Path) -> list[str]:
    """The digits train split as webdataset shards of 200 samples: 8 shards, 4 per rank."""
    from dmae_cli.data.shard import ShardConfig, run_shard

    run_shard(ShardConfig("digits", out=str(tmp_path / "shards" / "digits-train"), max_count=200))
    return ["data.dataset=webdataset", f"data.root={tmp_path / 'shards'}"]


@pytest.mark.parametrize("source", ["map-style", "shards"])
def test_two_process_gloo_matches_single_process(tmp_path: Path, source: str) -> None:
    data = shards_of_digits(tmp_path) if source == "shards" else []
    mp.spawn(worker, args=(free_port(), str(tmp_path), data), nprocs=2, join=True)
    outputs = {p.name for p in (tmp_path / "ddp").iterdir()}
    assert {"last.pth", "checkpoint-0003.pth", "metrics.jsonl", "config.yaml"} <= outputs
    assert not any(name.startswith(".") for name in outputs)  # no stray temporaries from rank 1
    state = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert len(state["rng"]) == 2  # each rank's own RNG streams, for an exact resume
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key  # DDP kept the replicas identical
    assert torch.equal(
        ranks[0]["model"]["decoder_pred.weight"], state["model"]["decoder_pred.weight"]
    )
    assert all(r["kept_for_the_next_stage"] for r in ranks)
    assert all((tmp_path / f"rank{r}.left").exists() for r in range(2))  # left at exit
    losses = [r["loss"] for r in ranks]
    assert losses[0] == losses[1]  # averaged across ranks

    single = load_recipe(
        "recipes/digits.yaml",
        [*TINY_OVERRIDES, *EPOCHS, *data, "pretrain.batch_size=64", f"runs_dir={tmp_path}"],
    )
    reference = run_pretrain(single, out=tmp_path / "single").history[-1]["loss"]
    assert abs(losses[0] - reference) / reference < 0.10
