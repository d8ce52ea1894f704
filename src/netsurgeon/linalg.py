"""Pure math on tensors: damped empirical-Fisher inverses (Woodbury), OBS statistics and updates.

No modules, no hooks. Shapes are given in each docstring; d is the number of parameters of a block and
m the number of gradients (outer products).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["woodbury_rank1_update", "fisher_inverse_recursive", "fisher_inverse", "ImplicitFisherInverse", "obs_scores",
           "KroneckerInverse", "kfac_damped_inverses", "BatchedFisherInverse", "prefer_factored", "EXPLICIT_MAX",
           "obd_scores", "nearest_psd", "relative_damp", "squared_norm",
           "obs_update_single_sum", "obs_update_joint", "woodtaylor_scores", "woodtaylor_update",
           "damp_layer_hessian", "inverse_cholesky_upper"]

EXPLICIT_MAX = 8192  # larger blocks (the full inverse of a big model) stay in factored Woodbury form


def prefer_factored(n: int, m: int) -> bool:
    """Keep the inverse of an n-weight block built from m gradients as the factored Woodbury form Y (m x n numbers
    held, 2·m·n while it is built) rather than the explicit n x n matrix, when that is smaller (n > 2m) or the
    block is too big to hold explicitly (n > EXPLICIT_MAX)."""
    return n > 2 * m or n > EXPLICIT_MAX


def relative_damp(damp: float, sum_sq: float, m: int, d: int) -> float:
    """λ = damp · mean(diag F̂) = damp · Σ_i ‖g_i‖² / (m·d): a damping relative to the curvature it regularizes
    (ours, docs/woodfisher.md "Relative dampening"). ``sum_sq`` = Σ_i ‖g_i‖² over the m gradients of d weights."""
    return damp * sum_sq / (m * d)


def squared_norm(t: Tensor) -> Tensor:
    """Σ t² accumulated in float64 (0-dim), one row ``t[i]`` at a time: the Σ_i ‖g_i‖² of :func:`relative_damp`
    with a float64 copy of one row, not of all of ``t`` (for m x d float32 gradients ``t.double().pow(2)`` held 16
    bytes per entry beside the 4 of the gradients: 3.1 GiB on a 3.3M-weight GPT with m = 64). Shapes: (m, ...)."""
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for row in t.reshape(len(t), -1) if t.dim() > 1 else t.reshape(1, -1):
        total += row.double().square_().sum()
    return total


def woodbury_rank1_update(inv: Tensor, g: Tensor, n: int) -> Tensor:
    """Return (A + g gᵀ/n)⁻¹ given ``inv`` = A⁻¹ (Sherman-Morrison; A symmetric).

    WoodFisher builds the inverse empirical Fisher one gradient at a time with this recursion (Singh &
    Alistarh 2020, arXiv:2004.14340, Sec. 3, the recursion following the empirical Fisher of Eq. (2)).
    Shapes: inv (d, d), g (d,). Cost O(d²).
    """
    u = inv @ g
    return inv - torch.outer(u, u) / (n + g @ u)


def fisher_inverse_recursive(grads: Tensor, damp: float) -> Tensor:
    """(λI + (1/m) Σ g gᵀ)⁻¹ by m Sherman-Morrison steps from λ⁻¹I (the paper's recursion, O(m·d²)).

    Shapes: grads (m, d) -> (d, d). The reference for :func:`fisher_inverse`.
    """
    m, d = grads.shape
    inv = torch.eye(d, dtype=grads.dtype, device=grads.device) / damp
    for g in grads:
        inv = woodbury_rank1_update(inv, g, m)
    return inv


def fisher_inverse(grads: Tensor, damp: float) -> Tensor:
    """(λI + (1/m) GᵀG)⁻¹, the same matrix as the recursion, computed in a few matmuls.

    With m < d, the m×m Woodbury identity F⁻¹ = λ⁻¹ [I − Gᵀ (mλ I_m + G Gᵀ)⁻¹ G] (cost O(m·d² + m²·d + m³));
    with m >= d, a Cholesky inverse of F itself (cost O(m·d² + d³)). Shapes: grads G (m, d) -> (d, d), or a batch
    of equal-size blocks (nb, m, d) -> (nb, d, d). Computed in the dtype of ``grads`` (use float64 for tiny λ).
    """
    m, d = grads.shape[-2:]
    if m == 0:
        return torch.eye(d, dtype=grads.dtype, device=grads.device).expand(*grads.shape[:-2], d, d) / damp
    if m >= d:
        f = grads.mT @ grads / m
        f.diagonal(dim1=-2, dim2=-1).add_(damp)
        return torch.cholesky_inverse(torch.linalg.cholesky(f))
    small = grads @ grads.mT
    small.diagonal(dim1=-2, dim2=-1).add_(m * damp)
    chol = torch.linalg.cholesky(small)                         # (m, m), SPD since λ > 0
    x = torch.cholesky_solve(grads, chol)                       # (m, d) = (mλI + GGᵀ)⁻¹ G
    inv = -(grads.mT @ x)
    inv.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return inv / damp


class ImplicitFisherInverse:
    """F⁻¹ = λ⁻¹ [I − Gᵀ (mλI + GGᵀ)⁻¹ G] kept in factored form: memory O(m·d), never the d×d matrix.

    For a full (all-layer) WoodFisher inverse when d is large. With LLᵀ = mλI + GGᵀ (Cholesky) and Y = L⁻¹G,
    Gᵀ(mλI + GGᵀ)⁻¹G = YᵀY, so only Y (m, d) is kept: one triangular solve instead of the two of a full solve,
    and half the memory of keeping G beside (mλI + GGᵀ)⁻¹G. The diagonal, λ⁻¹(1 − ‖Y[:, q]‖²), is computed once
    (O(m·d), no (m, d) temporary); a product F⁻¹v costs O(m·d), k columns O(m·d·k). Building it costs
    O(m²·d + m³). Shapes: grads (m, d), or a batch of equal-size blocks (nb, m, d) (then vectors are (nb, d)).
    """

    def __init__(self, grads: Tensor, damp: float) -> None:
        m = grads.shape[-2]
        small = grads @ grads.mT
        small.diagonal(dim1=-2, dim2=-1).add_(m * damp)
        self.damp = damp
        self.y = torch.linalg.solve_triangular(torch.linalg.cholesky(small), grads, upper=False)   # (m, d)
        self._diag: Tensor | None = None

    def diagonal(self) -> Tensor:
        if self._diag is None:
            self._diag = (1.0 - torch.linalg.vector_norm(self.y, dim=-2).square()) / self.damp
        return self._diag

    def __matmul__(self, v: Tensor) -> Tensor:
        if self.y.dim() == 2:
            return (v - self.y.T @ (self.y @ v)) / self.damp
        return (v - (self.y.mT @ (self.y @ v.unsqueeze(-1))).squeeze(-1)) / self.damp   # (nb, d)

    def columns(self, idx: Tensor) -> Tensor:
        """F⁻¹[:, idx], shape (d, len(idx))."""
        cols = -(self.y.T @ self.y[:, idx])
        cols[idx, torch.arange(len(idx), device=cols.device)] += 1.0
        return cols / self.damp


class KroneckerInverse:
    """(G ⊗ A)⁻¹ = G⁻¹ ⊗ A⁻¹ over one Linear layer's weight W (out, in), flattened row-major: the K-FAC
    approximation of that layer's Fisher (Martens & Grosse 2015, Sec. 3), F_(ij),(kl) = G_ik A_jl with
    A = E[a aᵀ] (layer inputs) and G = E[g gᵀ] (gradients at its outputs). Never forms the (out·in)² matrix:
    the diagonal is diag(G⁻¹) diag(A⁻¹)ᵀ and F⁻¹ vec(V) = vec(G⁻¹ V A⁻¹). Shapes: ginv (out, out), ainv (in, in).
    """

    def __init__(self, ginv: Tensor, ainv: Tensor) -> None:
        self.ginv, self.ainv = ginv, ainv
        self.shape = (ginv.shape[0], ainv.shape[0])

    def diagonal(self) -> Tensor:
        return torch.outer(self.ginv.diagonal(), self.ainv.diagonal()).reshape(-1)

    def __matmul__(self, v: Tensor) -> Tensor:
        return (self.ginv @ v.reshape(self.shape) @ self.ainv).reshape(-1)

    def columns(self, idx: Tensor) -> Tensor:
        """F⁻¹[:, idx], shape (d, len(idx))."""
        i, j = idx // self.shape[1], idx % self.shape[1]
        return (self.ginv[:, i][:, None, :] * self.ainv[:, j][None, :, :]).reshape(-1, len(idx))


def kfac_damped_inverses(a: Tensor, g: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """Inverses of the K-FAC factors with factored Tikhonov damping (Martens & Grosse 2015, Sec. 6.3):
    (A + π√λ I)⁻¹ and (G + (√λ/π) I)⁻¹, π = sqrt((tr A / dim A) / (tr G / dim G)), so that the damped
    Kronecker product approximates F + λI with the damping split in proportion to the factors' scales."""
    pi = math.sqrt(max(float(a.diagonal().mean()), 1e-30) / max(float(g.diagonal().mean()), 1e-30))
    root = math.sqrt(damp)
    ai = torch.linalg.inv(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
    gi = torch.linalg.inv(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    return 0.5 * (gi + gi.T), 0.5 * (ai + ai.T)


class BatchedFisherInverse:
    """The damped inverse empirical Fisher of nb equal-size blocks at once, each kept in the form a single block
    would take (:func:`prefer_factored`): explicit (:func:`fisher_inverse`) or factored
    (:class:`ImplicitFisherInverse`). For the low-memory WoodFisher, which builds the inverses of a chunk of blocks,
    uses them and lets them go. Shapes: grads (nb, m, n); vectors (nb, n).
    """

    def __init__(self, grads: Tensor, damp: float) -> None:
        nb, m, n = grads.shape
        self.shape = (nb, n)
        self.op: ImplicitFisherInverse | None = ImplicitFisherInverse(grads, damp) if prefer_factored(n, m) else None
        self.inv = fisher_inverse(grads, damp) if self.op is None else None   # (nb, n, n)

    def diagonal(self) -> Tensor:
        return self.op.diagonal() if self.op is not None else self.inv.diagonal(dim1=-2, dim2=-1)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.op @ v if self.op is not None else (self.inv @ v.unsqueeze(-1)).squeeze(-1)


def _columns(hinv: Tensor | ImplicitFisherInverse | KroneckerInverse, idx: Tensor) -> Tensor:
    return hinv.columns(idx) if isinstance(hinv, (ImplicitFisherInverse, KroneckerInverse)) else hinv[:, idx]


def nearest_psd(h: Tensor) -> Tensor:
    """The symmetric positive semi-definite matrix nearest to ``h`` in Frobenius norm: eigenvalues clipped at 0
    (Higham 1988, "Computing a nearest symmetric positive semidefinite matrix", Theorem 2.1).

    The exact Hessian of a trained network is indefinite; OBS's saliency w_q² / (2 [H⁻¹]_qq) is meaningless
    for negative [H⁻¹]_qq (the most important weights would rank first). Shapes: (d, d) -> (d, d).
    """
    sym = 0.5 * (h + h.T)
    vals, vecs = torch.linalg.eigh(sym)
    return (vecs * vals.clamp_min(0)) @ vecs.T


def obd_scores(w: Tensor, curvature_diag: Tensor, damp: float) -> Tensor:
    """OBD saliency s_q = ½ h_qq w_q² (LeCun, Denker & Solla 1990, the saliency of step 4 of their procedure) with
    h_qq = λ + F_qq, the damped diagonal of a Fisher estimate of the Hessian. Shapes: (d,), (d,) -> (d,)."""
    return 0.5 * w.pow(2) * (damp + curvature_diag)


def obs_scores(w: Tensor, hinv_diag: Tensor) -> Tensor:
    """OBS saliency ρ_q = w_q² / (2 [H⁻¹]_qq) (Hassibi & Stork 1993; WoodFisher Sec. 4). Shapes: (d,), (d,)."""
    return w.pow(2) / (2 * hinv_diag)


def obs_update_single_sum(w: Tensor, hinv: Tensor | ImplicitFisherInverse, prune: Tensor) -> Tensor:
    """Sum of the single-weight OBS corrections δw = −Σ_q (w_q / [H⁻¹]_qq) H⁻¹ e_q over q in ``prune``.

    What the official WoodFisher code applies when several weights go at once (exact only if [H⁻¹]_QQ is
    diagonal). Shapes: w (d,), hinv (d, d), prune (d,) bool -> δw (d,).
    """
    s = torch.zeros_like(w)
    s[prune] = -w[prune] / hinv.diagonal()[prune]
    return hinv @ s


def obs_update_joint(w: Tensor, hinv: Tensor | ImplicitFisherInverse, prune: Tensor) -> Tensor:
    """Exact OBS update for removing the set Q together: δw = −H⁻¹E_Qᵀ (E_Q H⁻¹ E_Qᵀ)⁻¹ E_Q w.

    (WoodFisher Sec. 4, "pruning multiple weights"). After it, w + δw is exactly 0 on Q.
    Shapes: w (d,), hinv (d, d), prune (d,) bool -> δw (d,). Cost O(|Q|³ + d·|Q|).
    """
    idx = prune.nonzero().squeeze(1)
    if idx.numel() == 0:
        return torch.zeros_like(w)
    cols = _columns(hinv, idx)                                  # (d, |Q|) = H⁻¹ E_Qᵀ
    lam = torch.linalg.solve(cols[idx], w[idx])                 # (|Q|,)
    return -(cols @ lam)


def woodtaylor_scores(w: Tensor, hinv: Tensor | ImplicitFisherInverse, grad: Tensor) -> Tensor:
    """WoodTaylor saliency with the gradient term kept (WoodFisher Sec. 5, "WoodTaylor"), for ranking:

    ρ_q = ½ (w_q − [H⁻¹g]_q)² / [H⁻¹]_qq. The full change of the local model also has −½ gᵀH⁻¹g, but that term
    is the same for every weight of the network, so it is left out: computed per block, it would shift whole
    blocks against each other in a global ranking. Shapes: w, grad (d,), hinv (d, d) -> (d,).
    """
    hg = hinv @ grad
    return 0.5 * (w - hg).pow(2) / hinv.diagonal()


def woodtaylor_update(w: Tensor, hinv: Tensor | ImplicitFisherInverse, grad: Tensor,
                      prune: Tensor) -> Tensor:
    """The WoodTaylor step: the Newton step −H⁻¹g plus the summed OBS corrections with w − H⁻¹g in place of w.

    Shapes: w, grad (d,), hinv (d, d), prune (d,) bool -> δw (d,).
    """
    hg = hinv @ grad
    return -hg + obs_update_single_sum(w - hg, hinv, prune)


def damp_layer_hessian(H: Tensor, damp_ratio: float) -> tuple[Tensor, Tensor]:
    """A layer Hessian H = 2XXᵀ made positive definite as SparseGPT/GPTQ do: inputs that never fired (H_ii = 0,
    "dead") get H_ii = 1, then λ = damp_ratio · mean(diag H) is added to the diagonal (1% in both papers).

    Returns ``(H + λI, dead)``; the caller zeroes the weights of dead inputs (they never change the output on
    the calibration data). Shapes: H (d, d) -> (d, d), dead (d,) bool. ``H`` is not modified.
    """
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp_ratio * H.diagonal().mean())
    return H, dead


def inverse_cholesky_upper(H: Tensor) -> Tensor:
    """The upper-triangular U with UᵀU = H⁻¹ (H symmetric positive definite).

    Row i of U, divided by U_ii, is the OBS update of the weights j >= i when weight i is removed *after* the
    weights 0..i-1, and U_ii² = [(H_{i:, i:})⁻¹]_00 is that removal's denominator: the GPTQ "Cholesky
    reformulation" (Frantar et al. 2023, arXiv:2210.17323, Sec. 4, step 3), also SparseGPT's Hessian
    synchronization (arXiv:2301.00774, Sec. 3). Computed as the paper code does (Cholesky, inverse, upper
    Cholesky of the inverse). Shapes: (d, d) -> (d, d). Raises ValueError when H is not positive definite.
    """
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(f"inverse_cholesky_upper: the damped Hessian is not positive definite (failed at column "
                         f"{int(info) - 1} of {H.shape[0]}); raise the damping.")
    return U
