"""Weight-only quantized Linear layers that compute from their codes: int4 / int3 / int8 with group scales
(GPTQ's storage, Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR, arXiv:2210.17323, Sec. 4 "grouping" and "act-order"), and int4 codes on an N:M sparse
pattern.

``QuantLinear`` — file layout (what :meth:`QuantLinear.from_layout` takes):

- ``qweight`` uint8: ``bits`` 4 or 3: (out, ceil(in / 2)), two codes per byte, the low nibble the even input
  column (an odd ``in`` leaves the last high nibble 0); ``bits`` 8: (out, in), one code per byte;
- ``scales`` float16 or float32 (out, ceil(in / group)): group g covers input columns ``[g·group, (g+1)·group)``
  of the stored (permuted) order;
- ``zeros`` uint8 (out, ceil(in / group)) or None: ``w = (q - zero) · scale``; None is symmetric, zero =
  2^(bits-1) (8 for int4, 4 for int3, 128 for int8);
- ``perm`` int32 (in,) or None (act-order): column j of the stored weight multiplies input ``perm[j]``, i.e.
  ``y = W' x[perm] + b``.

int3 codes (0..7) are held in the int4 nibble layout (what the file's 3-bit stream unpacks to).

Resident: the same bytes transposed so that 16 output rows are the 16 lanes of a vector: ``codes`` (chunks,
bytes per row, 16), ``scales`` float32 and ``zeros`` uint8 (chunks, groups, 16; converted in the kernel).
Kernel (batch 1): for each byte
column j, one 16-byte load zero-extended to 16 lanes, the two nibbles masked / shifted out and converted to
floats, and two FMAs with the broadcast inputs ``x[2j]``, ``x[2j+1]`` (int8: one convert and one FMA per
column); four partial sums per sample. The zero point leaves the inner loop: ``Σ (q - z) x = Σ q x -
z Σ_g x``, with the group sums of x computed once per call, so each group ends with ``acc_total += scale ·
(Σ q x - z · Σ_g x)``. Samples run two at a time (the decoded weights serve both). Chunks of 16 rows run in
parallel.

``QuantNMLinear`` — int4 codes on N:M sparsity (M <= 16). The arrays it takes (the ``grouped_nm`` form,
forms/grouped_nm.py, holds them so):

- ``codes`` uint8 (out, ceil(K / 2)) with K = in·N/M kept values per row in row-major group order (as
  ``NMLinear``'s ``values``): two 4-bit codes per byte, the low nibble the even kept index;
- ``idx`` uint8 (out, K): the position 0..M-1 of each kept value within its group of M inputs (the file holds
  one index among the C(M, N) patterns per group: 3 bits per 4 inputs for 2:4);
- ``scales`` float16/float32 (out, ceil(K / group)) and ``zeros`` uint8 or None (symmetric: 8), the groups
  counted along the kept values (group 128 at 2:4 covers 256 inputs).

Resident: one byte per kept value, ``offset | code << 4``, with 16 output rows as the lanes of a vector (the
sliced-ELL order of sparse_linear.py) and the inputs cut into windows of ``16 // M`` whole groups (16 inputs for
2:4, 15 for 2:3 and 3:5, one group for M > 8): ``offset`` is the input's place in its window (< 16), so one
``vpermps`` with the byte as index hands each lane its input straight from the window's register (only the
low 4 bits are read: no mask, no add), and a second one, on the byte shifted down by 4, turns the code into
its float (``code - 8`` symmetric). Per kept value and 16 rows: one 16-byte load, a shift, two ``vpermps``,
one FMA (asymmetric zeros: one subtraction more); two sums per sample, the group's scale applied when it ends.
8 bits per kept value against the file's 4 + ceil(log2 C(M, N)) / N (2:4: 5.5, so 1.45x; scales float32 and
zero points uint8 on top: 1.44x the file for the GPT-2 FFN's 768 x 3072 at group 128 with zero points). An
earlier form with 32-input windows (a position in the byte plus the group's base, ``vpermi2ps``) took one
operation more per kept value.

Bounds at batch 1 (bytes read per weight): dense float32 4; int4 group 128 0.5 + 4/128 (scales as held) =
0.53 (7.5x fewer); int8 1.03 (3.9x); int4 + 2:4 0.5 · (1 + 4/128) = 0.52 per dense weight (7.7x). The int4
kernel also does the dense layer's multiply-adds (in float32, plus the decoding): on a core that runs one
16-lane FMA per cycle (Zen 4) that is the bound once the codes sit in L2. At larger batches: the dense FLOPs
(int4, int8) or half of them (2:4). Measured: bench/kernels_micro.py, docs/runtime.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import simd
from .sparse_linear import LANES, Buffers, apply_activation, as_input, check_activation, sync_threads

__all__ = ["QuantLinear", "QuantNMLinear", "pack_nibbles", "unpack_nibbles", "quantize_groups"]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(rows, n) codes 0..15 -> (rows, ceil(n / 2)) uint8, element 2j in the low nibble of byte j."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"pack_nibbles: codes must lie in [0, 15]; got [{codes.min()}, {codes.max()}].")
    rows, n = codes.shape
    padded = np.zeros((rows, n + (n % 2)), np.uint8)
    padded[:, :n] = codes
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: (rows, ceil(n / 2)) uint8 -> (rows, n) uint8."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out[:, :n]


def quantize_groups(w: np.ndarray, bits: int, group: int, symmetric: bool = True):
    """Round-to-nearest group quantization of ``w`` (rows, n) along its columns (a plain reference
    quantizer for tests and benchmarks; GPTQ's error-compensating one lives with the quantization methods).
    Returns ``(codes uint8 (rows, n), scales float32 (rows, groups), zeros uint8 (rows, groups) or None)``."""
    rows, n = w.shape
    groups = math.ceil(n / group)
    qmax = 2 ** bits - 1
    codes = np.empty((rows, n), np.uint8)
    scales = np.empty((rows, groups), np.float32)
    zeros = None if symmetric else np.empty((rows, groups), np.uint8)
    for g in range(groups):
        blk = w[:, g * group:(g + 1) * group].astype(np.float64)
        if symmetric:
            z = 2 ** (bits - 1)
            s = np.maximum(np.abs(blk).max(1) / max(z - 1, 1), 1e-12)
            q = np.clip(np.round(blk / s[:, None]) + z, 0, qmax)
        else:
            lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
            s = np.maximum((hi - lo) / qmax, 1e-12)
            z = np.clip(np.round(-lo / s), 0, qmax)
            q = np.clip(np.round(blk / s[:, None]) + z[:, None], 0, qmax)
            zeros[:, g] = z
        codes[:, g * group:(g + 1) * group] = q
        scales[:, g] = s
    return codes, scales, zeros


def _check_group_arrays(owner: str, rows: int, groups: int, scales, zeros):
    scales = np.asarray(scales)
    if scales.shape != (rows, groups) or scales.dtype not in (np.float16, np.float32):
        raise ValueError(f"{owner}: scales must be float16/float32 of shape {(rows, groups)}; got "
                         f"{scales.dtype} {scales.shape}.")
    if zeros is not None:
        zeros = np.asarray(zeros)
        if zeros.shape != (rows, groups) or zeros.dtype != np.uint8:
            raise ValueError(f"{owner}: zeros must be uint8 of shape {(rows, groups)} or None; got "
                             f"{zeros.dtype} {zeros.shape}.")
    return scales, zeros


def _lanes(a: np.ndarray, n_chunks: int, dtype) -> np.ndarray:
    """(rows, k) -> (chunks, k, 16): rows padded with zeros to 16 per chunk, then lane-minor."""
    padded = np.zeros((n_chunks * LANES,) + a.shape[1:], dtype)
    padded[:a.shape[0]] = a
    return np.ascontiguousarray(padded.reshape(n_chunks, LANES, -1).transpose(0, 2, 1))


# ---- kernels -------------------------------------------------------------------------------------------------

if simd.available():
    from numba import njit, prange

    from .simd import (
        iand,
        icvt,
        iload,
        ishr,
        isplat,
        vadd,
        vfma,
        viota,
        vload,
        vlut,
        vmax,
        vmul,
        vsplat,
        vsub,
        vzero,
    )
    from .sparse_linear import _store_lanes

    @njit(fastmath=True, boundscheck=False, cache=True)
    def _prepare(x, perm, has_perm, n_cols, group, xg, xsum):
        """``xg[t, j] = x[t, perm[j]]`` (zero-padded to ``xg``'s width) and its group sums ``xsum[t, g]``."""
        for t in range(x.shape[0]):
            for j in range(xg.shape[1]):
                xg[t, j] = (x[t, perm[j]] if has_perm else x[t, j]) if j < n_cols else np.float32(0.0)
            for g in range(xsum.shape[1]):
                s = np.float32(0.0)
                for j in range(g * group, min((g + 1) * group, xg.shape[1])):
                    s += xg[t, j]
                xsum[t, g] = s

    @njit(fastmath=True, boundscheck=False, inline="always")
    def _nibbles(codes, at, m15):
        """The two nibbles of 16 bytes as floats (low, high); ``and`` + convert measured 10% faster than the
        ``vpermps`` table here (83 vs 92 us for a 768 x 3072 layer, 1 thread)."""
        q = iload(codes, at)
        return icvt(iand(q, m15)), icvt(ishr(q, 4))

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _nibble_kernel(xg, xsum, codes, scales, zeros, group, bias, relu, out, scratch):
        """4/3-bit codes, two per byte (module docstring): samples in pairs, then a last single one; four
        partial sums per sample (an FMA's latency is four of its issue slots)."""
        n_samples = out.shape[0]
        n_chunks, n_bytes = codes.shape[0], codes.shape[1]
        n_groups = scales.shape[1]
        half = group // 2
        m15 = isplat(15)
        for c in prange(n_chunks):
            row0 = c * n_bytes
            for t in range(0, n_samples, 2):
                pair = t + 1 < n_samples
                u = t + 1 if pair else t
                ta, tb = vload(bias, c * 16), vload(bias, c * 16)
                for g in range(n_groups):
                    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
                    b0, b1, b2, b3 = vzero(), vzero(), vzero(), vzero()
                    j = g * half
                    j1 = min((g + 1) * half, n_bytes)
                    while j + 2 <= j1:
                        we, wo = _nibbles(codes, (row0 + j) * 16, m15)
                        ve, vo = _nibbles(codes, (row0 + j + 1) * 16, m15)
                        a0 = vfma(we, vsplat(xg[t, 2 * j]), a0)
                        a1 = vfma(wo, vsplat(xg[t, 2 * j + 1]), a1)
                        a2 = vfma(ve, vsplat(xg[t, 2 * j + 2]), a2)
                        a3 = vfma(vo, vsplat(xg[t, 2 * j + 3]), a3)
                        if pair:
                            b0 = vfma(we, vsplat(xg[u, 2 * j]), b0)
                            b1 = vfma(wo, vsplat(xg[u, 2 * j + 1]), b1)
                            b2 = vfma(ve, vsplat(xg[u, 2 * j + 2]), b2)
                            b3 = vfma(vo, vsplat(xg[u, 2 * j + 3]), b3)
                        j += 2
                    if j < j1:
                        we, wo = _nibbles(codes, (row0 + j) * 16, m15)
                        a0 = vfma(we, vsplat(xg[t, 2 * j]), a0)
                        a1 = vfma(wo, vsplat(xg[t, 2 * j + 1]), a1)
                        b0 = vfma(we, vsplat(xg[u, 2 * j]), b0)
                        b1 = vfma(wo, vsplat(xg[u, 2 * j + 1]), b1)
                    s = vload(scales, (c * n_groups + g) * 16)
                    z = icvt(iload(zeros, (c * n_groups + g) * 16))
                    sa = vadd(vadd(a0, a1), vadd(a2, a3))
                    ta = vfma(s, vsub(sa, vmul(z, vsplat(xsum[t, g]))), ta)
                    if pair:
                        sb = vadd(vadd(b0, b1), vadd(b2, b3))
                        tb = vfma(s, vsub(sb, vmul(z, vsplat(xsum[u, g]))), tb)
                if relu:
                    ta, tb = vmax(ta, vzero()), vmax(tb, vzero())
                _store_lanes(out, t, c, ta, scratch)
                if pair:
                    _store_lanes(out, u, c, tb, scratch)

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _byte_kernel(xg, xsum, codes, scales, zeros, group, bias, relu, out, scratch):
        """8-bit codes, one per byte column; samples in pairs."""
        n_samples = out.shape[0]
        n_chunks, n_cols = codes.shape[0], codes.shape[1]
        n_groups = scales.shape[1]
        for c in prange(n_chunks):
            for t in range(0, n_samples, 2):
                pair = t + 1 < n_samples
                u = t + 1 if pair else t
                ta, tb = vload(bias, c * 16), vload(bias, c * 16)
                for g in range(n_groups):
                    a0, a1, b0, b1 = vzero(), vzero(), vzero(), vzero()
                    j = g * group
                    j1 = min((g + 1) * group, n_cols)
                    while j + 2 <= j1:
                        w0 = icvt(iload(codes, (c * n_cols + j) * 16))
                        w1 = icvt(iload(codes, (c * n_cols + j + 1) * 16))
                        a0 = vfma(w0, vsplat(xg[t, j]), a0)
                        a1 = vfma(w1, vsplat(xg[t, j + 1]), a1)
                        if pair:
                            b0 = vfma(w0, vsplat(xg[u, j]), b0)
                            b1 = vfma(w1, vsplat(xg[u, j + 1]), b1)
                        j += 2
                    if j < j1:
                        w0 = icvt(iload(codes, (c * n_cols + j) * 16))
                        a0 = vfma(w0, vsplat(xg[t, j]), a0)
                        b0 = vfma(w0, vsplat(xg[u, j]), b0)
                    s = vload(scales, (c * n_groups + g) * 16)
                    z = icvt(iload(zeros, (c * n_groups + g) * 16))
                    ta = vfma(s, vsub(vadd(a0, a1), vmul(z, vsplat(xsum[t, g]))), ta)
                    if pair:
                        tb = vfma(s, vsub(vadd(b0, b1), vmul(z, vsplat(xsum[u, g]))), tb)
                if relu:
                    ta, tb = vmax(ta, vzero()), vmax(tb, vzero())
                _store_lanes(out, t, c, ta, scratch)
                if pair:
                    _store_lanes(out, u, c, tb, scratch)

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _nm_kernel(xp, packed, scales, zeros, asym, group, kpw, stride, bias, relu, out, scratch):
        """int4 codes on N:M: one byte per kept value, ``offset | code << 4``, in windows of 16 inputs (module
        docstring); samples in pairs; two partial sums per sample, slots taken two at a time."""
        n_samples = out.shape[0]
        n_chunks, n_kept = packed.shape[0], packed.shape[1]
        n_groups = scales.shape[1]
        n_windows = (n_kept + kpw - 1) // kpw
        ld = xp.shape[1]
        table = vsub(viota(), vsplat(np.float32(0.0 if asym else 8.0)))
        for c in prange(n_chunks):
            row0 = c * n_kept
            for t in range(0, n_samples, 2):
                pair = t + 1 < n_samples
                u = t + 1 if pair else t
                ta, tb = vload(bias, c * 16), vload(bias, c * 16)
                a0, a1, b0, b1 = vzero(), vzero(), vzero(), vzero()
                g = 0
                z = icvt(iload(zeros, (c * n_groups) * 16))
                left = group  # kept values left in the current group
                k = 0
                for win in range(n_windows):
                    xw = vload(xp, t * ld + win * stride)
                    yw = vload(xp, u * ld + win * stride)
                    k1 = min(k + kpw, n_kept)
                    while k < k1:
                        if k + 2 <= k1 and left >= 2:
                            q, r = iload(packed, (row0 + k) * 16), iload(packed, (row0 + k + 1) * 16)
                            wq, wr = vlut(table, ishr(q, 4)), vlut(table, ishr(r, 4))
                            if asym:
                                wq, wr = vsub(wq, z), vsub(wr, z)
                            a0 = vfma(wq, vlut(xw, q), a0)
                            a1 = vfma(wr, vlut(xw, r), a1)
                            if pair:
                                b0 = vfma(wq, vlut(yw, q), b0)
                                b1 = vfma(wr, vlut(yw, r), b1)
                            k += 2
                            left -= 2
                        else:
                            q = iload(packed, (row0 + k) * 16)
                            wq = vlut(table, ishr(q, 4))
                            if asym:
                                wq = vsub(wq, z)
                            a0 = vfma(wq, vlut(xw, q), a0)
                            if pair:
                                b0 = vfma(wq, vlut(yw, q), b0)
                            k += 1
                            left -= 1
                        if left == 0 or k == n_kept:  # the group ends: scale its sums into the totals
                            sc = vload(scales, (c * n_groups + g) * 16)
                            ta = vfma(sc, vadd(a0, a1), ta)
                            tb = vfma(sc, vadd(b0, b1), tb)
                            a0, a1, b0, b1 = vzero(), vzero(), vzero(), vzero()
                            g += 1
                            left = group
                            if g < n_groups:
                                z = icvt(iload(zeros, (c * n_groups + g) * 16))
                if relu:
                    ta, tb = vmax(ta, vzero()), vmax(tb, vzero())
                _store_lanes(out, t, c, ta, scratch)
                if pair:
                    _store_lanes(out, u, c, tb, scratch)


class QuantLinear(nn.Module):
    """``y = act(W' x[perm] + b)`` with W' stored as ``bits``-bit codes and group scales (module docstring).

    Build with :meth:`from_layout` (the file's arrays) or :meth:`from_dense` (round-to-nearest group
    quantization of a dense weight, for tests and benchmarks). ``dequantized()`` is the float weight the
    kernel computes with (in the input's original column order)."""

    def __init__(self, qweight, scales, zeros, bits: int, group: int, n_in: int, bias=None, perm=None,
                 activation: str | None = None) -> None:
        super().__init__()
        if bits not in (3, 4, 8):
            raise ValueError(f"QuantLinear: bits must be 3, 4 or 8; got {bits!r}.")
        if not (isinstance(group, int) and group >= 2 and group % 2 == 0):
            raise ValueError(f"QuantLinear: group must be an even integer >= 2; got {group!r}.")
        qweight = np.asarray(qweight)
        per_row = n_in if bits == 8 else (n_in + 1) // 2
        if qweight.dtype != np.uint8 or qweight.ndim != 2 or qweight.shape[1] != per_row:
            raise ValueError(f"QuantLinear: qweight must be uint8 (out, {per_row}) for {bits} bits and in={n_in}; "
                             f"got {qweight.dtype} {qweight.shape}.")
        self.bits, self.group, self.in_features, self.out_features = bits, group, int(n_in), qweight.shape[0]
        n_groups = math.ceil(n_in / group)
        scales, zeros = _check_group_arrays("QuantLinear", self.out_features, n_groups, scales, zeros)
        if perm is not None:
            perm = np.asarray(perm)
            if perm.shape != (n_in,) or not np.array_equal(np.sort(perm), np.arange(n_in)):
                raise ValueError(f"QuantLinear: perm must be a permutation of range({n_in}); got shape "
                                 f"{perm.shape}.")
        self.activation = check_activation("QuantLinear", activation)
        self.native = simd.available()
        self.n_chunks = (self.out_features + LANES - 1) // LANES
        self.codes = _lanes(qweight, self.n_chunks, np.uint8)
        self.scales = _lanes(scales.astype(np.float32), self.n_chunks, np.float32)
        zero = np.full((self.out_features, n_groups), 2 ** (bits - 1), np.uint8) if zeros is None else zeros
        self.zeros = _lanes(zero, self.n_chunks, np.uint8)  # converted to floats in the kernel (1 byte, not 4)
        self.symmetric = zeros is None
        self.perm = np.zeros(1, np.int32) if perm is None else perm.astype(np.int32)
        self.has_perm = perm is not None
        self.bias = np.zeros(self.n_chunks * LANES, np.float32)
        self.has_bias = bias is not None
        if bias is not None:
            self.bias[:self.out_features] = np.asarray(bias, np.float32)
        self.file_scale_bytes = scales.dtype.itemsize
        self.scratch_buffers = Buffers()

    @classmethod
    def from_layout(cls, qweight, scales, zeros, bits: int, group: int, n_in: int, bias=None, perm=None,
                    activation: str | None = None) -> QuantLinear:
        return cls(qweight, scales, zeros, bits, group, n_in, bias, perm, activation)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, bits: int = 4, group: int = 128,
                   symmetric: bool = True, perm=None, activation: str | None = None,
                   scale_dtype=np.float16) -> QuantLinear:
        """Quantize ``weight`` (out, in) by round to nearest per group (``quantize_groups``), after permuting its
        columns by ``perm`` when given (act-order), with scales stored as ``scale_dtype``."""
        w = weight.detach().float().cpu().numpy()
        if perm is not None:
            w = w[:, np.asarray(perm)]
        codes, scales, zeros = quantize_groups(w, bits, group, symmetric)
        q = codes if bits == 8 else pack_nibbles(codes)
        b = None if bias is None else bias.detach().float().cpu().numpy()
        return cls(q, scales.astype(scale_dtype), zeros, bits, group, w.shape[1], b, perm, activation)

    def dequantized(self) -> Tensor:
        """The float32 weight (out, in) in the input's column order: ``(q - zero) · scale``."""
        per_row = self.codes.shape[1]
        q = self.codes.transpose(0, 2, 1).reshape(-1, per_row)[:self.out_features]
        codes = q if self.bits == 8 else unpack_nibbles(q, self.in_features)
        cols = np.arange(self.in_features) // self.group
        s = self.scales.transpose(0, 2, 1).reshape(self.n_chunks * LANES, -1)[:self.out_features]
        z = self.zeros.transpose(0, 2, 1).reshape(self.n_chunks * LANES, -1)[:self.out_features]
        w = (codes.astype(np.float32) - z[:, cols].astype(np.float32)) * s[:, cols]
        if self.has_perm:
            dense = np.empty_like(w)
            dense[:, self.perm] = w
            w = dense
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def forward(self, x: Tensor) -> Tensor:
        if not self.native:
            bias = torch.from_numpy(self.bias[:self.out_features]) if self.has_bias else None
            y = F.linear(x.float(), self.dequantized(), bias)
            return apply_activation(torch.relu(y) if self.activation == "relu" else y, self.activation)
        xn = as_input("QuantLinear", x, self.in_features)
        sync_threads()
        n = xn.shape[0]
        xg = self.scratch_buffers.get("x", (n, self.codes.shape[1] * (1 if self.bits == 8 else 2)))
        xsum = self.scratch_buffers.get("xsum", (n, self.scales.shape[1]))
        _prepare(xn, self.perm, self.has_perm, self.in_features, self.group, xg, xsum)
        out = np.empty((n, self.out_features), np.float32)
        kernel = _byte_kernel if self.bits == 8 else _nibble_kernel
        kernel(xg, xsum, self.codes, self.scales, self.zeros, self.group, self.bias, self.activation == "relu", out,
               self.scratch_buffers.get("scratch", (self.n_chunks * LANES,)))
        y = apply_activation(torch.from_numpy(out), self.activation)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.zeros, self.perm, self.bias))

    def file_bytes(self) -> int:
        """Codes at ``bits`` bits (int3 packed 3 to the bit stream), scales as stored, zeros (uint8) if any, perm
        (int32) if any; bias not counted."""
        n_groups = self.scales.shape[1]
        codes = math.ceil(self.out_features * self.in_features * self.bits / 8)
        zeros = 0 if self.symmetric else self.out_features * n_groups
        return codes + self.out_features * n_groups * self.file_scale_bytes + zeros + \
            (4 * self.in_features if self.has_perm else 0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}, "
                f"symmetric={self.symmetric}, act_order={self.has_perm}, activation={self.activation}")


