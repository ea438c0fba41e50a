"""Certification under hostile and careless inputs: a budget of a billion copies, a batch that
does not fit, a schedule of millions of checks, shards instead of a data set, an alpha that
breaks scipy's quantile. Each fails in one line or works, and memory stays flat."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch import Tensor
from typer.testing import CliRunner

from dmae_cli.api import ABSTAIN, Certificate, CertifyRequest, cohen_bound, simulate
from dmae_cli.cli.app import app
from dmae_cli.data.shard import ShardConfig, run_shard
from dmae_cli.runtime import distributed
from dmae_cli.runtime.errors import UserError
from dmae_cli.smoothing.certify import run_certify
from dmae_cli.smoothing.drive import certify_all
from dmae_cli.smoothing.jobs import Streamed, by_index
from dmae_cli.smoothing.noise import NoiseStream
from dmae_cli.smoothing.runfile import COLUMNS, Row, read_lines
from dmae_cli.smoothing.sampler import OUT_OF_MEMORY, Sampler, example_generator
from dmae_plugins.certifiers.cohen import Cohen
from dmae_plugins.certifiers.sequential import MIN_RATIO, Sequential
from dmae_plugins.datasets.webdataset import webdataset
from tests.conftest import one_line_error, save_classifier
from tests.test_certify import RECIPE, recipe

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
RADII = (0.0, 0.25, 0.5, 1.0)
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args: str):
    return runner.invoke(app, ["certify", *args])


def without_time(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [
        [c if i != COLUMNS.index("time") else "" for i, c in enumerate(line.split("\t"))]
        for line in lines
    ]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()


# -- 1. a budget of a billion copies: memory flat in n ------------------------------------------
def peak_bytes(call, copies: int) -> int:
    """The peak of Python's allocations while `call(copies)` runs, above where it started."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        call(copies)
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def one_example(parallel: int):
    sampler = Sampler(tiny_model(), sigma=0.5, num_classes=10, batch_size=1, device=CPU,
                      precision="fp32", parallel=parallel)  # fmt: skip
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, CPU))
    return lambda copies: counts(copies)


def side_by_side(parallel: int):
    sampler = Sampler(tiny_model(), sigma=0.5, num_classes=10, batch_size=2, device=CPU,
                      precision="fp32", parallel=parallel)  # fmt: skip
    images = torch.rand(2, 1, 4, 4)

    class Draw:  # an API-2 certifier asking for n copies once
        name = "draw"

        def certify(self, request: CertifyRequest) -> Generator[int, torch.Tensor, None]:
            yield request.n

        predict = certify

    def call(copies: int) -> None:
        examples = [(images[i], example_generator(0, i, CPU)) for i in (0, 1)]
        certify_all(sampler, examples, Draw(), [CertifyRequest(0.5, 0.001, 1, copies)] * 2)

    return call


@pytest.mark.parametrize("parallel", [1, 2])
@pytest.mark.parametrize("path", [one_example, side_by_side])
def test_memory_does_not_grow_with_the_copies_a_call_draws(path, parallel: int) -> None:
    # One pass per copy (batch size 1): before, every pass left a list entry and its votes
    # until the call ended, about 200 bytes a pass here (65 MB/s in `dmae certify`).
    call = path(parallel)
    call(300)  # warm-up: the thread pool, torch's caches
    few, many = peak_bytes(call, 300), peak_bytes(call, 3300)
    assert (many - few) / 3000 < 5  # bytes per pass: nothing is kept per pass


# -- 2. a batch that does not fit: back off, or one line --------------------------------------
def cpu_allocator_failure() -> None:
    torch.empty(2**62, dtype=torch.uint8)  # a real DefaultCPUAllocator failure, no memory used


def raise_memory_error() -> None:
    raise MemoryError


def raise_cuda_oom() -> None:
    raise OUT_OF_MEMORY("CUDA out of memory (fake)")


class FitsOnly(nn.Module):
    """`model`, except that a forward pass of more than `fits` copies fails to allocate."""

    def __init__(self, model: nn.Module, fits: int, fail) -> None:
        super().__init__()
        self.model, self.fits, self.fail, self.refused = model, fits, fail, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.fits:
            self.refused += 1
            self.fail()
        return self.model(x)


ALLOCATION_FAILURES = [cpu_allocator_failure, raise_memory_error, raise_cuda_oom]


@pytest.mark.parametrize("fail", ALLOCATION_FAILURES)
def test_an_allocation_the_cpu_refuses_halves_the_passes_and_keeps_the_counts(
    fail, capsys: pytest.CaptureFixture[str]
) -> None:
    model, image = tiny_model(), torch.rand(1, 4, 4)

    def run(net: nn.Module) -> tuple[Sampler, list[list[int]]]:
        sampler = Sampler(net, sigma=0.5, num_classes=10, batch_size=64, device=CPU,
                          precision="fp32")  # fmt: skip
        counts = sampler.counts(image, example_generator(1, 2, CPU))
        return sampler, [counts(n).tolist() for n in (10, 150, 64, 1)]

    _, expected = run(model)
    tight = FitsOnly(model, 20, fail)
    sampler, got = run(tight)
    assert got == expected and sampler.forward_size == 16 and tight.refused == 2
    assert "out of memory on cpu at 64 noisy copies per forward pass" in capsys.readouterr().err


