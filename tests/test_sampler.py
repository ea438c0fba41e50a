"""The sampler: pixel-space noise, batched forwards, exact counts, per-example seeding."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from dmae_cli.models.classifier import build_classifier
from dmae_cli.runtime import precision as precision_module
from dmae_cli.runtime.errors import UserError
from dmae_cli.runtime.precision import autocast_dtype, cpu_has_native_bf16
from dmae_cli.smoothing import sampler as sampler_module
from dmae_cli.smoothing.sampler import (
    NOISE_CHUNK,
    OUT_OF_MEMORY,
    NoiseStream,
    Sampler,
    auto_batch_size,
    auto_parallel,
    example_generator,
    example_seed,
    forward_pool,
)

CPU = torch.device("cpu")

META = {
    "backbone": "vit_tiny",
    "backbone_options": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "image_size": 16,
    "patch_size": 4,
    "input_size": 8,  # native 8x8: the model's adapter resizes to 16x16
    "channels": 1,
    "mean": [0.3],
    "std": [0.4],
    "num_classes": 10,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Spy(nn.Module):
    """Records what the sampler feeds the model; votes by the sign of the mean pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        score = x.mean(dim=(1, 2, 3))
        return torch.stack([-score, score], dim=1)


def test_noise_is_fp32_pixel_space_at_native_resolution_in_batches() -> None:
    spy = Spy()
    sampler = Sampler(spy, sigma=0.5, num_classes=2, batch_size=300, device=torch.device("cpu"))
    image = torch.rand(3, 8, 8)
    counts = sampler.counts(image, example_generator(0, 7, torch.device("cpu")))(1000)
    assert counts.dtype == torch.int64 and counts.device.type == "cpu"
    assert counts.tolist() == [
        sum(int((x.mean(dim=(1, 2, 3)) <= 0).sum()) for x in spy.inputs),
        sum(int((x.mean(dim=(1, 2, 3)) > 0).sum()) for x in spy.inputs),
    ]  # argmax ties go to class 0, as torch does
    assert [len(x) for x in spy.inputs] == [250] * 4  # equal batches, no loop per sample
    noisy = torch.cat(spy.inputs)
    assert noisy.dtype == torch.float32 and noisy.shape == (1000, 3, 8, 8)
    noise = noisy - image
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01
    assert sampler.drawn == 1000


def test_counts_match_a_sample_by_sample_reference() -> None:
    torch.manual_seed(0)
    model = build_classifier(META).eval()
    image = torch.rand(1, 8, 8)
    sampler = Sampler(
        model, sigma=0.25, num_classes=10, batch_size=64, device=CPU, precision="fp32"
    )  # fp32 like the reference below: auto may be bf16 on this CPU
    counts = sampler.counts(image, example_generator(3, 11, CPU))(200)
    generator = example_generator(3, 11, torch.device("cpu"))
    calls = -(-200 // NOISE_CHUNK)  # the same noise stream: whole generator calls, cut at 200
    noise = torch.cat(
        [torch.randn((NOISE_CHUNK, 1, 8, 8), generator=generator) for _ in range(calls)]
    )
    expected = torch.zeros(10, dtype=torch.int64)
    with torch.no_grad():
        for x in image + 0.25 * noise[:200]:  # one forward per sample
            expected[model(x[None]).argmax()] += 1
    assert torch.equal(counts, expected)
    assert counts.sum() == 200 and counts.shape == (10,)


def test_each_example_has_its_own_reproducible_noise() -> None:
    torch.manual_seed(0)
    model = build_classifier(META).eval()
    sampler = Sampler(model, sigma=1.0, num_classes=10, batch_size=50, device=torch.device("cpu"))
    images = torch.rand(3, 1, 8, 8)

    def run(order: list[int]) -> dict[int, list[int]]:
        out = {}
        for i in order:
            counts = sampler.counts(images[i], example_generator(5, i, torch.device("cpu")))
            out[i] = counts(30).tolist() + counts(70).tolist()  # selection, then estimation
        return out

    assert run([0, 1, 2]) == run([2, 0, 1])  # the order of examples does not matter
    assert run([1])[1] == run([0, 1])[1]  # nor what ran before (a resume, another rank)
    assert len({example_seed(s, i) for s in range(20) for i in range(500)}) == 20 * 500
    assert all(0 <= example_seed(s, 10**9) < 2**63 for s in (0, 1, 2**40))


@pytest.mark.parametrize(
    ("batch_size", "requests"),
    [(1000, [700]), (7, [700]), (64, [5, 300, 17, 1, 377]), (300, [64] * 10 + [60])],
)
def test_an_examples_noise_does_not_depend_on_batch_size_or_request_sizes(
    batch_size: int, requests: list[int]
) -> None:
    # Copy i of an example is the same however it is asked for, so certifiers that split
    # their requests differently (cohen, sequential) see the same noise, copy for copy.
    spy = Spy()
    sampler = Sampler(spy, sigma=0.5, num_classes=2, batch_size=batch_size, device=CPU)
    image = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(1))  # 25: not 16k
    counts = sampler.counts(image, example_generator(2, 5, CPU))
    for size in requests:
        counts(size)
    noise = torch.cat(spy.inputs)[:700] - image
    reference = NoiseStream(example_generator(2, 5, CPU), (1, 5, 5)).take(700)
    assert torch.allclose(noise, 0.5 * reference, atol=1e-6)
    assert max(len(x) for x in spy.inputs) <= batch_size


