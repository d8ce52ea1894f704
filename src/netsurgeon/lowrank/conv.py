"""Low-rank factorizations of a Conv2d layer (the survey's "low-rank factorization" family for convolutions,
Cheng et al. Sec. 3, and its "compact filters" depthwise-separable form, Sec. 4). Each replaces one k_h x k_w
convolution W (N out, C in channels) by an ``nn.Sequential`` of smaller convolutions with the same stride, padding
and dilation, so the model stays a plain module that any runtime and ONNX run:

* ``spatial`` — Jaderberg, Vedaldi, Zisserman 2014 ("Speeding up Convolutional Neural Networks with Low Rank
  Expansions", BMVC, scheme 2, Sec. 2.2): K vertical k_h x 1 filters over the C inputs, then N horizontal
  1 x k_w filters over the K maps. The filter-reconstruction problem of scheme 2 has a closed-form optimum
  (Tai, Xiao, Zhang, Wang, E 2016, "Convolutional neural networks with low-rank regularization", ICLR, Sec. 3.1,
  Theorem 1): the rank-K truncated SVD of W reshaped to a (C·k_h) x (N·k_w) matrix.
  Weights K·(C·k_h + N·k_w) instead of N·C·k_h·k_w.
* ``cp`` — Lebedev, Ganin, Rakhuba, Oseledets, Lempitsky 2015 ("Speeding-up Convolutional Neural Networks Using
  Fine-tuned CP-Decomposition", ICLR, Sec. 3, Eq. (3)-(4)): the rank-R CP decomposition
  W[n,c,y,x] ≈ Σ_r U_n(n,r) U_c(c,r) U_y(y,r) U_x(x,r) (tensorly's ALS ``parafac``) becomes 1x1 C→R,
  depthwise k_h x 1, depthwise 1 x k_w, 1x1 R→N. Weights R·(C + k_h + k_w + N).
* ``tucker`` — Kim, Park, Yoo, Choi, Yang, Shin 2016 ("Compression of Deep Convolutional Neural Networks for Fast
  and Low Power Mobile Applications", ICLR, Sec. 2, Eq. (2)-(5)): Tucker-2 over the channel modes (tensorly's
  ``partial_tucker``), W ≈ core x_0 U_out x_1 U_in, becomes 1x1 C→R_in, k_h x k_w R_in→R_out, 1x1 R_out→N.
* ``separable`` — a depthwise k_h x k_w convolution with m filters per input channel, then a 1x1 C·m→N
  (MobileNet's depthwise-separable form, Howard et al. 2017, Sec. 3.1, with depth multiplier m). Each input
  channel's slice W[:, c] (N x k_h·k_w) is replaced by its rank-m truncated SVD, which is the best such pair in
  Frobenius norm; m = min(N, k_h·k_w) is exact.

A rank is an int, except Tucker's pair [R_in, R_out]. The decompositions run in float64 on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..changes.factorized import CONV_KINDS, conv_structure, factorizable_conv

__all__ = ["CONV_KINDS", "conv_structure", "factorize_conv", "conv_spectra", "conv_rank_at", "conv_cost",
           "factorizable_conv"]

def _spatial_matrix(w: Tensor) -> Tensor:
    """W (N, C, k_h, k_w) as the (C·k_h) x (N·k_w) matrix whose rank-K SVD is scheme 2's optimum."""
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def conv_spectra(conv: nn.Conv2d, kind: str) -> list[Tensor]:
    """The singular values that rank selection reads: spatial, the scheme-2 matrix's; separable, the per-channel
    spectra pooled (√Σ_c σ_cj²); tucker and cp, those of the mode-0 (N) and mode-1 (C) unfoldings."""
    w = conv.weight.detach().double().cpu()
    n, c = w.shape[:2]
    if kind == "spatial":
        return [torch.linalg.svdvals(_spatial_matrix(w))]
    if kind == "separable":
        s = torch.linalg.svdvals(w.transpose(0, 1).reshape(c, n, -1))       # (C, min(N, k_h·k_w))
        return [s.pow(2).sum(0).sqrt()]
    return [torch.linalg.svdvals(w.reshape(n, -1)), torch.linalg.svdvals(w.transpose(0, 1).reshape(c, -1))]


