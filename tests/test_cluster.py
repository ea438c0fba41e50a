"""The cluster path on one machine, with gloo on the CPU: ranks that exit cleanly, inputs checked
before the first step, a rank killed, a job restarted or preempted, and two torchrun "nodes".

Every run here is real processes (`python -m dmae_cli` with the environment torchrun gives its
workers, or torchrun itself): what is tested is how processes start, fail and end. The model is
the tiny one of the other tests and the data a few digits shards, so a run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dmae_cli.runtime import distributed
from dmae_cli.runtime.checkpoint import load_checkpoint
from dmae_cli.runtime.errors import UserError
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits.yaml")
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in each rank: the same floats
SOAK = 10  # clean exits in a row; before the fix about one run in four aborted
ENDS_WITHIN_S = 120  # a job whose rank died must end by itself well within this
# 3 epochs of 12 updates per rank: time to land a signal inside the second epoch.
RUN = ["pretrain.epochs=3", "pretrain.warmup_epochs=1", "pretrain.batch_size=16"]
SHORT = ["pretrain.epochs=1", "pretrain.batch_size=16", "data.options={epoch_length: 64}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DMAE_PLUGINS": "builtin"}


def pretrain_args(out: Path, shards: Path, *overrides: str) -> list[str]:
    settings = [
        *TINY_OVERRIDES,
        "data.dataset=webdataset",
        f"data.root={shards}",
        "device=cpu",
        *overrides,
    ]
    return ["pretrain", RECIPE, "--out", str(out), *(a for s in settings for a in ("--set", s))]


def launch(args: list[str], logs: Path, world: int = 2) -> list[subprocess.Popen]:
    """`world` ranks of `dmae ARGS`, started as torchrun starts its workers."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        with (logs.parent / f"{logs.name}.rank{rank}.log").open("a") as log:  # reruns append
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dmae_cli", *args],
                    cwd=REPO,
                    env={**env(), **rank_env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def finish(procs: list[subprocess.Popen], logs: Path, within: float = ENDS_WITHIN_S) -> list[int]:
    """The ranks' exit codes; the test fails (after killing them) if they outlive `within`."""
    deadline = time.monotonic() + within
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"ranks still running after {within} s:\n{read_logs(logs)}")
    return [p.returncode for p in procs]


def read_logs(logs: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(logs.parent.glob(f"{logs.name}*.log")))


def run_ranks(args: list[str], logs: Path) -> None:
    codes = finish(launch(args, logs), logs)
    assert codes == [0, 0], read_logs(logs)


def wait_for(path: Path, procs: list[subprocess.Popen], logs: Path) -> None:
    """Until `path` exists (an epoch's checkpoint), while the run goes on."""
    deadline = time.monotonic() + ENDS_WITHIN_S
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            pytest.fail(f"the run ended or stalled before writing {path}:\n{read_logs(logs)}")
        time.sleep(0.01)


