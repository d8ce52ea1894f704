"""Sparse Linear layers that compute from their nonzeros only: unstructured (CSR in the file) and N:M.

Both run on one resident layout, a *windowed sliced ELL* (after sliced ELL, Kreutzer et al. 2014, "A unified
sparse matrix data format for efficient general sparse matrix-vector multiplication on modern processors with
wide SIMD units", SIAM J. Sci. Comput. 36(5)):

- the output rows are taken 16 at a time (a *chunk*; lane l of chunk c is row ``16c + l``);
- the inputs are cut into *windows* of ``W`` = 32 or 64 consecutive inputs, window b starting at input
  ``b * stride``; x is copied once per call into a zero-padded buffer so that every window is in bounds;
- for each (chunk, window) the nonzeros of each of the 16 rows inside that window are listed in *slots*: slot
  s holds the s-th nonzero of every lane, as 16 float32 values (``vals``) and 16 uint8 offsets of their
  inputs within the window (``offs``); lanes with fewer nonzeros are padded with value 0. ``counts[c, b]``
  slots per (chunk, window), ``chunk_slot[c]`` the first slot of chunk c (slots are stored chunk by chunk,
  window by window).

Batch 1: a chunk holds its 16 sums in one register; for each window the W inputs are loaded into W/16
registers and each slot costs one permute (``vpermi2ps``; two and a blend for W = 64) that hands every lane
its input, and one FMA (simd.py). No gather: Zen 4's ``vgatherdps`` reads about one element per cycle, the
permute 16. Chunks run in parallel (``prange``). A batch runs the same loop for two samples at a time inside
a chunk (the chunk's slots are read once per pair and stay in cache between pairs), so the time grows with the
batch; a kernel with x transposed (every nonzero adding ``v * x[c, 16 samples]``) was slower here at batches
up to 16 (3 ns per nonzero and 16 samples: a data-dependent loop per row and window).

Unstructured (``SparseLinear``): windows of 64 inputs (``stride = 64``). Padding: at 90% random sparsity a
row holds Binomial(64, 0.1) nonzeros in a window and the chunk pays the largest of 16, 1.70x the nonzeros
(32-input windows: 2.0x; rows sorted by their count first: 1.67x, not worth a permutation of the output).
Resident bytes are then 5 x 1.70 = 8.5 bytes per nonzero against the ``.nsz`` file's 4.7 at 90% (the default
``sparse`` codec: float32 value + a 5-7-bit relative gap, fillers included; ``file_bytes`` counts it exactly):
1.8x, over issue 38's bound of 1.5x (``MEMORY_BOUND``). Then the *hybrid* layout (after the HYB format of Bell
and Garland 2009, "Implementing sparse matrix-vector multiplication on throughput-oriented processors", SC'09:
ELL for the regular part, a list for the rest): each (chunk, window) holds at most ``cap`` slots, and a row's
further nonzeros in that window go to its chunk's *spill* slots, 16 (uint16 column, float32 value) pairs each,
padded to the chunk's longest spill and read with one ``vgatherdps`` of x per slot after the windows. ``cap``
minimizes window slots + ``GATHER_SLOT_COST`` (5) x spill slots among the caps within the bound (the cost ratio
from the gather layout below: 3x slower per nonzero than the windows' 1.7 slots). At 90%, 768 -> 3072 and back:
cap 8, 1.25 window slots + 0.11-0.15 spill slots per nonzero, 1.44-1.50x the file; by that cost model 4-16% more
kernel time than the full windows (not timed yet: bench/kernels_micro.py, bench/runtime_real.py re-time it;
``layout="window"`` forces the old form). Where no cap fits either (very sparse layers, or very uneven rows), the
layer runs a plain 16-lane sliced ELL with ``vgatherdps`` (rows sorted by length, ~1.0x padding; one gather of x
per slot; 3x slower per nonzero than the window form at 90%).

N:M (``NMLinear``, N of every M consecutive inputs kept, M <= 16; 2:4 is the common case): windows hold whole
groups, ``W = 32`` when M divides 32 (2:4, 4:8, 8:16, 1:2) else 64, ``stride = M * floor(W / M)``; every row has
exactly N entries per group, so a window has ``N * W / M`` slots and no padding. Slot s of window b is kept
value ``k = b * N * (stride / M) + s`` of every row (the file's row-major group order), its offset
``(s // N) * M + idx[row, k]``. Resident: 4 + 1 bytes per kept value against the file's float32 value and
``ceil(log2 M)`` bits of position (2:4: 4.25 bytes): 1.18x.

Bounds at batch 1 (bytes read): dense float32 reads 4 bytes per weight; 90% unstructured 0.1 x 8.5 = 0.85
(4.7x fewer; hybrid at cap 8: 0.1 x 6.9 = 0.69, 5.8x; the CSR file's 0.6 would be 6.7x), 2:4 0.5 x 5 = 2.5
(1.6x fewer). Once the weights sit in L2
(1.4 MB for a 768 x 3072 layer at 90%), the permutes are the bound, not the bytes. At larger batches: FLOPs,
10x fewer at 90%, 2x at 2:4. Measured: bench/kernels_micro.py, docs/runtime.md ("Kernels for N:M, int4 and
sparse convolutions").
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused as kernels
from . import simd

__all__ = ["SparseLinear", "NMLinear"]

log = logging.getLogger(__name__)

LANES = 16
_ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


_launched = [False]


def sync_threads() -> None:
    """numba's worker count follows torch's (``kernels.set_threads``). The first time, numba's threading layer is
    started before reading torch's count: starting it calls ``omp_set_num_threads`` with numba's pool size in the
    OpenMP runtime torch shares (numba's omp layer binds to torch's libgomp here), which would silently turn a
    process set to 1 torch thread into 2 (measured: ``torch.get_num_threads()`` read 2 after the first call)."""
    if not _launched[0]:
        n = torch.get_num_threads()
        kernels.set_threads(n)  # starts numba's threads (and resets OpenMP's count)
        torch.set_num_threads(n)
        _launched[0] = True
    kernels.set_threads(torch.get_num_threads())


def check_activation(owner: str, activation: str | None) -> str | None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {_ACTIVATIONS}; got {activation!r}.")
    return activation


def apply_activation(y: Tensor, activation: str | None) -> Tensor:
    """The activations that are not fused into a kernel: GELU goes through torch's vectorized GELU on the
    output (an accurate vector erf/tanh in numba would cost more than the ~3 us torch takes for 3072 values)."""
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def as_input(owner: str, x: Tensor, n_in: int) -> np.ndarray:
    """``x`` (..., n_in) as a C-contiguous float32 (B, n_in) numpy array (a view when it already is one). The
    checks are made on the numpy side: each torch attribute read costs ~0.3 us, a layer call here ~40 us."""
    try:
        xn = x.numpy()
    except RuntimeError:  # a tensor that requires grad
        xn = x.detach().numpy()
    if xn.dtype != np.float32 or not xn.flags.c_contiguous:
        xn = np.ascontiguousarray(xn, dtype=np.float32)
    if xn.ndim != 2:
        xn = xn.reshape(-1, xn.shape[-1]) if xn.ndim else xn.reshape(1, 1)
    if xn.shape[1] != n_in:
        raise ValueError(f"{owner}: expected input of shape (..., {n_in}); got {tuple(x.shape)}.")
    return xn


class Buffers:
    """Per-module scratch arrays reused across calls (zero-padded input copies, the kernels' scratch), one set
    per calling thread and batch size, so concurrent calls of one module never share one."""

    def __init__(self) -> None:
        self._arrays: dict[tuple, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = (threading.get_ident(), name, shape)
        a = self._arrays.get(key)
        if a is None:
            if len(self._arrays) > 64:  # many batch sizes or threads: start over rather than grow
                self._arrays.clear()
            a = self._arrays[key] = np.zeros(shape, np.float32)
        return a


class _WindowedSell:
    """The arrays of the windowed sliced-ELL layout (module docstring)."""

    def __init__(self, n_in: int, n_out: int, width: int, stride: int, counts: np.ndarray, vals: np.ndarray,
                 offs: np.ndarray, bias: np.ndarray | None,
                 spill: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        self.n_in, self.n_out, self.width, self.stride = n_in, n_out, width, stride
        self.n_chunks, self.n_windows = counts.shape
        self.counts = np.ascontiguousarray(counts, dtype=np.uint8)
        slots = self.counts.sum(1, dtype=np.int64)
        self.chunk_slot = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
        self.vals = np.ascontiguousarray(vals, dtype=np.float32).reshape(-1)
        self.offs = np.ascontiguousarray(offs, dtype=np.uint8).reshape(-1)
        self.bias = np.zeros(self.n_chunks * LANES, np.float32)
        if bias is not None:
            self.bias[:n_out] = bias
        self.x_len = (self.n_windows - 1) * stride + width
        # spill (hybrid layout): per chunk, slots of 16 (column, value) pairs, one gather of x each
        spill_len, cols, svals = spill if spill is not None else (
            np.zeros(self.n_chunks, np.int64), np.zeros(0, _col_dtype(n_in)), np.zeros(0, np.float32))
        self.spill_slot = np.concatenate([[0], np.cumsum(spill_len, dtype=np.int64)]).astype(np.int64)
        self.spill_cols = np.ascontiguousarray(cols).reshape(-1)
        self.spill_vals = np.ascontiguousarray(svals, dtype=np.float32).reshape(-1)
        self.spilled = bool(self.spill_vals.size)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.counts, self.chunk_slot, self.vals, self.offs, self.bias)) + \
            (sum(a.nbytes for a in (self.spill_slot, self.spill_cols, self.spill_vals)) if self.spilled else 0)

    def to_dense(self) -> np.ndarray:
        """The dense (n_out, n_in) weight (padding entries hold 0 and add nothing)."""
        n_slots = int(self.chunk_slot[-1])
        chunk = np.repeat(np.repeat(np.arange(self.n_chunks), self.n_windows), self.counts.reshape(-1))
        window = np.repeat(np.tile(np.arange(self.n_windows), self.n_chunks), self.counts.reshape(-1))
        rows = (chunk[:, None] * LANES + np.arange(LANES)).reshape(-1)
        cols = (window[:, None] * self.stride + self.offs.reshape(n_slots, LANES)).reshape(-1)
        w = np.zeros((self.n_chunks * LANES, self.x_len), np.float32)
        np.add.at(w, (rows, cols), self.vals)
        if self.spilled:
            chunk = np.repeat(np.arange(self.n_chunks), np.diff(self.spill_slot))
            rows = (chunk[:, None] * LANES + np.arange(LANES)).reshape(-1)
            np.add.at(w, (rows, self.spill_cols.astype(np.int64)), self.spill_vals)
        return w[:self.n_out, :self.n_in]


class _GatherSell:
    """Sliced ELL with the column of every entry (uint16 / int32), rows sorted by length: the layout for layers
    whose windowed form would be padded beyond the memory bound (module docstring)."""

    def __init__(self, n_in: int, n_out: int, rows_by_length: np.ndarray, lengths: np.ndarray,
                 cols: np.ndarray, vals: np.ndarray, bias: np.ndarray | None) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.row_of = np.full(((n_out + LANES - 1) // LANES) * LANES, -1, np.int16 if n_out < 1 << 15 else np.int32)
        self.row_of[:n_out] = rows_by_length
        self.n_chunks = self.row_of.size // LANES
        self.chunk_len = np.ascontiguousarray(lengths, dtype=np.int32)
        self.chunk_slot = np.concatenate([[0], np.cumsum(self.chunk_len, dtype=np.int64)]).astype(np.int64)
        self.cols = cols
        self.vals = np.ascontiguousarray(vals, dtype=np.float32).reshape(-1)
        self.bias = np.zeros(n_out, np.float32) if bias is None else np.asarray(bias, np.float32).copy()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.row_of, self.chunk_len, self.chunk_slot, self.cols, self.vals,
                                      self.bias))

    def to_dense(self) -> np.ndarray:
        chunk = np.repeat(np.arange(self.n_chunks), self.chunk_len)
        rows = self.row_of[(chunk[:, None] * LANES + np.arange(LANES)).reshape(-1)]
        keep = rows >= 0
        w = np.zeros((self.n_out, self.n_in), np.float32)
        np.add.at(w, (rows[keep], self.cols[keep].astype(np.int64)), self.vals[keep])
        return w


def _col_dtype(n_in: int) -> type:
    return np.uint16 if n_in <= 1 << 16 else np.int32


def _window_counts(n_in: int, n_out: int, width: int, stride: int, cols_per_row: list[np.ndarray]
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(chunks, lanes, windows) nonzeros of each row in each window, and each row's window per nonzero."""
    n_chunks = (n_out + LANES - 1) // LANES
    n_windows = max(1, math.ceil(max(n_in - width, 0) / stride) + 1) if n_in > 0 else 1
    per_lane = np.zeros((n_chunks * LANES, n_windows), np.int64)
    window_of = [np.minimum(c // stride, n_windows - 1) for c in cols_per_row]
    for r in range(n_out):
        per_lane[r] = np.bincount(window_of[r], minlength=n_windows)
    return per_lane.reshape(n_chunks, LANES, n_windows), window_of


GATHER_SLOT_COST = 5  # a spilled slot (vgatherdps) against a window slot (vpermi2ps): see the module docstring


def best_cap(per_lane: np.ndarray, n_in: int, limit: float | None) -> int | None:
    """The slot cap per (chunk, window) of the hybrid layout that minimizes window slots + GATHER_SLOT_COST x spill
    slots among those whose bytes stay within ``limit`` (None: any), or None if none does (or none is below the
    full layout's largest count)."""
    top = int(per_lane.max(initial=0))
    col = np.dtype(_col_dtype(n_in)).itemsize
    best = None
    for k in range(1, top):
        ell = int(np.minimum(per_lane.max(1), k).sum())
        spill = int(np.maximum(per_lane - k, 0).sum(2).max(1).sum())
        size = LANES * (5 * ell + (4 + col) * spill)
        cost = ell + GATHER_SLOT_COST * spill
        if (limit is None or size <= limit) and (best is None or cost < best[0]):
            best = (cost, k)
    return None if best is None else best[1]


def _windowed_from_lists(n_in: int, n_out: int, width: int, stride: int, cols_per_row: list[np.ndarray],
                         vals_per_row: list[np.ndarray], bias, cap: int | None = None,
                         counted: tuple[np.ndarray, list[np.ndarray]] | None = None) -> _WindowedSell:
    """Lay rows' (sorted) nonzeros out in windows (every column must lie in ``[0, n_in)``); with ``cap``, at most
    ``cap`` slots per (chunk, window), a row's further nonzeros in that window spilled to its chunk's gather
    slots (the hybrid layout)."""
    per_lane, window_of = counted or _window_counts(n_in, n_out, width, stride, cols_per_row)
    n_chunks, _, n_windows = per_lane.shape
    counts = per_lane.max(1) if cap is None else np.minimum(per_lane.max(1), cap)
    total = int(counts.sum())
    vals = np.zeros((total, LANES), np.float32)
    offs = np.zeros((total, LANES), np.uint8)
    slot_base = np.concatenate([[0], np.cumsum(counts.reshape(-1))])[:-1].reshape(n_chunks, n_windows)
    spill = None
    if cap is not None:
        spill_len = np.maximum(per_lane - cap, 0).sum(2).max(1)
        spill_base = np.concatenate([[0], np.cumsum(spill_len)])
        scols = np.zeros((int(spill_len.sum()), LANES), _col_dtype(n_in))
        svals = np.zeros((int(spill_len.sum()), LANES), np.float32)
        spill = (spill_len, scols, svals)
    for r in range(n_out):
        c, lane = divmod(r, LANES)
        cols, w = cols_per_row[r], window_of[r]
        if cols.size == 0:
            continue
        first = np.searchsorted(w, np.arange(n_windows))  # cols are sorted, so windows are too
        rank = np.arange(cols.size) - first[w]
        keep = rank < counts[c, w]
        at = slot_base[c, w[keep]] + rank[keep]
        vals[at, lane] = vals_per_row[r][keep]
        offs[at, lane] = cols[keep] - w[keep] * stride
        if spill is not None and not keep.all():
            k = int((~keep).sum())
            scols[spill_base[c]:spill_base[c] + k, lane] = cols[~keep]
            svals[spill_base[c]:spill_base[c] + k, lane] = vals_per_row[r][~keep]
    return _WindowedSell(n_in, n_out, width, stride, counts, vals, offs, bias, spill)


MEMORY_BOUND = 1.5  # resident bytes at most this many times the file's (issue 38)


def _sparse_file_bytes(rowptr: np.ndarray, cols: np.ndarray, n_in: int, n_out: int) -> int:
    """Bytes of an (n_out, n_in) float32 weight with these CSR nonzeros in the ``.nsz`` file's smaller plain form:
    ``sparse`` (best gap width 1..16 bits, float32 values and filler entries) or ``dense``."""
    from ..coding.sparse import relative_entries

    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(rowptr))
    positions = np.sort(rows * n_in + cols)
    best = 4 * n_in * n_out
    for bits in range(1, 17):
        entries = relative_entries(positions, bits)
        best = min(best, (entries * bits + 7) // 8 + 4 * entries)
    return best


def _gather_from_lists(n_in: int, n_out: int, cols_per_row, vals_per_row, bias) -> _GatherSell:
    lengths = np.array([c.size for c in cols_per_row], np.int64)
    order = np.argsort(-lengths, kind="stable").astype(np.int32)
    n_chunks = (n_out + LANES - 1) // LANES
    chunk_len = np.array([lengths[order[c * LANES:(c + 1) * LANES]].max(initial=0) for c in range(n_chunks)])
    col_dtype = _col_dtype(n_in)
    total = int(chunk_len.sum())
    cols = np.zeros((total, LANES), col_dtype)
    vals = np.zeros((total, LANES), np.float32)
    base = np.concatenate([[0], np.cumsum(chunk_len)])
    for i, r in enumerate(order):
        c, lane = divmod(i, LANES)
        k = lengths[r]
        cols[base[c]:base[c] + k, lane] = cols_per_row[r]
        vals[base[c]:base[c] + k, lane] = vals_per_row[r]
    return _GatherSell(n_in, n_out, order, chunk_len, cols.reshape(-1), vals, bias)


# ---- kernels -------------------------------------------------------------------------------------------------

if simd.available():
    from numba import njit, prange

    from .simd import iload, vadd, vfma, vgather, vload, vmax, vsel2, vsel4, vstore, vzero

    @njit(fastmath=True, boundscheck=False, inline="always")
    def _select(width, x0, x1, x2, x3, o):
        """Lane i gets input ``o[i]`` of the window ``x0 ++ x1 (++ x2 ++ x3)``; ``width`` is a compile-time constant
        in the kernels (a closure's value), so the other branch folds away."""
        return vsel4(x0, x1, x2, x3, o) if width == 64 else vsel2(x0, x1, o)

    def _make_window_kernel(width: int):
        """The loop over a windowed layout of ``width`` 32 or 64 (module docstring), samples two at a time (the
        slot's values and offsets are loaded once for both: 12% faster per sample than one at a time). The closure
        holds only the int ``width``: numba's cache keys on it, and a closed-over function would change the key
        in every process (no caching)."""

        @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
        def run(xp, counts, chunk_slot, vals, offs, bias, relu, stride, out, scratch, spill_slot, spill_cols,
                spill_vals):
            n_samples, n_out = out.shape
            n_chunks, n_windows = counts.shape
            ld = xp.shape[1]  # xp has 32 spare inputs after the last window: W = 32 loads four registers too
            for c in prange(n_chunks):
                for t in range(0, n_samples - 1, 2):
                    a, a2, b, b2 = vload(bias, c * 16), vzero(), vload(bias, c * 16), vzero()
                    q = chunk_slot[c] * 16
                    for w in range(n_windows):
                        n = counts[c, w]
                        at = t * ld + w * stride
                        x0, x1, x2, x3 = vload(xp, at), vload(xp, at + 16), vload(xp, at + 32), vload(xp, at + 48)
                        at += ld
                        y0, y1, y2, y3 = vload(xp, at), vload(xp, at + 16), vload(xp, at + 32), vload(xp, at + 48)
                        s = 0
                        while s + 2 <= n:  # two sums per sample: an FMA's latency exceeds a slot's throughput
                            v, o, v2, o2 = vload(vals, q), iload(offs, q), vload(vals, q + 16), iload(offs, q + 16)
                            a = vfma(v, _select(width, x0, x1, x2, x3, o), a)
                            b = vfma(v, _select(width, y0, y1, y2, y3, o), b)
                            a2 = vfma(v2, _select(width, x0, x1, x2, x3, o2), a2)
                            b2 = vfma(v2, _select(width, y0, y1, y2, y3, o2), b2)
                            q += 32
                            s += 2
                        if s < n:
                            v, o = vload(vals, q), iload(offs, q)
                            a = vfma(v, _select(width, x0, x1, x2, x3, o), a)
                            b = vfma(v, _select(width, y0, y1, y2, y3, o), b)
                            q += 16
                    p, p1 = spill_slot[c] * 16, spill_slot[c + 1] * 16  # hybrid layout: spilled nonzeros
                    while p < p1:
                        v = vload(spill_vals, p)
                        a = vfma(v, vgather(xp, t * ld, spill_cols, p), a)
                        b = vfma(v, vgather(xp, (t + 1) * ld, spill_cols, p), b)
                        p += 16
                    a, b = vadd(a, a2), vadd(b, b2)
                    if relu:
                        a, b = vmax(a, vzero()), vmax(b, vzero())
                    _store_lanes(out, t, c, a, scratch)
                    _store_lanes(out, t + 1, c, b, scratch)
                if n_samples % 2:
                    t = n_samples - 1
                    a, a2 = vload(bias, c * 16), vzero()
                    q = chunk_slot[c] * 16
                    for w in range(n_windows):
                        n = counts[c, w]
                        at = t * ld + w * stride
                        x0, x1, x2, x3 = vload(xp, at), vload(xp, at + 16), vload(xp, at + 32), vload(xp, at + 48)
                        s = 0
                        while s + 2 <= n:
                            a = vfma(vload(vals, q), _select(width, x0, x1, x2, x3, iload(offs, q)), a)
                            a2 = vfma(vload(vals, q + 16), _select(width, x0, x1, x2, x3, iload(offs, q + 16)), a2)
                            q += 32
                            s += 2
                        if s < n:
                            a = vfma(vload(vals, q), _select(width, x0, x1, x2, x3, iload(offs, q)), a)
                            q += 16
                    p, p1 = spill_slot[c] * 16, spill_slot[c + 1] * 16
                    while p < p1:
                        a = vfma(vload(spill_vals, p), vgather(xp, t * ld, spill_cols, p), a)
                        p += 16
                    a = vadd(a, a2)
                    if relu:
                        a = vmax(a, vzero())
                    _store_lanes(out, t, c, a, scratch)

        return run

    @njit(inline="always", boundscheck=False)
    def _store_lanes(out, t, c, a, scratch):
        """Row ``t``'s outputs ``16c .. 16c + 15`` (fewer in a last, partial chunk)."""
        n_out = out.shape[1]
        if (c + 1) * 16 <= n_out:
            vstore(out, t * n_out + c * 16, a)
        else:
            vstore(scratch, c * 16, a)
            for lane in range(n_out - c * 16):
                out[t, c * 16 + lane] = scratch[c * 16 + lane]

    _WINDOW32 = _make_window_kernel(32)
    _WINDOW64 = _make_window_kernel(64)

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _gather_kernel(x, row_of, chunk_len, chunk_slot, cols, vals, bias, relu, out, scratch):
        """Sliced ELL with one 16-wide gather of x per slot (rows sorted by length, any batch: per sample)."""
        n_samples, n_out = out.shape
        n_chunks = chunk_len.shape[0]
        n_in = x.shape[1]
        for c in prange(n_chunks):
            for t in range(n_samples):
                a = vzero()
                a2 = vzero()
                q = chunk_slot[c] * 16
                n = chunk_len[c]
                s = 0
                while s + 2 <= n:
                    a = vfma(vload(vals, q), vgather(x, t * n_in, cols, q), a)
                    a2 = vfma(vload(vals, q + 16), vgather(x, t * n_in, cols, q + 16), a2)
                    q += 32
                    s += 2
                if s < n:
                    a = vfma(vload(vals, q), vgather(x, t * n_in, cols, q), a)
                vstore(scratch, c * 16, vadd(a, a2))
                for lane in range(16):
                    r = row_of[c * 16 + lane]
                    if r >= 0:
                        v = scratch[c * 16 + lane] + bias[r]
                        out[t, r] = max(v, np.float32(0.0)) if relu else v


def _run_windowed(layout: _WindowedSell, xn: np.ndarray, relu: bool, buffers: Buffers) -> np.ndarray:
    n = xn.shape[0]
    out = np.empty((n, layout.n_out), np.float32)
    scratch = buffers.get("scratch", (layout.n_chunks * LANES,))
    xp = buffers.get("x", (n, layout.x_len + 32))  # zero past n_in, written below n_in on every call
    xp[:, :layout.n_in] = xn
    kernel = _WINDOW64 if layout.width == 64 else _WINDOW32
    kernel(xp, layout.counts, layout.chunk_slot, layout.vals, layout.offs, layout.bias, relu, layout.stride,
           out, scratch, layout.spill_slot, layout.spill_cols, layout.spill_vals)
    return out


def _run_gather(layout: _GatherSell, xn: np.ndarray, relu: bool, buffers: Buffers) -> np.ndarray:
    out = np.empty((xn.shape[0], layout.n_out), np.float32)
    scratch = buffers.get("scratch", (layout.n_chunks * LANES,))
    _gather_kernel(xn, layout.row_of, layout.chunk_len, layout.chunk_slot, layout.cols, layout.vals,
                   layout.bias, relu, out, scratch)
    return out


class _SparseBase(nn.Module):
    """Shared forward: numpy in, the layout's kernel, torch out; a dense fallback without AVX-512."""

    layout: _WindowedSell | _GatherSell
    activation: str | None

    def forward(self, x: Tensor) -> Tensor:
        if not self.native:
            y = F.linear(x.float(), self.to_dense(), None if self.bias_tensor is None else self.bias_tensor)
            return apply_activation(torch.relu(y) if self.activation == "relu" else y, self.activation)
        xn = as_input(type(self).__name__, x, self.in_features)
        sync_threads()
        relu = self.activation == "relu"
        run = _run_windowed if self.windowed else _run_gather
        y = apply_activation(torch.from_numpy(run(self.layout, xn, relu, self.scratch_buffers)), self.activation)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    @property
    def bias_tensor(self) -> Tensor | None:
        if not self.has_bias:
            return None
        b = self.layout.bias[:self.out_features]
        return torch.from_numpy(np.ascontiguousarray(b))

    def resident_bytes(self) -> int:
        return self.layout.nbytes()


class SparseLinear(_SparseBase):
    """``y = act(x Wᵀ + b)`` for an unstructured sparse W, computed from its nonzeros (module docstring).

    Build with :meth:`from_dense` (the nonzeros of a dense or masked weight) or :meth:`from_csr` (the file's
    CSR arrays). ``layout`` is ``"window"`` (default where it fits the memory bound) or ``"gather"``."""

    def __init__(self, n_in: int, n_out: int, rowptr: np.ndarray, cols: np.ndarray, values: np.ndarray,
                 bias: np.ndarray | None, activation: str | None = None, layout: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(n_in), int(n_out)
        self.activation = check_activation("SparseLinear", activation)
        self.has_bias = bias is not None
        self.native = simd.available()
        rowptr = np.asarray(rowptr, np.int64)
        cols = np.asarray(cols, np.int64)
        values = np.asarray(values, np.float32)
        if rowptr.shape != (self.out_features + 1,) or rowptr[0] != 0 or rowptr[-1] != cols.size or \
                cols.size != values.size or np.any(np.diff(rowptr) < 0):
            raise ValueError(f"SparseLinear: rowptr must have {self.out_features + 1} non-decreasing entries from 0 "
                             f"to nnz={cols.size} (values {values.size}); got {rowptr[:3]}...{rowptr[-1:]}.")
        if cols.size and (cols.min() < 0 or cols.max() >= self.in_features):
            raise ValueError(f"SparseLinear: column indices must lie in [0, {self.in_features}); got "
                             f"[{cols.min()}, {cols.max()}].")
        self.nnz = int(cols.size)
        per_row_c, per_row_v = [], []
        for r in range(self.out_features):
            c, v = cols[rowptr[r]:rowptr[r + 1]], values[rowptr[r]:rowptr[r + 1]]
            order = np.argsort(c, kind="stable")
            per_row_c.append(c[order])
            per_row_v.append(v[order])
        if layout not in (None, "window", "hybrid", "gather"):
            raise ValueError(f"SparseLinear: layout must be 'window', 'hybrid', 'gather' or None; got {layout!r}.")
        self._file_bytes = _sparse_file_bytes(rowptr, cols, self.in_features, self.out_features)
        self.windowed, self.scratch_buffers = True, Buffers()
        limit = MEMORY_BOUND * self.file_bytes()
        if layout != "gather":
            counted = _window_counts(self.in_features, self.out_features, 64, 64, per_row_c)
            args = (self.in_features, self.out_features, 64, 64, per_row_c, per_row_v, bias)
            win = None
            if layout != "hybrid":
                win = _windowed_from_lists(*args, counted=counted)
                if layout == "window" or win.nbytes() <= limit:
                    self.layout: _WindowedSell | _GatherSell = win
                    return
            fixed = (win.nbytes() - win.vals.nbytes - win.offs.nbytes) if win is not None else 0
            cap = best_cap(counted[0], self.in_features, None if layout == "hybrid" else limit - fixed - 8 * (
                counted[0].shape[0] + 1))
            if cap is not None or layout == "hybrid":
                hyb = _windowed_from_lists(*args, cap=cap, counted=counted)
                if layout == "hybrid" or hyb.nbytes() <= limit:
                    self.layout = hyb
                    return
            log.debug("SparseLinear: window layouts over %.1fx the file's %d B: gather layout", MEMORY_BOUND,
                      self.file_bytes())
        self.layout = _gather_from_lists(self.in_features, self.out_features, per_row_c, per_row_v, bias)
        self.windowed = False

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                   layout: str | None = None) -> SparseLinear:
        """The nonzeros of ``weight`` (out, in) (a masked weight's zeros are its pruned entries)."""
        w = weight.detach().float().cpu().numpy()
        rows, cols = np.nonzero(w)
        rowptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=w.shape[0]))])
        b = None if bias is None else bias.detach().float().cpu().numpy()
        return cls(w.shape[1], w.shape[0], rowptr, cols, w[rows, cols], b, activation, layout)

    @classmethod
    def from_csr(cls, rowptr, cols, values, n_in: int, bias=None, activation: str | None = None,
                 layout: str | None = None) -> SparseLinear:
        """From the file's CSR arrays: ``rowptr`` (out + 1,) int32/int64, ``cols`` (nnz,) uint16/int32,
        ``values`` (nnz,) float32 (or anything numpy turns into these)."""
        rowptr = np.asarray(rowptr)
        b = None if bias is None else np.asarray(bias, np.float32)
        return cls(n_in, rowptr.size - 1, rowptr, np.asarray(cols), np.asarray(values, np.float32), b,
                   activation, layout)

    def file_bytes(self) -> int:
        """The weight as ``save_compressed`` writes a pruned float tensor by default: the smaller of the ``sparse``
        codec (relative gaps at the best width of 1..16 bits + float32 values, fillers included: Deep Compression's
        format, coding/sparse.py) and ``dense`` float32; bias not counted (every form holds it)."""
        return self._file_bytes

    def to_dense(self) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.layout.to_dense()))

    def extra_repr(self) -> str:
        kind = "gather" if not self.windowed else "hybrid" if self.layout.spilled else "window"  # type: ignore
        return (f"in={self.in_features}, out={self.out_features}, nnz={self.nnz}, layout={kind}, "
                f"activation={self.activation}")


