"""A HashedNets layer computed from its K real weights without materializing the virtual matrix: each
multiply-add recomputes the index and sign hashes of its position (``coding.hashing``, SplitMix64) and gathers
from w. It holds K floats instead of n_out·n_in; what it costs in time is measured by ``bench/sharing_mnist.py``
(the runtime does not pick it on its own: see docs/sharing.md)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .fused import available

__all__ = ["HashedLinearRuntime", "available"]

if available():
    from numba import njit, prange

    @njit(cache=True, inline="always")
    def _mix(x):  # SplitMix64's finalizer, as coding.hashing._mix (uint64 arithmetic wraps)
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    @njit(cache=True, parallel=True, nogil=True)
    def _hashed_matmul(xt, w, seed, n_in, out_t):  # xt: [n_in, M]; out_t: [n_out, M]
        k = np.uint64(w.size)
        golden = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        m_cols = xt.shape[1]
        for i in prange(out_t.shape[0]):
            for m in range(m_cols):
                out_t[i, m] = 0.0
            for j in range(n_in):
                pos = np.uint64(i * n_in + j)
                base = _mix(pos * np.uint64(2) + golden)
                v = w[_mix(base ^ np.uint64(0x1D)) % k]
                if (_mix(base ^ np.uint64(0x51)) >> np.uint64(63)) != np.uint64(1):
                    v = -v
                for m in range(m_cols):
                    out_t[i, m] += v * xt[j, m]


class HashedLinearRuntime(nn.Module):
    """y = x Vᵀ + b with V_ij = ξ(i,j)·w[h(i,j)] recomputed on the fly (the bias as stored, dense)."""

    def __init__(self, buckets: Tensor, seed: int, in_features: int, out_features: int,
                 bias: Tensor | None) -> None:
        super().__init__()
        if not available():
            raise RuntimeError("HashedLinearRuntime needs numba.")
        self.w = buckets.detach().float().numpy().copy()
        self.seed, self.in_features, self.out_features = int(seed), in_features, out_features
        self.bias = None if bias is None else bias.detach().float().clone()

    def forward(self, x: Tensor) -> Tensor:
        xt = np.ascontiguousarray(x.detach().float().reshape(-1, self.in_features).numpy().T)
        out_t = np.empty((self.out_features, xt.shape[1]), dtype=np.float32)
        _hashed_matmul(xt, self.w, self.seed, self.in_features, out_t)
        y = torch.from_numpy(out_t.T.copy())
        return y if self.bias is None else y + self.bias

    def resident_bytes(self) -> int:
        return self.w.nbytes + (0 if self.bias is None else self.bias.numel() * 4)
