"""Mapping-independent initial weights.

Every parameter is drawn at its FULL (unsharded) shape from a generator seeded by
hash(seed, parameter name), then sliced to this rank's shard. So the initial model depends only
on the seed and the model spec, never on the mapping or on the order modules are built in.
"""

from __future__ import annotations

import hashlib

import torch

INIT_STD = 0.02


def generator(seed: int, name: str) -> torch.Generator:
    """CPU generator for one named tensor."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def normal(shape: tuple[int, ...], seed: int, name: str, std: float = INIT_STD) -> torch.Tensor:
    """N(0, std^2) tensor of the full shape, a pure function of (seed, name, shape)."""
    return torch.randn(shape, generator=generator(seed, name), dtype=torch.float32) * std