def test_noise_stream_keeps_the_rest_of_a_call_for_the_next_request() -> None:
    whole = NoiseStream(example_generator(0, 0, CPU), (2, 3)).take(3 * NOISE_CHUNK + 5)
    stream = NoiseStream(example_generator(0, 0, CPU), (2, 3))
    parts = [stream.take(size) for size in (0, 1, NOISE_CHUNK, 2 * NOISE_CHUNK - 1, 5)]
    assert [len(p) for p in parts] == [0, 1, NOISE_CHUNK, 2 * NOISE_CHUNK - 1, 5]
    assert torch.equal(torch.cat(parts), whole)
    assert whole.dtype == torch.float32 and abs(float(whole.std()) - 1) < 0.1


def test_zero_samples_and_bad_arguments() -> None:
    sampler = Sampler(Spy(), sigma=0.5, num_classes=2, batch_size=4, device=torch.device("cpu"))
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, torch.device("cpu")))
    assert counts(0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="sigma"):
        Sampler(Spy(), sigma=0.0, num_classes=2, batch_size=4, device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_synchronises_per_call_not_per_batch() -> None:
    device = torch.device("cuda")
    model = build_classifier(META).to(device)
    sampler = Sampler(model, sigma=0.5, num_classes=10, batch_size=32, device=device)
    image = torch.rand(1, 8, 8)

    def syncs(num: int) -> int:
        counts = sampler.counts(image, example_generator(0, 0, device))
        counts(32)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                counts(num)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return len(caught)

    assert syncs(32 * 20) == syncs(32) <= 3  # votes counted on the device; one copy to the host


# -- out of memory ------------------------------------------------------------------------------
# -- passes, and several at once on a CPU ---------------------------------------------------
@given(total=st.integers(0, 5000), batch=st.integers(1, 600), parallel=st.integers(1, 8))
def test_a_call_is_cut_into_equal_passes_of_at_most_a_batch_for_every_thread(
    total: int, batch: int, parallel: int
) -> None:
    sampler = Sampler(
        Spy(), sigma=0.5, num_classes=2, batch_size=batch, device=CPU, parallel=parallel
    )
    sizes = sampler.pass_sizes(total)
    assert sum(sizes) == total and all(0 < size <= batch for size in sizes)
    assert max(sizes, default=0) - min(sizes, default=0) <= 1
    fewest = math.ceil(total / batch)
    assert fewest <= len(sizes) < fewest + parallel  # no more passes than keeps threads busy
    assert len(sizes) % parallel == 0 or len(sizes) == total  # each thread gets as many


def test_parallel_passes_give_the_votes_of_one_pass_at_a_time() -> None:
    torch.manual_seed(0)
    model = build_classifier(META).eval()
    image = torch.rand(1, 8, 8)

    def run(parallel: int) -> tuple[list[list[int]], Sampler]:
        sampler = Sampler(
            model, sigma=0.5, num_classes=10, batch_size=64, device=CPU, parallel=parallel
        )
        counts = sampler.counts(image, example_generator(1, 2, CPU))
        return [counts(n).tolist() for n in (10, 150, 700, 1)], sampler

    threads = torch.get_num_threads()
    expected, _ = run(1)
    got, sampler = run(3)
    assert got == expected and sampler.drawn == 861
    assert torch.get_num_threads() == threads  # this thread's count is restored


def test_the_forward_threads_use_one_core_and_leave_the_default_alone() -> None:
    torch.set_num_threads(2)  # the fixture restores it
    pool = forward_pool(5)  # a size no other test uses: created here
    assert {pool.submit(torch.get_num_threads).result() for _ in range(20)} == {1}
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [2] and torch.get_num_threads() == 2


def test_parallel_passes_hold_at_most_two_passes_per_thread() -> None:
    finished: list[int] = []

    class Counting(Spy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            finished.append(len(x))
            return out

    outstanding: list[int] = []  # passes made but not yet classified, as each pass is made

    def passes() -> Iterator[torch.Tensor]:
        for _ in range(40):
            outstanding.append(len(outstanding) - len(finished))
            yield torch.rand(4, 1, 4, 4)

    sampler = Sampler(Counting(), sigma=0.5, num_classes=2, batch_size=4, device=CPU, parallel=2)
    votes = sampler.classify_passes(passes())
    assert votes.shape == (160,) and len(finished) == 40
    assert max(outstanding) <= 2 * 2


def test_a_pass_failing_in_a_thread_fails_the_call() -> None:
    class BreaksAtTheThirdPass(Spy):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with self.lock:
                out = super().forward(x)
                if len(self.inputs) == 3:
                    raise RuntimeError("broken model")
            return out

    sampler = Sampler(
        BreaksAtTheThirdPass(), sigma=0.5, num_classes=2, batch_size=8, device=CPU, parallel=2
    )
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, CPU))
    with pytest.raises(RuntimeError, match="broken model"):
        counts(80)
    assert counts(8).sum() == 8  # the threads are free for the next call