def without_time(tsv: Path) -> list[list[str]]:
    """A certification run file's cells, the wall-clock column blanked."""
    from dmae_cli.smoothing.runfile import COLUMNS

    column = COLUMNS.index("time")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    return [[c if i != column else "" for i, c in enumerate(row)] for row in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pth")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits train and test splits as shards of 200 (train: 8 shards, 4 per rank)."""
    from dmae_cli.data.shard import ShardConfig, run_shard

    root = tmp_path_factory.mktemp("shards")
    for split in ("train", "test"):
        run_shard(ShardConfig("digits", split=split, out=str(root / f"d-{split}"), max_count=200))
    return root


@pytest.fixture(scope="module")
def straight(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-rank run: what every interrupted one must end with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_ranks(pretrain_args(out, shards, *RUN), out)
    return out


# -- 1. clean exits --------------------------------------------------------------------------
def test_two_rank_shard_pretraining_exits_cleanly_every_time(shards: Path, tmp_path: Path) -> None:
    """A rank leaving with its gloo group alive could abort in the interpreter's teardown
    (`terminate called without an active exception`, exit -6) after training had finished."""
    for attempt in range(SOAK):
        out = tmp_path / f"run{attempt}"
        run_ranks(pretrain_args(out, shards, *SHORT), out)
        if attempt:
            assert_same_weights(out, tmp_path / "run0")


# -- 2. everything checked before the first step ---------------------------------------------
def agree_worker(rank: int, port: int, out: str) -> None:
    """One rank: a preparation that fails on rank 1 only, then one that fails nowhere."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["WORLD_SIZE"] = "2"
    outcomes = []
    with distributed.process_group(torch.device("cpu")):
        for failing in (1, None):
            try:
                with distributed.agreed():
                    if rank == failing:
                        raise UserError("no manifest for split 'test'")
                outcomes.append("went on")
            except UserError as exc:
                outcomes.append(str(exc))
    torch.save(outcomes, Path(out) / f"rank{rank}.pt")


def test_a_problem_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    mp.spawn(agree_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert outcomes[0] == ["rank 1: no manifest for split 'test'", "went on"]
    assert outcomes[1] == ["no manifest for split 'test'", "went on"]


def test_a_rank_that_cannot_start_stops_the_others_before_training(
    shards: Path, tmp_path: Path
) -> None:
    """Rank 0 finds the run directory locked by another run: before, it left with its one line
    and rank 1 waited for it in the rendezvous (30 min); now both say it, and train nothing."""
    from dmae_cli.runtime.lock import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        codes = finish(launch(pretrain_args(out, shards, *SHORT), out), out)
    assert codes == [2, 2], read_logs(out)
    logs = [(tmp_path / f"run.rank{r}.log").read_text() for r in range(2)]
    assert "in use by another dmae run" in logs[0] and "rank 0: " in logs[1], logs
    assert not (out / "last.pth").exists()


def test_train_shards_without_test_shards_train_and_skip_the_picture(
    shards: Path, tmp_path: Path
) -> None:
    """The picture needs the test split; without it, one warning before the first step and a
    run that succeeds (before: every epoch trained, then exit 2 for the missing split)."""
    from typer.testing import CliRunner

    from dmae_cli.cli.app import app

    train_only = tmp_path / "shards"
    train_only.mkdir()
    for path in shards.glob("d-train*"):
        shutil.copyfile(path, train_only / path.name)
    args = pretrain_args(tmp_path / "run", train_only, *SHORT, "pretrain.reconstructions=2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: no reconstructions.png: " in result.output
    assert "no manifest for split 'test'" in result.output
    assert (tmp_path / "run" / "last.pth").is_file()
    assert not (tmp_path / "run" / "reconstructions.png").exists()


def test_a_picture_that_cannot_be_written_is_a_warning(shards: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dmae_cli.cli.app import app

    (tmp_path / "run" / "reconstructions.png").mkdir(parents=True)  # in the picture's way
    args = pretrain_args(tmp_path / "run", shards, *SHORT, "pretrain.reconstructions=2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: no reconstructions.png: " in result.output
    assert (tmp_path / "run" / "last.pth").is_file()


# -- 3. a rank killed, a job restarted, a job preempted ---------------------------------------
def test_a_killed_rank_ends_the_job_and_the_rerun_ends_as_an_uninterrupted_run(
    shards: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = pretrain_args(out, shards, *RUN)
    procs = launch(args, out)
    wait_for(out / "last.pth", procs, out)  # the first epoch is done: kill inside the second
    procs[1].kill()
    codes = finish(procs, out)  # the survivor ends by itself: no torchrun agent here to kill it
    assert codes == [1, -signal.SIGKILL], read_logs(out)
    survivor = (tmp_path / "run.rank0.log").read_text()
    assert "error: rank 0: lost contact with the other ranks (" in survivor
    assert "Traceback" not in survivor  # an operational failure, said in one line
    assert load_checkpoint(out / "last.pth")["epoch"] < 2  # the run had not finished
    run_ranks(args, out)
    assert_same_weights(out, straight)


def worker_pids(parent: int) -> list[int]:
    """The processes torchrun started (its children running dmae_cli), by rank order of start."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"dmae_cli" in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def test_torchrun_restarts_a_killed_rank_and_completes_by_itself(
    shards: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    command = [
        str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--max-restarts", "3",
        "--monitor-interval", "0.2", "-m", "dmae_cli", *pretrain_args(out, shards, *RUN),
    ]  # fmt: skip
    # A restarted generation must not read the addresses the previous one left in the store
    # torchrun shares with its workers (pytorch/pytorch#135712): one store per round instead.
    fresh_store = {**env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with (tmp_path / "run.torchrun.log").open("w") as log:
        agent = subprocess.Popen(command, cwd=REPO, env=fresh_store, stdout=log, stderr=log)
        wait_for(out / "last.pth", [agent], out)
        workers = worker_pids(agent.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        code = finish([agent], out)[0]
    assert code == 0, read_logs(out)
    assert "restart" in (tmp_path / "run.torchrun.log").read_text().lower()
    assert_same_weights(out, straight)


def test_starting_a_shard_loader_draws_nothing_from_the_global_rng(shards: Path) -> None:
    """A resumed epoch starts a loader iterator the interrupted run did not; drawn from the
    global RNG, its seed shifted every later noise draw and mask (found by the test below)."""
    from dmae_cli.config.recipe import load_recipe
    from dmae_cli.data.loading import build_loader, load_dataset

    recipe = load_recipe(RECIPE, ["data.dataset=webdataset", f"data.root={shards}"])
    loader = build_loader(load_dataset(recipe, "train", augment=False), recipe.data, 16, 0)
    state = torch.get_rng_state()
    iter(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_sigterm_to_every_rank_saves_the_position_and_the_rerun_resumes_it(
    shards: Path, straight: Path, tmp_path: Path
) -> None:
    """Preemption (SLURM's --signal=TERM): every rank gets SIGTERM; they agree on an update,
    save where the epoch stopped and exit 143; the rerun continues from that very update."""
    out = tmp_path / "run"
    args = pretrain_args(out, shards, *RUN)
    procs = launch(args, out)
    wait_for(out / "last.pth", procs, out)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert finish(procs, out) == [143, 143], read_logs(out)
    state = load_checkpoint(out / "last.pth")
    assert state["position"]["updates_done"] > 0, state.get("position")  # inside an epoch
    run_ranks(args, out)
    assert_same_weights(out, straight)


# -- 4. two nodes on one machine ----------------------------------------------------------------
def two_nodes(args: list[str], logs: Path) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1` started twice against one c10d rendezvous, as
    on two machines (the README's rehearsal of a multi-node launch)."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [
        str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", endpoint, "--rdzv_id", logs.name, "-m", "dmae_cli", *args,
    ]  # fmt: skip
    nodes = []
    for node in range(2):
        with (logs.parent / f"{logs.name}.node{node}.log").open("w") as log:
            nodes.append(subprocess.Popen(command, cwd=REPO, env=env(), stdout=log, stderr=log))
    assert finish(nodes, logs, within=2 * ENDS_WITHIN_S) == [0, 0], read_logs(logs)


def test_two_nodes_pretrain_as_two_ranks_and_certify_as_one_process(
    shards: Path, straight: Path, tmp_path: Path
) -> None:
    from dmae_cli.config.recipe import load_recipe
    from dmae_cli.smoothing.certify import run_certify
    from dmae_cli.training.pretrain import run_pretrain
    from tests.conftest import save_classifier

    out = tmp_path / "pretrain"
    two_nodes(pretrain_args(out, shards, *RUN), out)
    assert_same_weights(out, straight)  # two nodes of one rank are two ranks of one node
    data = ["data.dataset=webdataset", f"data.root={shards}", "device=cpu"]
    single = load_recipe(RECIPE, [*TINY_OVERRIDES, *data, *RUN, "pretrain.batch_size=32"])
    reference = run_pretrain(single, out=tmp_path / "single").history[-1]["loss"]
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert abs(loss - reference) / reference < 0.10  # one batch of 32, or two of 16

    runs = tmp_path / "runs"
    save_classifier(runs / "digits" / "finetune" / "sigma-0.5" / "best.pth")
    certify = [
        "certify", RECIPE, "--sigma", "0.5", "-n", "60", "--n0", "10", "--batch-size", "32",
        "--max-examples", "7", "--set", f"runs_dir={runs}", "--set", "device=cpu",
    ]  # fmt: skip
    two_nodes([*certify, "--out", str(tmp_path / "nodes")], tmp_path / "certify")
    settings = [f"runs_dir={runs}", "device=cpu", "certify.sigma=[0.5]", "certify.n=60"]
    settings += ["certify.n0=10", "certify.batch_size=32", "certify.max_examples=7"]
    [alone] = run_certify(load_recipe(RECIPE, settings), out=tmp_path / "alone")
    assert without_time(tmp_path / "nodes" / "sigma-0.5.tsv") == without_time(alone.tsv)


def certify_worker(rank: int, port: int, runs: str) -> None:
    """One rank of a two-rank certification whose run file rank 0 finds locked."""
    from dmae_cli.config.recipe import load_recipe
    from dmae_cli.runtime.lock import run_lock
    from dmae_cli.smoothing.certify import run_certify

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["WORLD_SIZE"] = "2"
    recipe = load_recipe(RECIPE, [f"runs_dir={runs}", "device=cpu", "certify.sigma=[0.5]"])
    out = Path(runs) / "certified"
    outcome = "went on"
    try:
        if rank == 0:  # another dmae run holds sigma 0.5's file
            with run_lock(out, ".sigma-0.5.tsv.lock", what="x"):
                run_certify(recipe, out=out)
        else:
            run_certify(recipe, out=out)
    except UserError as exc:
        outcome = str(exc)
    torch.save(outcome, Path(runs) / f"rank{rank}.pt")


def test_a_locked_certification_stops_every_rank_before_any_row(runs: Path) -> None:
    """Before, rank 0 left with its one line and rank 1 waited for it at the first barrier."""
    mp.spawn(certify_worker, args=(free_port(), str(runs)), nprocs=2, join=True)
    outcomes = [torch.load(runs / f"rank{r}.pt") for r in range(2)]
    assert "in use by another dmae run" in outcomes[0], outcomes
    assert outcomes[1].startswith("rank 0: ") and "in use" in outcomes[1], outcomes
    assert not (runs / "certified" / "sigma-0.5.tsv").exists()
