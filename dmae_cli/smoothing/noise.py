"""The noise of certification: one reproducible stream of standard normal copies per example.

Every example draws its noise from its own stream (`NoiseStream`): a generator seeded from
(seed, example index), called for `NOISE_CHUNK` copies at a time, the unused rest of a call
kept for the next request. So noisy copy number i of an example is the same whatever came
before it (other examples, another process's share of the work, a resume) and however the
copies are asked for: the batch size, the sizes of a certifier's requests, the packing of
several examples into one forward pass (`dmae_cli.smoothing.drive`) and the out-of-memory
back-off (which halves the copies per forward pass, `Sampler.forward_size`) leave the noise
unchanged. Two certifiers run with one seed therefore see the same noise, copy for copy: a
sequential certifier's votes are a prefix of `cohen`'s, which makes their comparison a paired
one.
"""

from __future__ import annotations

import hashlib

import torch

# Copies per generator call: large enough that a call costs little next to a forward pass,
# small enough that the rest kept per example (a group of examples certified together) is a
# small buffer.
NOISE_CHUNK = 64


def example_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for example `index` of a run seeded with `seed`.

    Hashed rather than `seed + index` so that runs with neighbouring seeds do not share noise.
    """
    digest = hashlib.sha256(f"dmae-certify/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(example_seed(seed, index))


class NoiseStream:
    """The standard normal noise of one example: copy i is the same however it is asked for.

    The generator is called for `NOISE_CHUNK` copies of `shape` at a time, and what a request
    leaves of a call serves the next, so the stream of copies does not depend on the sizes of
    the requests (see the module docstring).
    """

    def __init__(self, generator: torch.Generator, shape: tuple[int, ...]) -> None:
        self.generator = generator
        self.shape = shape
        self.left = torch.empty((0, *shape), device=generator.device)

    def take(self, size: int) -> torch.Tensor:
        """The next `size` copies, (size, *shape), in fp32 on the generator's device."""
        parts = []
        while size > 0:
            if not len(self.left):
                self.left = torch.randn(
                    (NOISE_CHUNK, *self.shape), generator=self.generator, device=self.left.device
                )
            part, self.left = self.left[:size], self.left[size:]
            parts.append(part)
            size -= len(part)
        if not parts:
            return self.left[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