def conv_rank_at(kind: str, spectra: list[Tensor], energy: float, rank_of: Any) -> int | list[int]:
    """The rank of ``kind`` at energy threshold ``energy`` (``rank_of(s, e)``: the smallest r keeping that fraction
    of Σσ²). A CP of rank R has mode ranks <= R, so its rank is the larger of the two Tucker-2 ranks."""
    if kind in ("spatial", "separable"):
        return rank_of(spectra[0], energy)
    rout, rin = rank_of(spectra[0], energy), rank_of(spectra[1], energy)
    return [rin, rout] if kind == "tucker" else max(rin, rout)


def conv_cost(conv: nn.Conv2d, kind: str, rank: int | list[int]) -> int:
    """Weights of the factorized form (biases excluded, as everywhere)."""
    n, c, (kh, kw) = conv.out_channels, conv.in_channels, conv.kernel_size
    if kind == "spatial":
        return rank * (c * kh + n * kw)
    if kind == "cp":
        return rank * (c + kh + kw + n)
    if kind == "tucker":
        rin, rout = rank
        return c * rin + rin * rout * kh * kw + rout * n
    return c * rank * (kh * kw + n)


@torch.no_grad()
def factorize_conv(conv: nn.Conv2d, kind: str, rank: int | list[int], *, seed: int = 0,
                   cp_iters: int = 300) -> nn.Sequential:
    """``conv`` factorized by ``kind`` at ``rank`` (module docstring), bias on the last convolution."""
    seq = conv_structure(conv, kind, rank)
    w = conv.weight.detach().double().cpu()
    n, c, kh, kw = w.shape
    if kind == "spatial":
        u, s, vh = torch.linalg.svd(_spatial_matrix(w), full_matrices=False)
        root = s[:rank].sqrt()
        first = (u[:, :rank] * root).T.reshape(rank, c, kh, 1)
        second = (root[:, None] * vh[:rank]).reshape(rank, n, kw).permute(1, 0, 2).reshape(n, rank, 1, kw)
        weights = [first, second]
    elif kind == "separable":
        u, s, vh = torch.linalg.svd(w.transpose(0, 1).reshape(c, n, kh * kw), full_matrices=False)
        root = s[:, :rank].sqrt()                                                 # (C, m)
        depth = (root[:, :, None] * vh[:, :rank]).reshape(c * rank, 1, kh, kw)
        point = (u[:, :, :rank] * root[:, None, :]).permute(1, 0, 2).reshape(n, c * rank, 1, 1)
        weights = [depth, point]
    elif kind == "tucker":
        import tensorly as tl
        from tensorly.decomposition import partial_tucker

        rin, rout = rank
        with tl.backend_context("numpy"):
            (core, (u_out, u_in)), _ = partial_tucker(w.numpy(), rank=[rout, rin], modes=[0, 1], init="svd",
                                                      random_state=seed)
        core, u_out, u_in = (torch.from_numpy(np.ascontiguousarray(a)) for a in (core, u_out, u_in))
        weights = [u_in.T.reshape(rin, c, 1, 1), core, u_out.reshape(n, rout, 1, 1)]
    else:  # cp
        import tensorly as tl
        from tensorly.decomposition import parafac

        with tl.backend_context("numpy"):
            cp = parafac(w.numpy(), rank, init="svd" if rank <= min(n, c, kh, kw) else "random",
                         n_iter_max=cp_iters, tol=1e-10, random_state=seed, normalize_factors=True)
        lam = torch.from_numpy(np.ascontiguousarray(cp.weights))
        a_n, a_c, a_y, a_x = (torch.from_numpy(np.ascontiguousarray(f)) for f in cp.factors)
        scale = lam.abs().pow(0.25)                     # share λ over the four factors, its sign on the last
        weights = [(a_c * scale).T.reshape(rank, c, 1, 1), (a_y * scale).T.reshape(rank, 1, kh, 1),
                   (a_x * scale).T.reshape(rank, 1, 1, kw), (a_n * scale * lam.sign()).reshape(n, rank, 1, 1)]
    convs = [m for m in seq if isinstance(m, nn.Conv2d)]
    for m, t in zip(convs, weights, strict=True):
        m.weight.copy_(t.to(m.weight.dtype))
    if conv.bias is not None:
        convs[-1].bias.copy_(conv.bias.detach())
    return seq