def test_parallel_passes_are_for_a_cpu() -> None:
    with pytest.raises(UserError, match="certify.parallel 2: parallel forward passes are for"):
        Sampler(Spy(), sigma=0.5, num_classes=2, batch_size=8, device="cuda", parallel=2)
    with pytest.raises(UserError, match="a compiled classifier runs one pass at a time"):
        Sampler(Spy(), sigma=0.5, num_classes=2, batch_size=8, device=CPU, parallel=2, compile=True)
    assert auto_parallel(CPU, compile=True) == 1 and auto_parallel(torch.device("cuda")) == 1
    assert auto_parallel(CPU) == torch.get_num_threads()
    with pytest.raises(ValueError, match="parallel >= 1"):
        Sampler(Spy(), sigma=0.5, num_classes=2, batch_size=8, device=CPU, parallel=0)


class RunsOutOfMemory(nn.Module):
    """`model`, except that a forward pass of more than `fits` copies raises CUDA's OOM error."""

    def __init__(self, model: nn.Module, fits: int) -> None:
        super().__init__()
        self.model, self.fits, self.refused = model, fits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.fits:
            self.refused += 1
            raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return self.model(x)


def test_out_of_memory_halves_the_forward_passes_and_keeps_the_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    model = build_classifier(META).eval()
    image = torch.rand(1, 8, 8)

    def run(net: nn.Module) -> tuple[Sampler, list[list[int]]]:
        sampler = Sampler(
            net, sigma=0.5, num_classes=10, batch_size=64, device=CPU, precision="fp32"
        )
        counts = sampler.counts(image, example_generator(1, 2, CPU))
        return sampler, [counts(n).tolist() for n in (10, 150, 64, 1)]

    _, expected = run(model)
    capsys.readouterr()
    tight = RunsOutOfMemory(model, fits=20)
    sampler, got = run(tight)
    assert got == expected  # the same noise, the same votes
    assert (sampler.batch_size, sampler.forward_size) == (64, 16) and sampler.drawn == 225
    assert tight.refused == 2  # 64 failed, then 32; 16 stays for the rest of the run
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert len(warnings_) == 2 and "continuing with 32" in warnings_[0]
    assert "at 32 noisy copies per forward pass; continuing with 16" in warnings_[1]


class FailsOnce(nn.Module):
    """A spy whose `fail`-th forward pass raises CUDA's OOM error (after the noise was drawn)."""

    def __init__(self, fail: int | None) -> None:
        super().__init__()
        self.spy, self.fail, self.sizes = Spy(), fail, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(self.sizes) == self.fail:
            raise OUT_OF_MEMORY("CUDA out of memory (fake)")
        return self.spy(x)


