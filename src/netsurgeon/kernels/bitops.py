"""XNOR + popcount kernels for binary layers (BNN, XNOR-Net) on packed 64-bit words, compiled by numba.

Encoding: bit 1 means +1 (x >= 0), bit 0 means −1; bit j of word w holds element 64·w + j. The padding bits
past K are 0 in both operands, so they always agree and drop out of
    a·b = K − 2·popcount(a XOR b)
which is exactly the ±1 dot product (an integer, so the kernel is bit-exact against a float matmul of the
same ±1 tensors as long as K < 2^24).

numba 0.68 types neither ``np.bitwise_count`` nor ``int.bit_count`` inside ``@njit``; an intrinsic emitting
LLVM's ``ctpop`` (one POPCNT instruction on x86-64) does the job (``../shared/papers/binary.md`` §5).
Each kernel fuses the epilogue: out[m, n] = dot · col_scale[n] · row_scale[m] + bias[n].
"""

from __future__ import annotations

import numpy as np

from .fused import available

__all__ = ["pack_signs", "xnor_matmul", "xnor_matmul_signs", "words_for", "available", "sign_lut_matmul"]

if available():
    from numba import njit, prange, types
    from numba.extending import intrinsic

    @intrinsic
    def _popcount(typingctx, x):  # type: ignore[no-untyped-def]
        if not (isinstance(x, types.Integer) and x.bitwidth == 64):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.ctpop(args[0])

        return types.uint64(x), codegen

    @njit(cache=True, parallel=True, nogil=True)
    def _pack(x, out):  # x: float32 [M, K]; out: uint64 [M, W], zero padded
        m_rows, k = x.shape
        n_words = out.shape[1]
        for m in prange(m_rows):
            for w in range(n_words):
                word = np.uint64(0)
                base = 64 * w
                top = min(64, k - base)
                for j in range(top):
                    if x[m, base + j] >= 0:
                        word |= np.uint64(1) << np.uint64(j)
                out[m, w] = word

    @njit(cache=True, nogil=True)
    def _pack_one(x, out):  # one row: no thread start-up
        k = x.shape[1]
        for w in range(out.shape[1]):
            word = np.uint64(0)
            base = 64 * w
            for j in range(min(64, k - base)):
                if x[0, base + j] >= 0:
                    word |= np.uint64(1) << np.uint64(j)
            out[0, w] = word

    @njit(cache=True, nogil=True)
    def _gemm_one(a, b, k, col_scale, row_scale, bias, out, n0, n1):
        n_words = a.shape[1]
        for n in range(n0, n1):
            pc = 0
            for w in range(n_words):
                pc += _popcount(a[0, w] ^ b[n, w])
            out[0, n] = np.float32(k - 2 * pc) * col_scale[n] * row_scale[0] + bias[n]

    @njit(cache=True, parallel=True, nogil=True)
    def _gemm_b1(a, b, k, col_scale, row_scale, bias, out):
        n_out = b.shape[0]
        chunks = (n_out + 63) // 64
        for c in prange(chunks):
            _gemm_one(a, b, k, col_scale, row_scale, bias, out, 64 * c, min(n_out, 64 * c + 64))

    @njit(cache=True, parallel=True, nogil=True)
    def _gemm(a, b, k, col_scale, row_scale, bias, out):
        m_rows, n_words = a.shape
        n_out = b.shape[0]
        for m in prange(m_rows):
            n = 0
            while n + 4 <= n_out:  # four outputs share each loaded input word
                p0 = 0
                p1 = 0
                p2 = 0
                p3 = 0
                for w in range(n_words):
                    aw = a[m, w]
                    p0 += _popcount(aw ^ b[n, w])
                    p1 += _popcount(aw ^ b[n + 1, w])
                    p2 += _popcount(aw ^ b[n + 2, w])
                    p3 += _popcount(aw ^ b[n + 3, w])
                rs = row_scale[m]
                out[m, n] = np.float32(k - 2 * p0) * col_scale[n] * rs + bias[n]
                out[m, n + 1] = np.float32(k - 2 * p1) * col_scale[n + 1] * rs + bias[n + 1]
                out[m, n + 2] = np.float32(k - 2 * p2) * col_scale[n + 2] * rs + bias[n + 2]
                out[m, n + 3] = np.float32(k - 2 * p3) * col_scale[n + 3] * rs + bias[n + 3]
                n += 4
            while n < n_out:
                pc = 0
                for w in range(n_words):
                    pc += _popcount(a[m, w] ^ b[n, w])
                out[m, n] = np.float32(k - 2 * pc) * col_scale[n] * row_scale[m] + bias[n]
                n += 1


    @njit(cache=True, parallel=True, nogil=True)
    def _gemm_signs(a, b, k, col_scale, bias, out):
        """Like _gemm, but the next binary layer only needs the signs: out[m] packs (z >= 0) of
        z[n] = dot·col_scale[n] + bias[n], 64 outputs per word (a BNN layer with its BatchNorm folded in)."""
        m_rows, n_words = a.shape
        n_out = b.shape[0]
        out_words = out.shape[1]
        for idx in prange(m_rows * out_words):
            m = idx // out_words
            ow = idx - m * out_words
            word = np.uint64(0)
            for j in range(min(64, n_out - 64 * ow)):
                n = 64 * ow + j
                pc = 0
                for w in range(n_words):
                    pc += _popcount(a[m, w] ^ b[n, w])
                if np.float32(k - 2 * pc) * col_scale[n] + bias[n] >= 0:
                    word |= np.uint64(1) << np.uint64(j)
            out[m, ow] = word

    @njit(cache=True, nogil=True, inline="always")
    def _lut_table(x, m, table):
        """table[g, b] = Σ_j (bit j of b ? x : −x)[m, 8g + j] for every byte value b: the sum of a 16-entry table of
        the low nibble and one of the high nibble, so the 256 entries are independent adds (vectorized)."""
        lo = np.empty(16, np.float32)
        hi = np.empty(16, np.float32)
        for g in range(table.shape[0]):
            base = 8 * g
            for b in range(16):
                s = np.float32(0.0)
                t = np.float32(0.0)
                for j in range(4):
                    if (b >> j) & 1:
                        s += x[m, base + j]
                        t += x[m, base + 4 + j]
                    else:
                        s -= x[m, base + j]
                        t -= x[m, base + 4 + j]
                lo[b] = s
                hi[b] = t
            for h in range(16):
                for lo_b in range(16):
                    table[g, 16 * h + lo_b] = hi[h] + lo[lo_b]

    @njit(cache=True, parallel=True, nogil=True)
    def _lut(x, wbytes, col_scale, bias, out, chunks):
        """Real input x [M, 8·G] (zero padded) times ±1 weights given as bytes [N, G] (bit 1 = +1): per sample a
        table of the 256 signed sums of each group of 8 inputs, then each output sums G table entries (8 inputs
        per lookup). Each of ``chunks`` threads builds its own table (one fork per call) for its outputs."""
        m_rows = x.shape[0]
        n_out, groups = wbytes.shape
        step = (n_out + chunks - 1) // chunks
        for c in prange(chunks):
            n0 = c * step
            n1 = min(n_out, n0 + step)
            table = np.empty((groups, 256), dtype=np.float32)
            for m in range(m_rows):
                _lut_table(x, m, table)
                for n in range(n0, n1):
                    acc = np.float32(0.0)
                    for g in range(groups):
                        acc += table[g, wbytes[n, g]]
                    out[m, n] = acc * col_scale[n] + bias[n]


