"""The sampler: pixel-space noise, batched forwards, exact counts, per-example seeding."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from dmae_cli.models import build_classifier
from dmae_cli.sampler import Sampler, example_generator, example_seed

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards: a second OpenMP thread costs more in synchronisation than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert [len(x) for x in spy.inputs] == [300, 300, 300, 100]  # batches, no loop per sample
    noisy = torch.cat(spy.inputs)
    assert noisy.dtype == torch.float32 and noisy.shape == (1000, 3, 8, 8)
    noise = noisy - image
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01
    assert sampler.drawn == 1000


def test_counts_match_a_sample_by_sample_reference() -> None:
    torch.manual_seed(0)
    model = build_classifier(META).eval()
    image = torch.rand(1, 8, 8)
    sampler = Sampler(model, sigma=0.25, num_classes=10, batch_size=64, device=torch.device("cpu"))
    counts = sampler.counts(image, example_generator(3, 11, torch.device("cpu")))(200)
    generator = example_generator(3, 11, torch.device("cpu"))
    expected = torch.zeros(10, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, 200, 64):  # the same noise stream, one forward per sample
            noise = torch.randn((min(64, 200 - start), 1, 8, 8), generator=generator)
            for x in image + 0.25 * noise:
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

    assert syncs(32 * 20) == syncs(32) <= 3  # bincount's sizing and the copy to the host
