"""The index and sign hashes of HashedNets (``sharing/hashed.py``), here because the ``.nsz`` reader rebuilds a
hashed tensor from its real weights and seed without importing the method."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["hash_maps"]

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective 64-bit mixer (every input bit affects every output bit)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def hash_maps(shape: tuple[int, ...], buckets: int, seed: int) -> tuple[Tensor, Tensor]:
    """(h, ξ) for every position of a tensor of ``shape``: bucket indices (int64, in [0, buckets)) and signs
    (float32 ±1), both of ``shape``; a pure function of (shape, buckets, seed)."""
    if buckets < 1:
        raise ValueError(f"hash_maps: need at least one bucket; got {buckets}.")
    n = math.prod(shape)
    pos = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _mix(pos * np.uint64(2) + np.uint64(seed) * _GOLDEN)
        idx = (_mix(base ^ np.uint64(0x1D)) % np.uint64(buckets)).astype(np.int64)
        sign = np.where((_mix(base ^ np.uint64(0x51)) >> np.uint64(63)) == 1, 1.0, -1.0).astype(np.float32)
    return torch.from_numpy(idx).reshape(shape), torch.from_numpy(sign).reshape(shape)