def xnor_matmul_signs(a: np.ndarray, b: np.ndarray, k: int, col_scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The packed signs (uint64 [M, ceil(N/64)]) of ``(K − 2·popcount(a[m] XOR b[n]))·col_scale[n] + bias[n]``."""
    n = b.shape[0]
    out = np.empty((a.shape[0], words_for(n)), dtype=np.uint64)
    cs = np.ascontiguousarray(col_scale, np.float32).reshape(n)
    bs = np.ascontiguousarray(bias, np.float32).reshape(n)
    if not available():
        return pack_signs(xnor_matmul(a, b, k, cs, None, bs))
    _gemm_signs(a, b, k, cs, bs, out)
    return out


def sign_lut_matmul(x: np.ndarray, wbytes: np.ndarray, col_scale: np.ndarray, bias: np.ndarray | None = None,
                    ) -> np.ndarray:
    """``x @ (±1 weights)ᵀ · col_scale + bias`` for a real input (float32 [M, K]) and weights packed as
    :func:`pack_signs` bytes ([N, ceil(K/64)·8] uint8), by table lookup; float32 [M, N]."""
    m, k = x.shape
    n, groups = wbytes.shape
    xp = np.zeros((m, 8 * groups), dtype=np.float32)
    xp[:, :k] = x
    cs = np.ascontiguousarray(col_scale, np.float32).reshape(n)
    bs = np.zeros(n, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    out = np.empty((m, n), dtype=np.float32)
    if not available():
        bits = np.unpackbits(wbytes, axis=1, bitorder="little").astype(np.float32) * 2 - 1
        return ((xp @ bits.T) * cs + bs).astype(np.float32)
    import numba

    _lut(xp, wbytes, cs, bs, out, max(1, min(numba.get_num_threads(), n)))
    return out


def words_for(k: int) -> int:
    """64-bit words that hold ``k`` bits."""
    return (k + 63) // 64


def pack_signs(x: np.ndarray) -> np.ndarray:
    """Pack the signs of a float32 [M, K] array (bit 1: x >= 0) into uint64 [M, ceil(K/64)], zero padded."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], words_for(x.shape[1])), dtype=np.uint64)
    if available():
        (_pack_one if x.shape[0] == 1 else _pack)(x, out)
        return out
    bits = np.zeros((x.shape[0], out.shape[1] * 64), dtype=bool)
    bits[:, :x.shape[1]] = x >= 0
    return np.packbits(bits, axis=1, bitorder="little").view(np.uint64).reshape(out.shape)


def xnor_matmul(a: np.ndarray, b: np.ndarray, k: int, col_scale: np.ndarray, row_scale: np.ndarray | None = None,
                bias: np.ndarray | None = None) -> np.ndarray:
    """``(K − 2·popcount(a[m] XOR b[n])) · col_scale[n] · row_scale[m] + bias[n]`` as float32 [M, N].

    ``a``: packed inputs uint64 [M, W]; ``b``: packed weights uint64 [N, W]; ``k``: the true number of bits.
    """
    m, n = a.shape[0], b.shape[0]
    rs = np.ones(m, np.float32) if row_scale is None else np.ascontiguousarray(row_scale, np.float32).reshape(m)
    bs = np.zeros(n, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    cs = np.ascontiguousarray(col_scale, np.float32).reshape(n)
    out = np.empty((m, n), dtype=np.float32)
    if not available():  # reference path: unpack and count in numpy (slow, exact)
        diff = np.unpackbits((a[:, None, :] ^ b[None, :, :]).view(np.uint8), axis=-1).sum(-1)
        return ((k - 2 * diff).astype(np.float32) * cs[None, :] * rs[:, None] + bs[None, :]).astype(np.float32)
    if m == 1:
        _gemm_b1(a, b, k, cs, rs, bs, out)
    else:
        _gemm(a, b, k, cs, rs, bs, out)
    return out