class NMLinear(_SparseBase):
    """``y = act(x Wᵀ + b)`` for an N:M sparse W: N of every M consecutive inputs of a row kept.

    File layout (what :meth:`from_layout` takes): ``values`` float32 (out, in·N/M) in row-major group order,
    ``idx`` uint8 (out, in·N/M), the position 0..M-1 of each kept value within its group of M inputs (stored
    packed at ceil(log2 M) bits in the file; unpacked here). Resident: the windowed layout of the module
    docstring, 5 bytes per kept value."""

    def __init__(self, values: np.ndarray, idx: np.ndarray, n: int, m: int, bias: np.ndarray | None,
                 activation: str | None = None) -> None:
        super().__init__()
        if not (isinstance(m, int) and isinstance(n, int) and 1 <= n <= m <= 16):
            raise ValueError(f"NMLinear: need integers 1 <= n <= m <= 16; got n={n!r}, m={m!r}.")
        values = np.asarray(values, np.float32)
        idx = np.asarray(idx)
        if values.ndim != 2 or idx.shape != values.shape or values.shape[1] % n:
            raise ValueError(f"NMLinear: values and idx must both be (out, in*{n}/{m}); got {values.shape} and "
                             f"{idx.shape}.")
        self.n, self.m = n, m
        self.out_features = values.shape[0]
        self.in_features = values.shape[1] // n * m
        groups = values.shape[1] // n
        pos = idx.astype(np.int64).reshape(self.out_features, groups, n)
        if pos.size and (pos.min() < 0 or pos.max() >= m or np.any(np.diff(np.sort(pos, 2), axis=2) == 0)):
            raise ValueError(f"NMLinear: idx must hold {n} distinct positions in [0, {m}) per group.")
        self.activation = check_activation("NMLinear", activation)
        self.has_bias = bias is not None
        self.native = simd.available()
        width = 32 if 32 % m == 0 else 64
        per_window = width // m  # groups per window
        stride = per_window * m
        n_windows = max(1, math.ceil(groups / per_window))
        n_chunks = (self.out_features + LANES - 1) // LANES
        slots = np.array([n * min(per_window, groups - b * per_window) for b in range(n_windows)], np.int64)
        counts = np.broadcast_to(slots, (n_chunks, n_windows))
        # slot s of window b <-> kept value k = b * n * per_window + s; lanes are rows (padded to 16k rows)
        rows_pad = n_chunks * LANES
        v = np.zeros((rows_pad, values.shape[1]), np.float32)
        v[:self.out_features] = values
        group_in_window = (np.arange(values.shape[1]) // n) % per_window
        o = np.zeros((rows_pad, values.shape[1]), np.uint8)
        o[:self.out_features] = group_in_window * m + idx.astype(np.int64)
        # (chunk, kept, lane): the kept values of a chunk are consecutive slots, windows in order
        vals = v.reshape(n_chunks, LANES, -1).transpose(0, 2, 1)
        offs = o.reshape(n_chunks, LANES, -1).transpose(0, 2, 1)
        self.layout = _WindowedSell(self.in_features, self.out_features, width, stride, np.array(counts), vals,
                                    offs, bias)
        self.windowed, self.scratch_buffers = True, Buffers()

    @classmethod
    def from_layout(cls, values, idx, n: int, m: int, bias=None, activation: str | None = None) -> NMLinear:
        b = None if bias is None else np.asarray(bias, np.float32)
        return cls(np.asarray(values, np.float32), np.asarray(idx), n, m, b, activation)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, n: int = 2, m: int = 4,
                   activation: str | None = None) -> NMLinear:
        """Keep, in every group of ``m`` consecutive inputs of a row, the ``n`` entries of largest magnitude
        (earlier positions on ties); ``weight`` must already be N:M sparse (any dropped entry nonzero is an
        error: pruning is not this constructor's job)."""
        w = weight.detach().float().cpu().numpy()
        out, n_in = w.shape
        if not (isinstance(m, int) and m >= 1) or n_in % m:
            raise ValueError(f"NMLinear: in_features={n_in} must be a multiple of m={m!r}.")
        g = w.reshape(out, n_in // m, m)
        order = np.argsort(-np.abs(g), axis=2, kind="stable")[:, :, :n]
        pos = np.sort(order, axis=2)
        kept = np.take_along_axis(g, pos, 2)
        if np.any((g != 0).sum(2) > (kept != 0).sum(2)):
            raise ValueError(f"NMLinear: weight is not {n}:{m} sparse (a group has more than {n} nonzeros).")
        b = None if bias is None else bias.detach().float().cpu().numpy()
        return cls(kept.reshape(out, -1), pos.reshape(out, -1).astype(np.uint8), n, m, b, activation)

    def file_bytes(self) -> int:
        """float32 values + positions packed at ceil(log2 m) bits (bias not counted)."""
        kept = self.out_features * self.in_features // self.m * self.n
        bits = max(1, math.ceil(math.log2(self.m))) if self.m > 1 else 0
        return kept * 4 + math.ceil(kept * bits / 8)

    def to_dense(self) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.layout.to_dense()))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.n}:{self.m}, activation={self.activation}"
