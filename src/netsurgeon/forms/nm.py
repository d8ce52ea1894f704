"""The ``nm`` form: N:M structured sparsity (N of every M consecutive inputs of a row kept; NVIDIA's 2:4 pattern,
Mishra et al. 2021, arXiv:2104.08378; the pattern SparseGPT, Wanda and ``magnitude`` leave with ``pattern="N:M"``).

A plain (masked) tensor is written in this form when it is the smallest: viewed as (rows, inputs) (a convolution's
input channels x kernel, as the pruning methods group them), every group of M consecutive inputs holds at most N
nonzeros. In the file: the N kept values of every group (row-major, groups in order; a group with fewer nonzeros
keeps zeros at unused positions) in the record's value dtype, and each one's position 0..M-1 within its group,
bit-packed at ceil(log2 M) bits. Record fields ``n`` and ``m``. The runtime reads it as
``kernels.sparse_linear.NMLinear`` (values and unpacked positions), no dense copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.bits import pack_bits, packed_size, unpack_bits
from ..coding.container import NszError
from ..coding.schema import VALUE_ITEMSIZE, TensorRecord, need_blob
from . import EncodeOptions, Form, chain, register_form, value_array

__all__ = ["NM", "nm_layout", "nm_pattern", "MIN_KERNEL_WEIGHTS"]

_MS = (4, 8, 16)
MIN_KERNEL_WEIGHTS = 1 << 16  # below this a vector kernel's fixed cost (~7 us a call) outweighs what it skips


def nm_pattern(matrix: np.ndarray) -> tuple[int, int] | None:
    """The (N, M) with M in (4, 8, 16), N <= M/2, that the (rows, inputs) ``matrix`` satisfies with the fewest kept
    values per input (the smallest N/M), or None."""
    rows, cols = matrix.shape
    best = None
    for m in _MS:
        if cols % m or cols < m:
            continue
        n = int((matrix.reshape(rows, cols // m, m) != 0).sum(2).max(initial=0))
        if 1 <= n and 2 * n <= m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def nm_layout(matrix: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept values (rows, inputs·N/M) and their positions (uint8, same shape) of an N:M ``matrix``: each group's
    nonzeros in order, then zeros at its first unused positions."""
    rows, cols = matrix.shape
    g = matrix.reshape(rows, cols // m, m)
    # nonzeros first (stable: in position order), then the unused positions in order
    order = np.argsort(g == 0, axis=2, kind="stable")[:, :, :n]
    pos = np.sort(order, axis=2)
    return np.take_along_axis(g, pos, 2).reshape(rows, -1), pos.reshape(rows, -1).astype(np.uint8)


@register_form
class NM(Form):
    codec = "nm"
    weight_form = "float"
    text = "float weights"
    runtime_names = ("nm",)
    value_dtypes = ("float32", "float16")
    fields = {"n": (1, 16, None), "m": (2, 16, None)}
    preference = 40  # on equal bytes, the layout the runtime reads directly

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]] | None:
        if not value.is_floating_point() or value.dim() < 2 or value.numel() == 0:
            return None
        vals = value_array(name, value, opts.value_dtype).reshape(value.shape[0], -1)
        pattern = nm_pattern(vals)
        if pattern is None:
            return None
        n, m = pattern
        kept, pos = nm_layout(vals, n, m)
        bits = max(1, math.ceil(math.log2(m)))
        packed = pack_bits(pos.ravel().astype(np.int64), bits)
        rec = TensorRecord(name, tuple(value.shape), self.codec, opts.value_dtype, bits, vals.size,
                           int(np.count_nonzero(kept)), kept.size, kept.nbytes + len(packed), extra={"n": n, "m": m})
        return rec, {f"{name}/values": kept.tobytes(), f"{name}/positions": packed}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        n, m = rec.extra["n"], rec.extra["m"]
        rows = rec.shape[0] if len(rec.shape) >= 2 else 0
        cols = rec.numel // rows if rows else 0
        bits = max(1, math.ceil(math.log2(m)))
        if not rows or n > m or cols % m or rec.entries != rows * cols // m * n or rec.index_bits != bits:
            raise NszError(f"{where}: an nm record needs a shape of 2+ dimensions whose inputs are a multiple of m, "
                           f"n <= m, entries = numel·n/m and index_bits = ceil(log2 m); got shape {list(rec.shape)}, "
                           f"n {n}, m {m}, entries {rec.entries}, index_bits {rec.index_bits}.")
        return [need_blob(where, rec, blobs, "values", rec.entries * VALUE_ITEMSIZE[rec.value_dtype]),
                need_blob(where, rec, blobs, "positions", packed_size(rec.entries, bits))]

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        n, m = rec.extra["n"], rec.extra["m"]
        rows = rec.shape[0]
        cols = rec.numel // rows
        dt = np.float16 if rec.value_dtype == "float16" else np.float32
        kept = np.frombuffer(blobs[f"{rec.name}/values"], dtype=dt).astype(np.float32).reshape(rows, cols // m, n)
        pos = unpack_bits(blobs[f"{rec.name}/positions"], rec.entries, rec.index_bits).astype(np.int64)
        pos = pos.reshape(rows, cols // m, n)
        if pos.size and int(pos.max()) >= m:
            raise NszError(f"{where}: a position is {int(pos.max())}, outside its group of {m}.")
        if n > 1 and np.any(np.diff(np.sort(pos, 2), axis=2) == 0):
            raise NszError(f"{where}: a group lists the same position twice.")
        out = np.zeros((rows, cols // m, m), np.float32)
        np.put_along_axis(out, pos, kept, 2)
        return torch.from_numpy(out).reshape(rec.shape)

    def describe(self, rec: TensorRecord) -> str:
        return f"nm {rec.extra['n']}:{rec.extra['m']}"

    def linear_candidates(self, layers, relus, names, density):
        """Each layer on ``NMLinear`` (vector kernels reading the kept values and their positions), when every
        layer of the run is N:M and large enough for the kernel's fixed cost to pay."""
        from ..kernels import simd
        from ..kernels.sparse_linear import NMLinear

        if not simd.available() or sum(m.weight.numel() for m in layers) < MIN_KERNEL_WEIGHTS:
            return {}
        mods = []
        for m, relu in zip(layers, relus, strict=True):
            w = m.weight.detach().float().cpu().numpy()
            pattern = nm_pattern(w)
            if pattern is None:
                return {}
            kept, pos = nm_layout(w, *pattern)
            bias = None if m.bias is None else m.bias.detach().float().cpu().numpy()
            mods.append(NMLinear.from_layout(kept, pos, *pattern, bias, "relu" if relu else None))
        return {"nm": chain(mods, [False] * len(mods))}