@pytest.mark.parametrize("fail", ALLOCATION_FAILURES)
def test_an_allocation_refused_at_one_copy_is_one_line(fail) -> None:
    sampler = Sampler(FitsOnly(tiny_model(), 0, fail), sigma=0.5, num_classes=10, batch_size=4,
                      device=CPU)  # fmt: skip
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, CPU))
    with pytest.raises(UserError, match="out of memory on cpu with one noisy copy per forward"):
        counts(4)


@pytest.mark.parametrize("fail", ALLOCATION_FAILURES)
def test_noise_that_does_not_fit_is_one_line(fail, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NoiseStream, "take", lambda self, size: fail())
    sampler = Sampler(tiny_model(), sigma=0.5, num_classes=10, batch_size=300_000, device=CPU)
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, CPU))
    with pytest.raises(UserError, match="drawing 300000 noisy copies of a 1x4x4 image at once"):
        counts(300_000)


def test_an_error_that_is_not_about_memory_is_not_retried() -> None:
    def broken() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    sampler = Sampler(FitsOnly(tiny_model(), 0, broken), sigma=0.5, num_classes=10,
                      batch_size=8, device=CPU)  # fmt: skip
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, CPU))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        counts(8)
    assert sampler.forward_size == 8


# -- 3. a schedule of millions of checks ----------------------------------------------------------
@pytest.mark.parametrize("knob", ["growth", "check_growth"])
@pytest.mark.parametrize("value", [1.0000001, 1.0009])
def test_a_ratio_too_close_to_one_is_one_line_naming_the_option(
    runs: Path, knob: str, value: float
) -> None:
    with pytest.raises(ValueError, match=f"{knob} must be at least {MIN_RATIO}"):
        Sequential(**{knob: value})
    result = cli(RECIPE, "--set", f"runs_dir={runs}", "--certifier", "sequential", "--n",
                 "1000000000", "--set", f"certify.options={{{knob}: {value}}}")  # fmt: skip
    assert f"sequential: {knob} must be at least 1.001" in one_line_error(result)
    assert not list(runs.glob("digits/certify/sigma-*"))  # refused before any file


def test_the_smallest_ratios_keep_the_schedule_of_a_billion_short() -> None:
    sequential = Sequential(growth=MIN_RATIO, check_growth=MIN_RATIO)
    assert len(sequential.checks(10**9)) < 20_000 and sequential.checks(10**9)[-1] == 10**9


# -- 4. shards instead of a data set ------------------------------------------------------------
@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """The digits test split as npy shards (bit-exact) of 100 examples each, with a manifest."""
    out = tmp_path / "shards"
    out.mkdir()
    run_shard(ShardConfig(out=str(out / "digits-test"), dataset="digits", split="test",
                          max_count=100, format="npy"))  # fmt: skip
    return out


SELECTION = ("certify.start=5", "certify.interval=37", "certify.max_examples=7")
SHARDED = ("data.dataset=webdataset",)


def test_certifying_shards_gives_the_rows_of_the_data_set_they_hold(
    runs: Path, shards: Path, tmp_path: Path
) -> None:
    [direct] = run_certify(recipe(runs, *SELECTION), out=tmp_path / "direct")
    streamed = recipe(runs, *SELECTION, *SHARDED, f"data.root={shards}")
    [sharded] = run_certify(streamed, out=tmp_path / "sharded")
    assert [r.idx for r in sharded.rows] == [5 + 37 * i for i in range(7)]  # 227 is in shard 3
    assert without_time(sharded.tsv) == without_time(direct.tsv)


