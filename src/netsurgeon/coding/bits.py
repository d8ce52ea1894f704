"""Fixed-width bit packing of unsigned integers (little-endian bit order inside each byte)."""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "packed_size"]


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take once packed."""
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ints, each < 2**bits, into ``packed_size(len(values), bits)`` bytes.

    Raises:
        ValueError: ``bits`` outside [1, 32] or a value that does not fit.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"pack_bits: bits must be in [1, 32]; got {bits}.")
    v = np.asarray(values, dtype=np.uint64).ravel()
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"pack_bits: value {int(v.max())} does not fit in {bits} bits.")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)  # (n, bits)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``bits`` bits as uint32.

    Raises:
        ValueError: ``data`` is shorter than ``count`` values need.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"unpack_bits: bits must be in [1, 32]; got {bits}.")
    need = packed_size(count, bits)
    if len(data) < need:
        raise ValueError(f"unpack_bits: {count} values of {bits} bits need {need} bytes; got {len(data)}.")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=need), count=count * bits,
                         bitorder="little")
    planes = flat.reshape(count, bits).astype(np.uint64)
    return (planes << np.arange(bits, dtype=np.uint64)).sum(axis=1).astype(np.uint32)
