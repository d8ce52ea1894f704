"""Direct sparse convolution for unstructured-pruned Conv2d (groups 1), computed from the nonzero taps only.

Method (after Elsen, Dukhan, Gale & Simonyan 2020, "Fast Sparse ConvNets", CVPR, arXiv:1911.09723: sparse
weights times dense activations, vectorised over the spatial positions, with the 1x1 convolution as the
plain sparse-times-dense matrix product): each output channel is a sum over its nonzero taps (input channel
ci, kernel row kh, column kw) of the weight times the input plane ci shifted by (kh, kw). With the input padded
and each plane flattened row by row at the padded width ``Wp``, output position ``q = oh·Wp + ow`` reads input
``q + kh·d·Wp + kw·d`` (stride 1, dilation d): every tap reads a *contiguous* stretch of the flattened plane,
so a tap costs one broadcast and ``L / 16`` FMAs on unaligned loads, no im2col. The ``Wp - OW`` columns of
each output row that fall past the image are computed and dropped. Stride s: the padded input is first split
into its s x s phases (rows ≡ a, columns ≡ b mod s), each a plane of width ``ceil(Wp / s)``; a tap then reads
phase ``(kh·d mod s, kw·d mod s)`` at offset ``(kh·d // s, kw·d // s)``, again a contiguous stretch.

Layout: memory order NCHW (the flattened-plane trick needs whole planes contiguous; a channels-last input is
converted, which costs a copy, so keep the model NCHW around these layers). Per output channel (CSR): the
float32 values of its nonzero taps and each tap's index ``(ci·KH + kh)·KW + kw`` (uint16 when C·KH·KW < 65,536,
else int32), 6 bytes per nonzero as in the file; per input shape a table of C·KH·KW int32 offsets into the
packed input (built on first use, a few KB) turns a tap into an address.

Kernel: at batch 1, jobs are (tile of 64 output positions, output channel), the tile outermost so that the
input stretch a tile reads (~C x (64 + (KH-1)·Wp) floats) stays in cache across all output channels; a batch
runs its images in parallel, each packed into its thread's own buffer and computed while that sits in L2.
4 registers of 16 sums per job, bias and ReLU fused, the valid outputs stored straight from the registers
(one masked store per output row a register touches; a scalar copy through memory had cost 30% of the
layer). Bounds: FLOPs (the layer's nonzeros x output positions, plus the dropped columns: 56x56 maps 3.6%,
7x7 22%); at 90% sparsity 10x fewer than dense. Measured against ``F.conv2d`` (oneDNN) in
bench/kernels_micro.py and docs/runtime.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import simd
from .sparse_linear import check_activation, sync_threads

__all__ = ["SparseConv2d"]

TILE = 64  # output positions per job: 4 vectors of 16


if simd.available():
    import numba
    from numba import get_thread_id, njit, prange

    from .simd import iramp, vfma, vload, vmax, vsel2, vsplat, vstore, vstore_mask, vzero

    @njit(boundscheck=False, inline="always")
    def _pack_channel(x, n, c, xb, base, phases, s, pad_t, pad_l, h_ph, w_ph, padded):
        """``xb[base + (p, i, j)] = x[n, c, i·s + a_p - pad_t, j·s + b_p - pad_l]`` (0 outside the image) for the
        used phases ``p`` = (a_p, b_p), each a plane of h_ph x w_ph. Stride 1: row slices straight into place.
        Stride s > 1: the padded channel first (``padded``: s·h_ph x s·w_ph scratch, + 32 floats of slack), then
        each used phase read from it (stride 2: every other input by one ``vpermi2ps`` per 16 outputs; scalar
        code and torch's strided copy both took ~0.6 ns per element, a third of a stride-2 layer's time)."""
        h, w = x.shape[2], x.shape[3]
        plane = h_ph * w_ph
        if s == 1:
            for i in range(h_ph):
                r = i - pad_t
                row = base + i * w_ph
                if r < 0 or r >= h:
                    xb[row:row + w_ph] = 0.0
                    continue
                xb[row:row + pad_l] = 0.0
                xb[row + pad_l:row + pad_l + w] = x[n, c, r, :]
                xb[row + pad_l + w:row + w_ph] = 0.0
            return
        wp = s * w_ph
        padded[:] = 0.0  # (the slack too: the last vector of a row reads into it)
        for r in range(h):
            at = (r + pad_t) * wp + pad_l
            padded[at:at + w] = x[n, c, r, :]
        n_ph = phases.shape[0]
        for p in range(n_ph):
            a, b = phases[p, 0], phases[p, 1]
            out = base + p * plane
            for i in range(h_ph):
                src = (i * s + a) * wp + b
                dst = out + i * w_ph
                if s == 2:  # 16 outputs from 32 inputs: two loads, one vpermi2ps picking every other one
                    j = 0
                    while j + 16 <= w_ph:
                        vstore(xb, dst + j, vsel2(vload(padded, src + 2 * j), vload(padded, src + 2 * j + 16),
                                                  iramp(0, 2)))
                        j += 16
                    if j < w_ph:
                        v = vsel2(vload(padded, src + 2 * j), vload(padded, src + 2 * j + 16), iramp(0, 2))
                        vstore_mask(xb, dst + j, v, (1 << (w_ph - j)) - 1)
                else:
                    for j in range(w_ph):
                        xb[dst + j] = padded[src + s * j]

    @njit(fastmath=True, boundscheck=False, inline="always")
    def _store_valid(out, at, r, col, v, w_ph, oh, ow):
        """Store the 16 flat positions starting at row ``r``, column ``col`` (of rows ``w_ph`` wide) of ``v`` that
        are outputs (``col < ow``, ``r < oh``) into the output plane at ``out.flat[at]``: one masked store per
        output row they touch. Returns the row and column 16 positions on (no division: it cost 10% of a
        layer)."""
        lane = 0
        while lane < 16 and r < oh:
            if col < ow:
                n = min(16 - lane, ow - col)
                mask = ((1 << n) - 1) << lane
                vstore_mask(out, at + r * ow + col - lane, v, mask)
            step = min(16 - lane, w_ph - col)
            lane += step
            col += step
            if col == w_ph:
                r += 1
                col = 0
        return r, col

    @njit(fastmath=True, boundscheck=False, inline="always")
    def _tile(xb, base, n, co, q0, rowptr, vals, taps, tap_off, bias, relu, w_ph, oh, ow, out):
        """Output channel ``co`` of image ``n`` at flat positions ``q0 .. q0 + 63``: bias + Σ_taps v · input
        shifted by the tap (``xb[base + ...]`` is the image's packed input)."""
        b = vsplat(bias[co])
        a0, a1, a2, a3 = b, b, b, b
        at0 = base + q0
        for p in range(rowptr[co], rowptr[co + 1]):
            v = vsplat(vals[p])
            at = at0 + tap_off[taps[p]]
            a0 = vfma(v, vload(xb, at), a0)
            a1 = vfma(v, vload(xb, at + 16), a1)
            a2 = vfma(v, vload(xb, at + 32), a2)
            a3 = vfma(v, vload(xb, at + 48), a3)
        if relu:
            z = vzero()
            a0, a1, a2, a3 = vmax(a0, z), vmax(a1, z), vmax(a2, z), vmax(a3, z)
        plane = (n * out.shape[1] + co) * oh * ow
        r, col = _store_valid(out, plane, q0 // w_ph, q0 % w_ph, a0, w_ph, oh, ow)
        r, col = _store_valid(out, plane, r, col, a1, w_ph, oh, ow)
        r, col = _store_valid(out, plane, r, col, a2, w_ph, oh, ow)
        _store_valid(out, plane, r, col, a3, w_ph, oh, ow)

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _conv_one(x, xb, pads, per_image, phases, s, pad_t, pad_l, h_ph, rowptr, vals, taps, tap_off, bias, relu,
                  n_tiles, w_ph, oh, ow, out):
        """One image: its channels packed in parallel, then (tile, output channel) jobs in parallel, tiles
        outermost (the stretch of input a tile reads stays in cache across the output channels)."""
        n_ch, n_out = x.shape[1], out.shape[1]
        for c in prange(n_ch):
            _pack_channel(x, 0, c, xb, c * phases.shape[0] * h_ph * w_ph, phases, s, pad_t, pad_l, h_ph, w_ph,
                          pads[get_thread_id()])
        xb[per_image:] = 0.0
        for job in prange(n_tiles * n_out):
            _tile(xb, 0, 0, job % n_out, (job // n_out) * 64, rowptr, vals, taps, tap_off, bias, relu, w_ph, oh,
                  ow, out)

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _conv_batch(x, xbs, pads, per_image, phases, s, pad_t, pad_l, h_ph, rowptr, vals, taps, tap_off, bias,
                    relu, n_tiles, w_ph, oh, ow, out):
        """A batch: images in parallel, each packed into its thread's buffer (``xbs[thread]``, ~1 MB for a 64 x 56 x
        56 input: it stays in L2) and computed there; measured 2-3x faster per image than packing the whole batch
        first."""
        n_img, n_ch, n_out = x.shape[0], x.shape[1], out.shape[1]
        plane_block = phases.shape[0] * h_ph * w_ph
        for n in prange(n_img):
            xb = xbs[get_thread_id()]
            pad = pads[get_thread_id()]
            for c in range(n_ch):
                _pack_channel(x, n, c, xb, c * plane_block, phases, s, pad_t, pad_l, h_ph, w_ph, pad)
            xb[per_image:] = 0.0
            for tile in range(n_tiles):
                for co in range(n_out):
                    _tile(xb, 0, n, co, tile * 64, rowptr, vals, taps, tap_off, bias, relu, w_ph, oh, ow, out)


class SparseConv2d(nn.Module):
    """``act(conv2d(x, W, b, stride, padding, dilation))`` for an unstructured sparse W (groups 1), from its
    nonzero taps (module docstring). Build with :meth:`from_dense` (a dense or masked weight) or
    :meth:`from_csr` (per output channel: row pointers, tap indices, values)."""

    def __init__(self, in_channels: int, kernel_size, rowptr, taps, values, bias=None, stride=1, padding=0,
                 dilation=1, activation: str | None = None) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        for name, v in (("stride", self.stride), ("dilation", self.dilation)):
            if min(v) < 1:
                raise ValueError(f"SparseConv2d: {name} must be >= 1; got {v!r}.")
        if min(self.padding) < 0:
            raise ValueError(f"SparseConv2d: padding must be >= 0; got {self.padding!r}.")
        if self.stride[0] != self.stride[1]:
            raise ValueError(f"SparseConv2d: only equal strides are supported; got {self.stride!r}.")
        self.in_channels, self.kernel_size = int(in_channels), (kh, kw)
        rowptr = np.asarray(rowptr, np.int64)
        taps = np.asarray(taps, np.int64)
        values = np.asarray(values, np.float32)
        n_taps = self.in_channels * kh * kw
        if rowptr.ndim != 1 or rowptr[0] != 0 or rowptr[-1] != taps.size or taps.size != values.size or \
                np.any(np.diff(rowptr) < 0):
            raise ValueError(f"SparseConv2d: rowptr must rise from 0 to nnz={taps.size} (values {values.size}).")
        if taps.size and (taps.min() < 0 or taps.max() >= n_taps):
            raise ValueError(f"SparseConv2d: tap indices must lie in [0, {n_taps}); got [{taps.min()}, {taps.max()}].")
        self.out_channels = rowptr.size - 1
        self.activation = check_activation("SparseConv2d", activation)
        if self.activation not in (None, "relu"):
            raise ValueError(f"SparseConv2d: activation must be None or 'relu'; got {activation!r}.")
        self.native = simd.available()
        self.rowptr = rowptr
        self.taps = taps.astype(np.uint16 if n_taps < 65536 else np.int32)
        self.vals = values
        self.has_bias = bias is not None
        self.bias = np.zeros(self.out_channels, np.float32) if bias is None else np.asarray(bias, np.float32).copy()
        self.nnz = int(taps.size)
        self._plans: dict[tuple[int, int], dict] = {}

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                   activation: str | None = None) -> SparseConv2d:
        w = weight.detach().float().cpu().numpy()
        if w.ndim != 4:
            raise ValueError(f"SparseConv2d: weight must be (out, in, kh, kw); got shape {w.shape}.")
        flat = w.reshape(w.shape[0], -1)
        rows, taps = np.nonzero(flat)
        rowptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=w.shape[0]))])
        b = None if bias is None else bias.detach().float().cpu().numpy()
        return cls(w.shape[1], w.shape[2:], rowptr, taps, flat[rows, taps], b, stride, padding, dilation, activation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str | None = None) -> SparseConv2d:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"SparseConv2d: needs groups=1, zero padding given as numbers; got groups="
                             f"{conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}.")
        return cls.from_dense(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, activation)

    @classmethod
    def from_csr(cls, rowptr, taps, values, in_channels: int, kernel_size, bias=None, stride=1, padding=0,
                 dilation=1, activation: str | None = None) -> SparseConv2d:
        return cls(in_channels, kernel_size, rowptr, taps, values, bias, stride, padding, dilation, activation)

    def to_dense(self) -> Tensor:
        kh, kw = self.kernel_size
        flat = np.zeros((self.out_channels, self.in_channels * kh * kw), np.float32)
        rows = np.repeat(np.arange(self.out_channels), np.diff(self.rowptr))
        flat[rows, self.taps.astype(np.int64)] = self.vals
        return torch.from_numpy(flat.reshape(self.out_channels, self.in_channels, kh, kw))

    def _plan(self, h: int, w: int) -> dict:
        """Shapes, used phases and the tap -> offset table for inputs of size h x w (cached)."""
        key = (h, w)
        if key in self._plans:
            return self._plans[key]
        (kh, kw), (ph, pw), (dh, dw), s = self.kernel_size, self.padding, self.dilation, self.stride[0]
        hp, wp = h + 2 * ph, w + 2 * pw
        oh, ow = (hp - dh * (kh - 1) - 1) // s + 1, (wp - dw * (kw - 1) - 1) // s + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"SparseConv2d: input {h}x{w} is smaller than the dilated kernel.")
        h_ph, w_ph = math.ceil(hp / s), math.ceil(wp / s)
        used = sorted({((i * dh) % s, (j * dw) % s) for i in range(kh) for j in range(kw)})
        phase_id = {p: k for k, p in enumerate(used)}
        plane = h_ph * w_ph
        n_ph = len(used)
        tap_off = np.empty(self.in_channels * kh * kw, np.int64)
        for ci in range(self.in_channels):
            for i in range(kh):
                for j in range(kw):
                    p = phase_id[((i * dh) % s, (j * dw) % s)]
                    tap_off[(ci * kh + i) * kw + j] = (ci * n_ph + p) * plane + (i * dh // s) * w_ph + j * dw // s
        n_tiles = math.ceil(oh * w_ph / TILE)
        per_image = self.in_channels * n_ph * plane
        tail = int(tap_off.max(initial=0) - (self.in_channels - 1) * n_ph * plane) + n_tiles * TILE + TILE
        plan = dict(oh=oh, ow=ow, h_ph=h_ph, w_ph=w_ph, phases=np.asarray(used, np.int64).reshape(-1, 2),
                    tap_off=tap_off, n_tiles=n_tiles, per_image=per_image, tail=max(tail, TILE))
        self._plans[key] = plan
        return plan

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input (N, {self.in_channels}, H, W); got {tuple(x.shape)}.")
        if not self.native:
            bias = torch.from_numpy(self.bias) if self.has_bias else None
            y = F.conv2d(x.float(), self.to_dense(), bias, self.stride, self.padding, self.dilation)
            return torch.relu(y) if self.activation == "relu" else y
        if x.dtype != torch.float32 or x.requires_grad or not x.is_contiguous():
            x = x.detach().float().contiguous()  # a channels-last input is reordered here (module docstring)
        n, _, h, w = x.shape
        plan = self._plan(h, w)
        sync_threads()
        out = np.empty((n, self.out_channels, plan["oh"], plan["ow"]), np.float32)
        size = plan["per_image"] + plan["tail"]
        args = (plan["per_image"], plan["phases"], self.stride[0], self.padding[0], self.padding[1], plan["h_ph"],
                self.rowptr, self.vals, self.taps, plan["tap_off"], self.bias, self.activation == "relu",
                plan["n_tiles"], plan["w_ph"], plan["oh"], plan["ow"], out)
        threads = numba.config.NUMBA_NUM_THREADS
        s = self.stride[0]
        pads = np.empty((threads, s * plan["h_ph"] * s * plan["w_ph"] + 32 if s > 1 else 1), np.float32)
        if n == 1:
            _conv_one(x.numpy(), np.empty(size, np.float32), pads, *args)
        else:
            _conv_batch(x.numpy(), np.empty((threads, size), np.float32), pads, *args)
        return torch.from_numpy(out)

    def resident_bytes(self) -> int:
        """Values, tap indices, row pointers, bias and the offset tables built so far."""
        tables = sum(p["tap_off"].nbytes for p in self._plans.values())
        return self.vals.nbytes + self.taps.nbytes + self.rowptr.nbytes + self.bias.nbytes + tables

    def file_bytes(self) -> int:
        """CSR per output channel: float32 values, uint16 tap indices (int32 from 65,536 taps per channel),
        int32 row pointers; bias not counted."""
        return self.nnz * (4 + self.taps.itemsize) + 4 * (self.out_channels + 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, nnz={self.nnz}, activation={self.activation}")