def test_a_resumed_certification_of_shards_skips_the_finished_examples(
    runs: Path, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_classifier(runs / "digits" / "finetune" / "sigma-0.25" / "best.pth", sigma=0.25)
    both = ("certify.sigma=[0.25, 0.5]", "certify.together=2", *SELECTION, *SHARDED,
            f"data.root={shards}")  # fmt: skip
    whole = run_certify(recipe(runs, *both), out=tmp_path / "whole")
    certify, calls = Cohen.certify, []

    def crashing(self: Cohen, request: CertifyRequest) -> Generator[int, Tensor, Certificate]:
        calls.append(1)
        if len(calls) == 10:  # in the second sigma's second group
            raise KeyboardInterrupt
        return (yield from certify(self, request))

    monkeypatch.setattr(Cohen, "certify", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_certify(recipe(runs, *both), out=tmp_path / "resumed")
    monkeypatch.setattr(Cohen, "certify", certify)
    assert len(read_lines(tmp_path / "resumed" / "sigma-0.25.tsv")) == 7
    assert len(read_lines(tmp_path / "resumed" / "sigma-0.5.tsv")) == 2
    resumed = run_certify(recipe(runs, *both), out=tmp_path / "resumed")
    assert [r.certified_now for r in resumed] == [0, 5]
    for before, after in zip(whole, resumed, strict=True):
        assert without_time(after.tsv) == without_time(before.tsv)


def test_the_cli_certifies_shards(runs: Path, shards: Path) -> None:
    result = cli(RECIPE, "--set", f"runs_dir={runs}", "--set", "data.dataset=webdataset",
                 "--set", f"data.root={shards}", "--n", "30", "--n0", "5", "--max-examples",
                 "3", "--sigma", "0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(read_lines(runs / "digits" / "certify" / "sigma-0.5.tsv")) == 3


def test_streamed_examples_by_index_in_one_pass(shards: Path) -> None:
    stream = webdataset("test", root=str(shards), image_size=16)
    items = list(stream)
    examples = Streamed(stream, "webdataset")
    assert len(examples) == len(items) == 360
    for idx in (0, 0, 99, 100, 359, 3, 250):  # ahead, the same again, back to the start
        image, label = examples[idx]
        assert torch.equal(image, items[idx][0]) and label == items[idx][1]
    examples.close()


def test_a_stream_shorter_than_announced_is_one_line(shards: Path) -> None:
    stream = webdataset("test", root=str(shards), image_size=16)
    examples = Streamed(stream, "webdataset")
    (shards / "digits-test-000003.tar").write_bytes(b"")  # 60 examples lost
    with pytest.raises(UserError, match="ended after 300 examples, before example 320"):
        examples[320]


def test_streamed_data_under_torchrun_is_refused_in_one_line(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = webdataset("test", root=str(shards), image_size=16)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(UserError, match="dataset 'webdataset' is streamed.*without torchrun"):
        by_index(stream, "webdataset")
    items = [1, 2]
    assert by_index(items, "digits") is items  # indexable data is left alone


# -- 5. never a non-finite radius -----------------------------------------------------------
def scripted(*answers: list[int]) -> Callable[[int], Tensor]:
    calls: list[int] = []

    def counts(num: int) -> torch.Tensor:
        calls.append(num)
        return torch.tensor(answers[len(calls) - 1], dtype=torch.int64)

    return counts


@pytest.mark.parametrize("votes", [2, 3, 6])
def test_cohen_abstains_where_scipy_cannot_bound_at_a_tiny_alpha(votes: int) -> None:
    assert math.isnan(cohen_bound(0.5, votes, 100, 1e-300).pa_lower)  # what scipy does
    request = CertifyRequest(0.5, 1e-300, 10, 100, RADII)
    cert = simulate(Cohen(), request, scripted([0, 10], [100 - votes, votes]))
    assert (cert.prediction, cert.radius) == (ABSTAIN, 0.0)


@pytest.mark.parametrize("name", ["cohen", "sequential"])
@pytest.mark.parametrize("alpha", [1e-300, 1e-200, 0.001])
@pytest.mark.parametrize("top", [0.02, 0.5, 0.97, 1.0])
def test_every_radius_is_finite_whatever_the_alpha(name: str, alpha: float, top: float) -> None:
    certifier = Cohen() if name == "cohen" else Sequential()
    rng = torch.Generator().manual_seed(0)

    def counts(num: int) -> torch.Tensor:
        hits = int(torch.binomial(torch.tensor(float(num)), torch.tensor(top), rng))
        return torch.tensor([num - hits, hits])

    cert = simulate(certifier, CertifyRequest(0.5, alpha, 100, 1000, RADII), counts)
    assert math.isfinite(cert.radius) and cert.radius >= 0
    assert cert.radius == 0.0 or not cert.abstained


@pytest.mark.parametrize("radius", [math.nan, math.inf, -math.inf])
def test_a_row_with_a_radius_that_is_not_finite_is_refused(radius: float) -> None:
    row = Row.of(3, 1, Certificate(1, radius, 9, 10, 5, {}), 0.1, "broken")
    with pytest.raises(UserError, match="certifier 'broken' returned the radius .* example 3"):
        row.line()


def test_a_certifier_returning_nan_stops_the_cli_in_one_line(
    runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_radius(self: Cohen, request: CertifyRequest) -> Generator[int, Tensor, Certificate]:
        yield request.n0
        return Certificate(0, math.nan, 0, 0, request.n0, {})

    monkeypatch.setattr(Cohen, "certify", nan_radius)
    result = cli(RECIPE, "--set", f"runs_dir={runs}", "--sigma", "0.5", "--max-examples", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output  # after the progress
    error = result.stderr.strip().splitlines()[-1]
    assert "error: certifier 'cohen' returned the radius nan for example 0" in error
    assert read_lines(runs / "digits" / "certify" / "sigma-0.5.tsv") == {}


def test_the_cli_at_a_tiny_alpha_writes_finite_radii(runs: Path) -> None:
    result = cli(RECIPE, "--set", f"runs_dir={runs}", "--sigma", "0.5", "--alpha", "1e-300",
                 "--n", "100", "--n0", "10", "--max-examples", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = read_lines(runs / "digits" / "certify" / "sigma-0.5.tsv").values()
    assert len(lines) == 4 and all(math.isfinite(Row.parse(line).radius) for line in lines)
