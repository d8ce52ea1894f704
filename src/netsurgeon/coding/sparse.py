"""Relative-index sparse coding (Han, Mao, Dally 2016, "Deep Compression", arXiv:1510.00149, Sec. 2, Fig. 2).

A sparse vector is stored as pairs (gap, value): ``gap`` is the distance from the previous stored entry,
written in a fixed number of bits. A distance that does not fit is bridged with *filler* entries, i.e. a
zero value placed 2**bits positions ahead ("when the index difference exceeds the bound, we add a filler
zero"). A stored gap g in [0, 2**bits) means a step of g + 1 positions; the first step starts at -1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode_relative", "decode_relative", "relative_entries", "best_index_bits"]


def relative_entries(positions: np.ndarray, bits: int) -> int:
    """How many entries (nonzeros + fillers) :func:`encode_relative` produces for sorted ``positions``."""
    if positions.size == 0:
        return 0
    steps = np.diff(positions, prepend=-1)
    return int(positions.size + ((steps - 1) >> bits).sum())


def encode_relative(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode a 1-D array's nonzeros as ``(gaps, values)`` with ``bits``-bit gaps and filler zeros.

    Returns gaps (uint32, each < 2**bits) and values (same dtype as ``flat``), of equal length.
    """
    positions = np.flatnonzero(flat)
    steps = np.diff(positions, prepend=-1)                 # >= 1
    span = 1 << bits
    fillers = (steps - 1) // span                           # filler entries needed before each nonzero
    last_gap = steps - fillers * span - 1                    # in [0, span)
    counts = fillers + 1
    gaps = np.full(int(counts.sum()), span - 1, dtype=np.uint32)
    values = np.zeros(gaps.size, dtype=flat.dtype)
    ends = np.cumsum(counts) - 1                             # the real entry closes each group
    gaps[ends] = last_gap
    values[ends] = flat[positions]
    return gaps, values


def decode_relative(gaps: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`encode_relative` into a dense array of ``size`` entries.

    Raises:
        ValueError: the gaps run past ``size`` or lengths differ (a corrupt stream).
    """
    if gaps.shape != values.shape:
        raise ValueError(f"decode_relative: {gaps.size} gaps but {values.size} values.")
    out = np.zeros(size, dtype=values.dtype)
    if gaps.size == 0:
        return out
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if positions[-1] >= size:
        raise ValueError(f"decode_relative: index {int(positions[-1])} is outside a tensor of {size} entries.")
    out[positions] = values
    return out


def best_index_bits(flat: np.ndarray, value_bits: int, max_bits: int = 16) -> tuple[int, int]:
    """The gap width in [1, max_bits] that makes the encoded stream smallest: ``(bits, total_bits)``."""
    positions = np.flatnonzero(flat)
    best = (1, -1)
    for b in range(1, max_bits + 1):
        total = relative_entries(positions, b) * (b + value_bits)
        if best[1] < 0 or total < best[1]:
            best = (b, total)
    return best