def test_out_of_memory_classifies_the_same_noise_again_in_halves() -> None:
    image = torch.rand(1, 4, 4)

    def run(fail: int | None) -> FailsOnce:
        model = FailsOnce(fail)
        sampler = Sampler(model, sigma=0.5, num_classes=2, batch_size=8, device=CPU)
        sampler.counts(image, example_generator(0, 3, CPU))(24)
        return model

    clean, failed = run(None), run(fail=2)
    assert clean.sizes == [8, 8, 8] and failed.sizes == [8, 8, 4, 4, 4, 4]
    assert torch.equal(torch.cat(failed.spy.inputs), torch.cat(clean.spy.inputs))


def test_out_of_memory_at_one_copy_stops_with_one_line() -> None:
    sampler = Sampler(
        RunsOutOfMemory(Spy(), fits=0), sigma=0.5, num_classes=2, batch_size=4, device=CPU
    )
    counts = sampler.counts(torch.rand(1, 4, 4), example_generator(0, 0, CPU))
    with pytest.raises(UserError, match="out of memory on cpu with one noisy copy per forward"):
        counts(4)


def test_auto_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    model, shape = Spy(), (3, 32, 32)
    assert auto_batch_size(model, shape, CPU, None, most=100_000) == 256
    tried: list[int] = []

    def fits_300(model: nn.Module, shape: tuple[int, ...], *args: object) -> bool:
        tried.append(shape[0])
        return shape[0] <= 300

    monkeypatch.setattr(sampler_module, "_forward_fits", fits_300)
    cuda = torch.device("cuda")
    assert auto_batch_size(model, shape, cuda, torch.bfloat16, most=100_000) == 256
    assert tried == [4096, 2048, 1024, 512, 256]
    fewer = auto_batch_size(model, shape, cuda, torch.bfloat16, most=100)
    assert fewer == 128  # the first power of two >= n: no call draws more
    monkeypatch.setattr(sampler_module, "_forward_fits", lambda *args: False)
    with pytest.raises(UserError, match="out of memory on cuda with a single image"):
        auto_batch_size(model, shape, cuda, None, most=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_batch_size_runs() -> None:
    device = torch.device("cuda")
    model = build_classifier(META).to(device)
    size = auto_batch_size(model, (1, 8, 8), device, torch.bfloat16, most=1000)
    assert size == 1024  # a tiny model fits the first power of two >= n
    sampler = Sampler(model, sigma=0.5, num_classes=10, batch_size=size, device=device)
    assert sampler.counts(torch.rand(1, 8, 8), example_generator(0, 0, device))(1000).sum() == 1000


# -- precision and compilation --------------------------------------------------------------------
def test_auto_precision_is_bf16_on_cuda_and_for_certification_on_a_native_bf16_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(cpu_has_native_bf16(), bool)
    cuda = torch.device("cuda")
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("bf16", CPU) == torch.bfloat16
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda native=native: native)
        assert autocast_dtype("auto", CPU) == expected
        sampler = Sampler(Spy(), sigma=0.5, num_classes=2, batch_size=4, device=CPU)
        assert sampler.precision == ("bf16" if native else "fp32")
        assert autocast_dtype("auto", CPU, training=True) is None  # training: fp32 on CPUs
    assert autocast_dtype("auto", cuda, training=True) == torch.bfloat16


def test_compiled_counts_equal_eager_counts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    image = torch.rand(1, 8, 8)

    def run(compile: bool) -> list[list[int]]:
        sampler = Sampler(
            model, sigma=0.5, num_classes=3, batch_size=32, device=CPU, precision="fp32",
            compile=compile,
        )  # fmt: skip
        try:
            sampler.warm_up(image)
        except UserError as exc:  # no C++ compiler here: the one line a user would get
            pytest.skip(str(exc))
        counts = sampler.counts(image, example_generator(0, 9, CPU))
        return [counts(n).tolist() for n in (10, 100, 33, 1)]  # 33 and 1: batches of one

    assert run(compile=True) == run(compile=False)


def test_a_compiler_that_cannot_work_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> Callable[[torch.Tensor], torch.Tensor]:
        def compiled(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    sampler = Sampler(Spy(), sigma=0.5, num_classes=2, batch_size=4, device=CPU, compile=True)
    with pytest.raises(UserError, match="No working C\\+\\+ compiler found\\); it needs a C"):
        sampler.warm_up(torch.rand(1, 4, 4))
    assert sampler.drawn == 0
