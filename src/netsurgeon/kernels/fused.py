"""Compiled CPU kernels (numba) for the runtime modules: a fused chain of sparse Linear(+ReLU) layers whose
values are either float32 or k-means codes into a per-layer codebook, and the activation (de)quantization
around an int8 matmul.

Why numba: it installs from pip alone (no system compiler), compiles at first use and caches the machine
code next to this file; the measurements that chose it are in docs/runtime.md. Every kernel is also correct
without numba installed (``available()`` is then False and the runtime keeps torch's kernels).

Layout of a chain (``pack_chain``): the layers' CSR row pointers (int32), column indices (uint16 when every
layer has < 65,536 inputs and the values are codes, else int32), values (float32) *or* codes (uint8) with one
codebook per layer, and biases are each concatenated into one array, and ``meta[l] = (n_in, n_out, rowptr
offset, bias offset or -1, relu, codebook offset)``. One call runs the whole chain, so at batch 1 the
framework's per-layer call cost (~7 us per torch CSR call here) is paid once. Two loops:

- batch 1: for each output row, a scalar dot product over its nonzeros, gathering the inputs;
- batch > 1: the activations are held transposed (features x batch), so each nonzero adds ``v * x[c, :]``,
  a contiguous, vectorized axpy over the batch; rows run in parallel (``prange``).
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba is a dependency, but the runtime must degrade to torch's kernels, not fail, without it
    import numba
    from numba import njit, prange

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    _HAVE_NUMBA = False

__all__ = ["available", "pack_chain", "PackedChain", "chain_forward", "quantize_rows", "dequantize_rows",
           "set_threads"]


def available() -> bool:
    return _HAVE_NUMBA


_threads = [0]


def set_threads(n: int) -> None:
    """numba's worker count for the parallel kernels (capped at what numba started with). The first call starts
    numba's threading layer, which here binds to the OpenMP runtime torch uses and resets its thread count to
    numba's pool size: torch's count is put back, so a process set to 1 torch thread stays at 1 (measured: it
    read 2 after the first numba call)."""
    if _HAVE_NUMBA and n != _threads[0]:
        import torch

        torch_threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        _threads[0] = n


class PackedChain:
    """The arrays one fused call needs (see the module doc). ``keep`` lists the inputs any weight of the
    first layer reads: the others are never gathered."""

    def __init__(self, meta, keep, rowptr, cols, vals, codes, books, bias, width, n_in, n_out) -> None:
        self.meta, self.keep, self.rowptr, self.cols = meta, keep, rowptr, cols
        self.vals, self.codes, self.books, self.bias = vals, codes, books, bias
        self.width, self.n_in, self.n_out = width, n_in, n_out
        self.shared = codes.size > 0

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.meta, self.keep, self.rowptr, self.cols, self.vals, self.codes,
                                      self.books, self.bias))


def pack_chain(layers: list[dict]) -> PackedChain:
    """Pack ``layers`` (each: ``rows``, ``cols`` (nonzero coordinates, row-major order), ``values`` (float32)
    or ``codes`` (uint8, 0-based into ``book``) + ``book``, ``bias`` or None, ``relu``, ``n_in``, ``n_out``)
    into one :class:`PackedChain`. All layers must be of the same kind (float values or codes)."""
    shared = "codes" in layers[0]
    if any(("codes" in layer) != shared for layer in layers):
        raise ValueError("pack_chain: a chain mixes codebook and float layers")
    first_cols = np.asarray(layers[0]["cols"], dtype=np.int64)
    keep = np.unique(first_cols)
    remap = np.full(layers[0]["n_in"], -1, dtype=np.int64)
    remap[keep] = np.arange(keep.size)
    # uint16 columns keep a k-means chain's memory near its file size; int32 gathers ~20% faster at batch 1
    # (docs/runtime.md), so float chains, which hold 4-byte values anyway, use int32
    col_dtype = np.uint16 if shared and max(layer["n_in"] for layer in layers) < 65536 else np.int32
    meta, rowptrs, cols, vals, codes, books, biases = [], [], [], [], [], [], []
    nz = rp = bo = bk = 0
    for i, layer in enumerate(layers):
        rows = np.asarray(layer["rows"], dtype=np.int64)
        c = np.asarray(layer["cols"], dtype=np.int64)
        if i == 0:
            c = remap[c]
        counts = np.bincount(rows, minlength=layer["n_out"])
        rowptrs.append((np.concatenate([[0], np.cumsum(counts)]) + nz).astype(np.int32))
        cols.append(c.astype(col_dtype))
        if shared:
            codes.append(np.asarray(layer["codes"], dtype=np.uint8))
            books.append(np.asarray(layer["book"], dtype=np.float32))
        else:
            vals.append(np.asarray(layer["values"], dtype=np.float32))
        has_bias = layer.get("bias") is not None
        if has_bias:
            biases.append(np.asarray(layer["bias"], dtype=np.float32))
        meta.append([keep.size if i == 0 else layer["n_in"], layer["n_out"], rp, bo if has_bias else -1,
                     int(layer["relu"]), bk])
        nz += rows.size
        rp += layer["n_out"] + 1
        bo += layer["n_out"] if has_bias else 0
        bk += books[-1].size if shared else 0

    def cat(parts, dtype):
        return np.ascontiguousarray(np.concatenate(parts).astype(dtype)) if parts else np.zeros(0, dtype)

    width = max(max(m[0], m[1]) for m in meta)
    return PackedChain(np.asarray(meta, dtype=np.int64), keep.astype(np.int32), cat(rowptrs, np.int32),
                       cat(cols, col_dtype), cat(vals, np.float32), cat(codes, np.uint8), cat(books, np.float32),
                       cat(biases, np.float32), int(width), layers[0]["n_in"], layers[-1]["n_out"])


if _HAVE_NUMBA:
    def _make(shared: bool):
        """The two chain loops, with values read as ``vals[p]`` or ``books[off + codes[p]]`` (``shared`` is a
        compile-time constant: each variant compiles without the other's branch)."""

        @njit(fastmath=True, boundscheck=False, cache=True)
        def one(x, keep, out, meta, rowptr, cols, vals, codes, books, bias, width):
            a = np.empty(width, np.float32)
            b = np.empty(width, np.float32)
            for j in range(keep.shape[0]):
                a[j] = x[keep[j]]
            src, dst = a, b
            n_layers = meta.shape[0]
            for layer in range(n_layers):
                n_out, rp0, boff, relu, bk = meta[layer, 1], meta[layer, 2], meta[layer, 3], meta[layer, 4], \
                    meta[layer, 5]
                for i in range(n_out):
                    acc = bias[boff + i] if boff >= 0 else np.float32(0.0)
                    for p in range(rowptr[rp0 + i], rowptr[rp0 + i + 1]):
                        v = books[bk + codes[p]] if shared else vals[p]
                        acc += v * src[cols[p]]
                    dst[i] = max(acc, np.float32(0.0)) if relu else acc
                src, dst = dst, src
            for i in range(out.shape[0]):
                out[i] = src[i]

        @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
        def many(xt, meta, rowptr, cols, vals, codes, books, bias, width):
            n = xt.shape[1]
            src = xt
            n_layers = meta.shape[0]
            for layer in range(n_layers):
                n_out, rp0, boff, relu, bk = meta[layer, 1], meta[layer, 2], meta[layer, 3], meta[layer, 4], \
                    meta[layer, 5]
                dst = np.empty((n_out, n), np.float32)
                for i in prange(n_out):
                    d = dst[i]
                    bv = bias[boff + i] if boff >= 0 else np.float32(0.0)
                    for t in range(n):
                        d[t] = bv
                    p, pe = rowptr[rp0 + i], rowptr[rp0 + i + 1]
                    while p + 4 <= pe:  # four nonzeros per pass: a quarter of the loads/stores of d
                        v0 = books[bk + codes[p]] if shared else vals[p]
                        v1 = books[bk + codes[p + 1]] if shared else vals[p + 1]
                        v2 = books[bk + codes[p + 2]] if shared else vals[p + 2]
                        v3 = books[bk + codes[p + 3]] if shared else vals[p + 3]
                        s0, s1, s2, s3 = src[cols[p]], src[cols[p + 1]], src[cols[p + 2]], src[cols[p + 3]]
                        for t in range(n):
                            d[t] += (v0 * s0[t] + v1 * s1[t]) + (v2 * s2[t] + v3 * s3[t])
                        p += 4
                    while p < pe:
                        v = books[bk + codes[p]] if shared else vals[p]
                        s = src[cols[p]]
                        for t in range(n):
                            d[t] += v * s[t]
                        p += 1
                    if relu:
                        for t in range(n):
                            d[t] = max(d[t], np.float32(0.0))
                src = dst
            return src

        return one, many

    _FLOAT = _make(False)
    _SHARED = _make(True)

    @njit(boundscheck=False, parallel=True, cache=True)
    def _gather_t(x, keep, out):
        """``out[j, t] = x[t, keep[j]]`` in 32 x 32 blocks (what numpy's ``x[:, keep].T`` copy does, faster)."""
        n, nk = x.shape[0], keep.shape[0]
        for jb in prange((nk + 31) // 32):
            j0, j1 = jb * 32, min(nk, jb * 32 + 32)
            for t0 in range(0, n, 32):
                t1 = min(n, t0 + 32)
                for j in range(j0, j1):
                    c = keep[j]
                    for t in range(t0, t1):
                        out[j, t] = x[t, c]

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _quantize_rows(x, q, scale):
        n = x.shape[1]
        for r in prange(x.shape[0]):
            lanes = np.zeros(16, np.float32)  # 16 running maxima: a single one is a latency-bound chain
            j = 0
            while j + 16 <= n:
                for k in range(16):
                    v = abs(x[r, j + k])
                    lanes[k] = v if v > lanes[k] else lanes[k]
                j += 16
            amax = np.float32(0.0)
            for k in range(16):
                amax = lanes[k] if lanes[k] > amax else amax
            for k in range(j, n):
                v = abs(x[r, k])
                amax = v if v > amax else amax
            s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
            scale[r] = s
            inv = np.float32(1.0) / s
            for k in range(n):  # |x * inv| <= 127: round half up, no clamp needed
                q[r, k] = np.int8(np.int32(math.floor(x[r, k] * inv + np.float32(0.5))))

    @njit(fastmath=True, boundscheck=False, parallel=True, cache=True)
    def _dequantize_rows(acc, row_scale, col_scale, bias, has_bias, relu, out):
        for r in prange(acc.shape[0]):
            s = row_scale[r]
            for j in range(acc.shape[1]):
                v = np.float32(acc[r, j]) * s * col_scale[j] + (bias[j] if has_bias else np.float32(0.0))
                out[r, j] = max(v, np.float32(0.0)) if relu else v


def chain_forward(pc: PackedChain, x: np.ndarray) -> np.ndarray:
    """Run the packed chain on ``x`` (N, n_in) float32, C-contiguous; returns (N, n_out) float32 (for N > 1 a
    transposed view of a fresh array)."""
    one, many = _SHARED if pc.shared else _FLOAT
    if x.shape[0] == 1:
        out = np.empty((1, pc.n_out), np.float32)
        one(x[0], pc.keep, out[0], pc.meta, pc.rowptr, pc.cols, pc.vals,
            pc.codes, pc.books, pc.bias, pc.width)
        return out
    xt = np.empty((pc.keep.size, x.shape[0]), np.float32)
    _gather_t(x, pc.keep, xt)
    return many(xt, pc.meta, pc.rowptr, pc.cols, pc.vals, pc.codes, pc.books, pc.bias, pc.width).T


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (one scale per sample): ``q = round(x / s)``, ``s = max|x_row| / 127``."""
    q = np.empty(x.shape, np.int8)
    s = np.empty(x.shape[0], np.float32)
    _quantize_rows(x, q, s)
    return q, s


def dequantize_rows(acc: np.ndarray, row_scale: np.ndarray, col_scale: np.ndarray, bias: np.ndarray | None,
                    relu: bool = False) -> np.ndarray:
    """``acc[r, j] * row_scale[r] * col_scale[j] + bias[j]`` (then ReLU) in one pass."""
    out = np.empty(acc.shape, np.float32)
    b = bias if bias is not None else np.zeros(1, np.float32)
    _dequantize_rows(acc, row_scale, col_scale, b, bias is not None, relu, out)
    return out