class QuantNMLinear(nn.Module):
    """int4 codes on N:M sparsity (module docstring for both layouts)."""

    def __init__(self, codes, idx, scales, zeros, n: int, m: int, group: int, bias=None,
                 activation: str | None = None) -> None:
        super().__init__()
        if not (isinstance(m, int) and isinstance(n, int) and 1 <= n <= m <= 16):
            raise ValueError(f"QuantNMLinear: need integers 1 <= n <= m <= 16; got n={n!r}, m={m!r}.")
        if not (isinstance(group, int) and group >= 1):
            raise ValueError(f"QuantNMLinear: group must be a positive integer; got {group!r}.")
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] % n:
            raise ValueError(f"QuantNMLinear: idx must be (out, in*{n}/{m}); got {idx.shape}.")
        out, kept = idx.shape
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.shape != (out, (kept + 1) // 2):
            raise ValueError(f"QuantNMLinear: codes must be uint8 {(out, (kept + 1) // 2)}; got {codes.dtype} "
                             f"{codes.shape}.")
        pos = idx.astype(np.int64).reshape(out, kept // n, n)
        if pos.size and (pos.min() < 0 or pos.max() >= m or np.any(np.diff(np.sort(pos, 2), axis=2) == 0)):
            raise ValueError(f"QuantNMLinear: idx must hold {n} distinct positions in [0, {m}) per group.")
        n_groups = math.ceil(kept / group)
        scales, zeros = _check_group_arrays("QuantNMLinear", out, n_groups, scales, zeros)
        self.n, self.m, self.group = n, m, group
        self.out_features, self.in_features, self.kept = out, kept // n * m, kept
        self.activation = check_activation("QuantNMLinear", activation)
        self.native = simd.available()
        self.per_window = 16 // m  # whole groups per window of 16 inputs
        self.stride = self.per_window * m
        self.n_chunks = (out + LANES - 1) // LANES
        q = unpack_nibbles(codes, kept)
        offset = (np.arange(kept) // n) % self.per_window * m + idx.astype(np.int64)  # input within the window
        self.packed = _lanes((offset | (q.astype(np.int64) << 4)).astype(np.uint8), self.n_chunks, np.uint8)
        self.scales = _lanes(scales.astype(np.float32), self.n_chunks, np.float32)
        self.symmetric = zeros is None
        self.zeros = _lanes(np.zeros((out, n_groups), np.uint8) if zeros is None else zeros, self.n_chunks, np.uint8)
        self.bias = np.zeros(self.n_chunks * LANES, np.float32)
        self.has_bias = bias is not None
        if bias is not None:
            self.bias[:out] = np.asarray(bias, np.float32)
        n_windows = max(1, math.ceil(kept // n / self.per_window))
        self.x_len = (n_windows - 1) * self.stride + 16
        self.file_scale_bytes = scales.dtype.itemsize
        self.scratch_buffers = Buffers()

    @classmethod
    def from_layout(cls, codes, idx, scales, zeros, n: int, m: int, group: int, bias=None,
                    activation: str | None = None) -> QuantNMLinear:
        return cls(codes, idx, scales, zeros, n, m, group, bias, activation)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, n: int = 2, m: int = 4, group: int = 128,
                   symmetric: bool = True, activation: str | None = None,
                   scale_dtype=np.float16) -> QuantNMLinear:
        """Keep the N:M entries of ``weight`` (as ``NMLinear.from_dense``) and quantize the kept values per
        group of ``group`` kept values by round to nearest."""
        from .sparse_linear import NMLinear

        nm = NMLinear.from_dense(weight, None, n, m)
        dense = nm.to_dense().numpy()
        out, n_in = dense.shape
        g = dense.reshape(out, n_in // m, m)
        order = np.argsort(-np.abs(g), axis=2, kind="stable")[:, :, :n]
        pos = np.sort(order, axis=2)
        kept = np.take_along_axis(g, pos, 2).reshape(out, -1)
        codes, scales, zeros = quantize_groups(kept, 4, group, symmetric)
        b = None if bias is None else bias.detach().float().cpu().numpy()
        return cls(pack_nibbles(codes), pos.reshape(out, -1).astype(np.uint8), scales.astype(scale_dtype), zeros,
                   n, m, group, b, activation)

    def dequantized(self) -> Tensor:
        """The dense float32 weight (out, in) the kernel computes with."""
        rows = self.n_chunks * LANES
        p = self.packed.transpose(0, 2, 1).reshape(rows, self.kept)[:self.out_features]
        q, offset = (p >> 4).astype(np.float32), (p & 15).astype(np.int64)
        grp = np.arange(self.kept) // self.group
        s = self.scales.transpose(0, 2, 1).reshape(rows, -1)[:self.out_features]
        z = self.zeros.transpose(0, 2, 1).reshape(rows, -1)[:self.out_features]
        zero = z[:, grp].astype(np.float32) if not self.symmetric else 8.0
        vals = (q - zero) * s[:, grp]
        cols = (np.arange(self.kept) // self.n // self.per_window) * self.stride + offset
        w = np.zeros((self.out_features, self.in_features), np.float32)
        np.put_along_axis(w, cols, vals, 1)
        return torch.from_numpy(w)

    def forward(self, x: Tensor) -> Tensor:
        if not self.native:
            bias = torch.from_numpy(self.bias[:self.out_features]) if self.has_bias else None
            y = F.linear(x.float(), self.dequantized(), bias)
            return apply_activation(torch.relu(y) if self.activation == "relu" else y, self.activation)
        xn = as_input("QuantNMLinear", x, self.in_features)
        sync_threads()
        n = xn.shape[0]
        xp = self.scratch_buffers.get("x", (n, self.x_len))  # zero past in_features, rewritten below it every call
        xp[:, :self.in_features] = xn
        out = np.empty((n, self.out_features), np.float32)
        _nm_kernel(xp, self.packed, self.scales, self.zeros, not self.symmetric, self.group, self.n * self.per_window,
                   self.stride, self.bias, self.activation == "relu", out,
                   self.scratch_buffers.get("scratch", (self.n_chunks * LANES,)))
        y = apply_activation(torch.from_numpy(out), self.activation)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in (self.packed, self.scales, self.zeros, self.bias))

    def file_bytes(self) -> int:
        """As the ``grouped_nm`` codec writes it (forms/grouped_nm.py): 4-bit codes, one pattern index per group of
        m at ceil(log2 C(m, n)) bits, scales as stored, zeros at 4 bits if any; bias not counted."""
        n_groups = self.scales.shape[1]
        pattern_bits = max(1, math.ceil(math.log2(math.comb(self.m, self.n))))
        total = self.out_features * self.kept
        zeros = 0 if self.symmetric else math.ceil(self.out_features * n_groups * 4 / 8)
        return math.ceil(total * 4 / 8) + math.ceil(total // self.n * pattern_bits / 8) + \
            self.out_features * n_groups * self.file_scale_bytes + zeros

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.n}:{self.m}, int4, group={self.group} "
                f"kept values, symmetric={self.symmetric}, activation={self.activation}")
