"""Canonical Huffman coding of small-alphabet integer streams (Deep Compression, Han et al. 2016, Sec. 4).

The code is ours: :func:`huffman_code_lengths` builds optimal code lengths from symbol frequencies, and
:func:`canonical_codes` turns lengths into the canonical code, so a file only stores one length per
symbol. bitarray does the bit-level encoding and decoding.
"""

from __future__ import annotations

import heapq
from itertools import islice

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode

__all__ = ["huffman_code_lengths", "canonical_codes", "huffman_encode", "huffman_decode", "encoded_bits"]


def huffman_code_lengths(freqs: np.ndarray) -> np.ndarray:
    """Optimal prefix-code length per symbol (0 for symbols that never occur). Shape: (n_symbols,).

    A single used symbol gets length 1. Ties are broken by symbol index, so the result is deterministic.
    """
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(freqs.size, dtype=np.int64)
    used = np.flatnonzero(freqs)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    heap: list[tuple[int, int, list[int]]] = [(int(freqs[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        f1, k1, s1 = heapq.heappop(heap)
        f2, k2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, min(k1, k2), s1 + s2))
    return lengths


def canonical_codes(lengths: np.ndarray) -> dict[int, bitarray]:
    """Canonical Huffman code for the given lengths: symbols sorted by (length, symbol) get consecutive codes."""
    order = sorted((int(n), int(s)) for s, n in enumerate(lengths) if n > 0)
    codes: dict[int, bitarray] = {}
    code, prev = 0, order[0][0] if order else 0
    for n, s in order:
        code <<= n - prev
        prev = n
        codes[s] = bitarray(format(code, f"0{n}b"))
        code += 1
    return codes


def encoded_bits(symbols: np.ndarray, lengths: np.ndarray) -> int:
    """Length in bits of the Huffman-coded stream."""
    return int(lengths[np.asarray(symbols, dtype=np.int64)].sum()) if len(symbols) else 0


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Encode ``symbols`` (ints < len(lengths)) with the canonical code of ``lengths``; zero-padded bytes."""
    codes = canonical_codes(lengths)
    out = bitarray()
    out.encode(codes, [int(s) for s in symbols])
    return out.tobytes()


def huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols written by :func:`huffman_encode` with the same ``lengths``.

    Raises:
        ValueError: the stream ends early or holds an invalid code (a corrupt file).
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    maxlen = int(lengths.max())
    count_per_len = [0] * (maxlen + 1)
    for n in lengths[lengths > 0]:
        count_per_len[int(n)] += 1
    symbol = [int(s) for n, s in sorted((int(n), int(s)) for s, n in enumerate(lengths) if n > 0)]
    a = bitarray()
    a.frombytes(data)
    try:
        got = list(islice(canonical_decode(a, count_per_len, symbol), count))
    except ValueError as e:
        raise ValueError(f"huffman_decode: corrupt stream ({e}).") from e
    if len(got) < count:
        raise ValueError(f"huffman_decode: stream ended after {len(got)} of {count} symbols.")
    return np.asarray(got, dtype=np.int64)
