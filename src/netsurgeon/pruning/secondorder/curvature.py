"""Curvature estimators behind one interface: each gathers its statistics once (:meth:`Curvature.fit`) and then
hands out diagonal blocks of the inverse curvature (:meth:`Curvature.blocks`) as operators with ``diagonal()``
(the inverse's diagonal), ``@ v`` (the inverse times a vector) and, where the exact joint update needs them,
``columns(idx)``. The math lives in :mod:`netsurgeon.linalg`; here is only what each estimator gathers and keeps.

* :class:`DiagonalFisher`: the damped diagonal of the empirical Fisher (diagonal-Fisher baseline of Singh &
  Alistarh 2020) or, with labels drawn from the model's predictions, of the true Fisher = Gauss-Newton matrix
  for softmax cross-entropy (OBD's h_kk, LeCun, Denker & Solla 1990).
* :class:`WoodburyFisher`: WoodFisher's damped empirical Fisher F = λI + (1/m) Σ g gᵀ inverted by Woodbury per
  block (Singh & Alistarh 2020, Sec. 3; blocks follow the tensors) or over all weights (one full block), every
  inverse kept for repeated prunes; sharded across ranks under torchrun.
* :class:`~.lowmem.LowMemoryWoodbury` (in ``lowmem.py``): the same matrix with no inverse kept.
* :class:`KroneckerFisher`: K-FAC, each Linear layer's Fisher as G ⊗ A (Martens & Grosse 2015, Sec. 3; damping
  Sec. 6.3).
* :class:`ExactHessian`: the exact Hessian of the loss for OBS (Hassibi & Stork 1993), projected onto the PSD
  matrices (Higham 1988) and damped; small models only.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ... import distributed as ddp
from ...data import Split, batches
from ...linalg import (
    ImplicitFisherInverse,
    KroneckerInverse,
    fisher_inverse,
    kfac_damped_inverses,
    nearest_psd,
    prefer_factored,
    relative_damp,
    squared_norm,
)
from ...masks import note_skipped
from ...progress import Progress
from ...stats import collect_gradients, kfac_factors
from .config import SecondOrderConfig

__all__ = ["Layout", "Block", "FitJob", "Curvature", "DiagonalFisher", "WoodburyFisher", "KroneckerFisher",
           "ExactHessian", "DiagonalInverse", "OBS_MAX_PARAMS", "BLOCK_BYTES", "vectors_bytes"]

OBS_MAX_PARAMS = 4096
# What a kept Block costs besides its tensors' data (the Block and its two tensors' Python objects and TensorImpls):
# measured 1.35 KiB a block (25,600 blocks of 128 weights: 2.37 KiB each with the 1 KiB index). Counted per block:
# with blocks of 128 it is as large as a float32 copy of the weights.
BLOCK_BYTES = 2048


@dataclass(frozen=True)
class Layout:
    """The flat weight vector the estimators work on: the prunable tensors' weights, concatenated in order."""

    tensors: list[str]
    sizes: list[int]
    shapes: list[tuple[int, ...]]
    linear: tuple[bool, ...] = ()  # per tensor: an nn.Linear's weight (what K-FAC covers); empty: not recorded

    @property
    def d(self) -> int:
        return sum(self.sizes)

    def block_ranges(self, block_size: int | None, blocks: str = "size") -> list[tuple[int, int]]:
        """[start, stop) of each Fisher block: ``blocks='layer'``, one per tensor; ``'size'``, each tensor cut into
        runs of ``block_size`` consecutive weights (the last one shorter; never across two tensors); a None
        ``block_size``, one block over everything."""
        if blocks == "layer":
            block_size = max(self.sizes)
        if block_size is None:
            return [(0, self.d)]
        ranges, off = [], 0
        for n in self.sizes:
            ranges += [(off + s, off + min(s + block_size, n)) for s in range(0, n, block_size)]
            off += n
        return ranges


@dataclass
class Block:
    """A diagonal block of the inverse curvature over the flat weights ``alive`` (indices, (n,); the low-memory
    estimator hands out chunks of equal-size blocks, (nb, n)), with the mean gradient there for WoodTaylor."""

    start: int
    stop: int
    alive: Tensor
    hinv: Any   # Tensor | ImplicitFisherInverse | KroneckerInverse | BatchedFisherInverse | DiagonalInverse
    grad: Tensor | None = None


@dataclass
class FitJob:
    """What an estimator needs to gather its statistics: the model and data, the flat layout, the flat weights and
    which are unpruned, this process's blocks, and the options."""

    method: str
    model: nn.Module
    data: Split | Any
    layout: Layout
    cfg: SecondOrderConfig
    w: Tensor                       # (d,) float32
    alive: Tensor                   # (d,) bool
    ranges: list[tuple[int, int]]   # this process's blocks
    progress: bool = False
    keep_mean: bool = False         # WoodTaylor: keep the mean gradient
    shard: tuple[int, int] | None = None       # [lo, hi) of the flat weights this rank owns (sharded)
    shard_sizes: list[int] = field(default_factory=list)


class Curvature(Protocol):
    """A curvature estimate. ``memory`` is called before any work, ``fit`` once, ``blocks`` by every scoring and
    prune pass (so an estimator may rebuild its blocks each time instead of keeping them)."""

    damp_: float
    phase_seconds_: dict[str, float]

    def memory(self, layout: Layout, ranges: list[tuple[int, int]], ranks: int = 1) -> dict[str, int]: ...

    def fit(self, job: FitJob) -> None: ...

    def blocks(self, model: nn.Module) -> Iterator[Block]: ...


def vectors_bytes(d: int) -> int:
    """The flat vectors of a fit and a prune: weights and scores (float32), the prune step's weights and update
    (float64), the ranking (values and int64 indices), masks and new weights: about 40 bytes a weight."""
    return 40 * d


def _mem(gradients: int = 0, inverses: int = 0, work: int = 0, vectors: int = 0) -> dict[str, int]:
    return {"gradients": gradients, "inverses": inverses, "work": work, "vectors": vectors,
            "total": gradients + inverses + work + vectors}


def _gradients(job: FitJob, sample_labels: bool = False) -> Tensor:
    c = job.cfg
    return collect_gradients(job.model, job.data, job.layout.tensors, c.num_grads, c.grad_batch, c.seed,
                             sample_labels=sample_labels, progress=job.progress)


class DiagonalInverse:
    """diag(λ + F_qq)⁻¹ as an operator; ``curvature`` keeps F_qq for OBD's saliency ½ (λ + F_qq) w_q²."""

    def __init__(self, curvature: Tensor, damp: float) -> None:
        self.curvature, self.damp = curvature, damp

    def diagonal(self) -> Tensor:
        return 1.0 / (self.damp + self.curvature)

    def __matmul__(self, v: Tensor) -> Tensor:
        return v / (self.damp + self.curvature)


class DiagonalFisher:
    """The Fisher's diagonal F_qq = (1/m) Σ_i g_iq², one block over all weights. ``sample_labels``: labels drawn
    from the model's predictions (true Fisher = Gauss-Newton for softmax cross-entropy: OBD's h_kk); else the
    data's labels (empirical Fisher: the diagonal-Fisher baseline)."""

    def __init__(self, cfg: SecondOrderConfig, sample_labels: bool) -> None:
        self.cfg, self.sample_labels = cfg, sample_labels
        self.damp_, self.phase_seconds_ = cfg.damp, {}

    def memory(self, layout: Layout, ranges: list[tuple[int, int]], ranks: int = 1) -> dict[str, int]:
        d = layout.d
        return _mem(gradients=4 * self.cfg.num_grads * d, work=4 * d, vectors=vectors_bytes(d))

    def fit(self, job: FitJob) -> None:
        t0 = time.perf_counter()
        g = _gradients(job, self.sample_labels)
        self.diag_ = g.pow(2).mean(0)
        if self.cfg.relative_damp:
            self.damp_ = self.cfg.damp * float(self.diag_.mean())
        self.d_ = g.shape[1]
        self.phase_seconds_ = {"gradients": time.perf_counter() - t0}

    def blocks(self, model: nn.Module) -> Iterator[Block]:
        yield Block(0, self.d_, torch.arange(self.d_, device=self.diag_.device),
                    DiagonalInverse(self.diag_, self.damp_))


class WoodburyFisher:
    """WoodFisher's F = λI + (1/m) Σ_i g_i g_iᵀ (Singh & Alistarh 2020, Sec. 3, the empirical Fisher of Eq. (2))
    inverted per block over its unpruned weights: the explicit inverse (:func:`linalg.fisher_inverse`) or the
    factored form (:class:`linalg.ImplicitFisherInverse`), whichever is smaller (:func:`linalg.prefer_factored`).
    Every inverse is kept, so one fit serves any number of prunes.

    Under torchrun the blocks are sharded: each rank receives every gradient's entries of its own blocks (one
    all-to-all per chunk of rows, :func:`.sharded.gradient_columns`) and inverts only those."""

    def __init__(self, cfg: SecondOrderConfig) -> None:
        self.cfg, self.damp_, self.phase_seconds_ = cfg, cfg.damp, {}
        self.blocks_: list[Block] = []
        self.grad_mean_: Tensor | None = None

    def memory(self, layout: Layout, ranges: list[tuple[int, int]], ranks: int = 1) -> dict[str, int]:
        """Gradients (float32, m x d), the stored inverses (float64; per block the cheaper of the explicit n x n
        matrix and the factored 2 x m x n form, with the block's kept int64 index of its weights and
        :data:`BLOCK_BYTES` of objects), the work space of the largest and, while the gradients are taken, one row
        and autograd's gradients of the masked tensors' originals (float32, d each). ``ranks`` > 1: per rank, about
        1/ranks of the gradients (plus this rank's own rows before the all-to-all) and of the inverses."""
        from .sharded import exchange_chunk

        m, d = self.cfg.num_grads, layout.d
        sizes = [b - a for a, b in ranges]
        inv = sum(8 * (2 * m * n if prefer_factored(n, m) else n * n) + 8 * n + BLOCK_BYTES for n in sizes)
        big = max(sizes)
        work = 8 * (m * big + (m * m if prefer_factored(big, m) else big * big)) + 8 * d
        grads = 4 * m * d
        if ranks > 1:  # this rank's columns of every row, plus the two exchange buffers
            chunk = exchange_chunk(m, ranks)
            grads, inv = 4 * (m + 2 * chunk * ranks) * -(-d // ranks), -(-inv // ranks)
        return _mem(gradients=grads, inverses=inv, work=work, vectors=vectors_bytes(d))

    def fit(self, job: FitJob) -> None:
        t_grad = time.perf_counter()
        exchange: list[Tensor] = []
        if job.shard:  # (m, hi - lo): all rows, this rank's columns; buffers kept to the end of fit
            from .sharded import gradient_columns

            g, exchange = gradient_columns(job)
        else:
            g = _gradients(job)
        m, d = g.shape[0], job.layout.d
        if self.cfg.relative_damp:
            sq = ddp.all_reduce_sum(squared_norm(g).reshape(1)) if job.shard else squared_norm(g)
            self.damp_ = relative_damp(self.cfg.damp, float(sq.sum()), m, d)
        if job.keep_mean:
            mean = g.mean(0).double()
            self.grad_mean_ = ddp.all_gather_concat(mean, job.shard_sizes) if job.shard else mean
        t_inv = time.perf_counter()
        lo = job.shard[0] if job.shard else 0
        counts, index, store = self._stores(job)
        at = off = 0
        bar = Progress(f"{job.method}: inverting {len(job.ranges)} block(s)", len(job.ranges), enabled=job.progress)
        for i, (start, stop) in enumerate(job.ranges):
            bar.update(i)
            n = counts[i]
            idx = index[at:at + n].copy_(torch.arange(start, stop, device=job.alive.device)[job.alive[start:stop]])
            at += n
            cols = idx - lo  # this block's columns of g (g holds only this rank's columns when sharded)
            gb = g[:, cols].double()
            if prefer_factored(n, self.cfg.num_grads):
                hinv = ImplicitFisherInverse(gb, self.damp_)
            else:  # a view of the store: the block's temporaries are freed and reused by the next block
                hinv = store[off:off + n * n].view(n, n).copy_(fisher_inverse(gb, self.damp_))
                off += n * n
            mean = self.grad_mean_[idx] if self.grad_mean_ is not None else None
            self.blocks_.append(Block(start, stop, idx, hinv, mean))
        bar.update(len(job.ranges))
        bar.close()
        del g, exchange  # the gradients and buffers go now (only the inverses are kept)
        self.phase_seconds_ = {"gradients": t_inv - t_grad, "inverses": time.perf_counter() - t_inv}

    def blocks(self, model: nn.Module) -> Iterator[Block]:
        return iter(self.blocks_)

    def _stores(self, job: FitJob) -> tuple[list[int], Tensor, Tensor]:
        """Each block's unpruned weights, and two buffers the kept blocks are views of: their int64 indices and
        every explicit n x n inverse (float64). Allocated block by block, each kept inverse landed between the
        freed temporaries of building it and glibc's heap kept the holes: 1.5 GiB beside 3.1 GiB of inverses
        (25,600 blocks of 128 weights, 64 gradients, a 3.3M-weight GPT: 59 KiB a block), which no estimate from
        the layout foresees. The buffers hold exactly what :meth:`memory` counts."""
        dev = job.alive.device
        counts = [int(job.alive[a:b].sum()) for a, b in job.ranges]
        explicit = sum(n * n for n in counts if not prefer_factored(n, self.cfg.num_grads))
        return counts, torch.empty(sum(counts), dtype=torch.long, device=dev), \
            torch.empty(explicit, dtype=torch.float64, device=dev)


class KroneckerFisher:
    """K-FAC (Martens & Grosse 2015, Sec. 3): each Linear layer's Fisher approximated by G ⊗ A, A = E[a aᵀ] over
    its inputs and G = E[g gᵀ] over the gradients at its outputs (:func:`stats.kfac_factors`), inverted factor by
    factor with factored Tikhonov damping (Sec. 6.3, :func:`linalg.kfac_damped_inverses`). One block per layer."""

    def __init__(self, cfg: SecondOrderConfig) -> None:
        self.cfg, self.damp_, self.phase_seconds_ = cfg, cfg.damp, {}
        self.blocks_: list[Block] = []

    @staticmethod
    def covered(layout: Layout) -> list[bool]:
        """Per tensor, whether K-FAC covers it: a Linear's weight (all tensors when the layout does not say)."""
        return list(layout.linear) or [True] * len(layout.tensors)

    def memory(self, layout: Layout, ranges: list[tuple[int, int]], ranks: int = 1) -> dict[str, int]:
        inv = sum(8 * 2 * (s[0] ** 2 + (n // s[0]) ** 2)
                  for s, n, ok in zip(layout.shapes, layout.sizes, self.covered(layout), strict=True) if ok)
        return _mem(inverses=inv, vectors=vectors_bytes(layout.d))

    def fit(self, job: FitJob) -> None:
        """Factors for every Linear weight; other tensors (an embedding, a convolution, a bare parameter) get no
        block, so they keep an infinite score and are never pruned, and the stage record lists them."""
        t0 = time.perf_counter()
        c = self.cfg
        covered = self.covered(job.layout)
        layers = [t.rsplit(".", 1)[0] for t in job.layout.tensors]
        if not any(covered):
            raise ValueError(f"kfac: K-FAC is implemented for Linear layers only and this model has none among "
                             f"its prunable tensors ({', '.join(job.layout.tensors[:4])}...); use woodfisher.")
        kinds = {la: type(job.model.get_submodule(la)).__name__.removeprefix("Parametrized") for la in layers}
        note_skipped(job.model, {la: f"K-FAC covers Linear weights only ({kinds[la]}): left as it is"
                                 for la, ok in zip(layers, covered, strict=True) if not ok})
        factors = kfac_factors(job.model, job.data, [la for la, ok in zip(layers, covered, strict=True) if ok],
                               c.num_grads, c.grad_batch, c.seed, progress=job.progress)
        note_skipped(job.model, {la: "K-FAC: its forward never runs (its parent reads the weight, as "
                                     "nn.MultiheadAttention does its out_proj's): left as it is"
                                 for la, ok in zip(layers, covered, strict=True) if ok and la not in factors})
        if not factors:
            raise ValueError("kfac: none of the model's Linear layers ran its own forward; use woodfisher.")
        t_inv = time.perf_counter()
        off = 0
        for layer, n, ok in zip(layers, job.layout.sizes, covered, strict=True):
            if ok and layer in factors:
                a, g = factors[layer]
                damp = c.damp * float(g.diagonal().mean() * a.diagonal().mean()) if c.relative_damp else c.damp
                hinv = KroneckerInverse(*kfac_damped_inverses(a, g, damp))
                self.blocks_.append(Block(off, off + n, torch.arange(off, off + n, device=job.w.device), hinv))
            off += n
        self.phase_seconds_ = {"gradients": t_inv - t0, "inverses": time.perf_counter() - t_inv}

    def blocks(self, model: nn.Module) -> Iterator[Block]:
        return iter(self.blocks_)


class ExactHessian:
    """The exact Hessian of the mean cross-entropy over ``num_grads`` x ``grad_batch`` samples (reverse-over-reverse
    autograd, eval mode), for OBS (Hassibi & Stork 1993). A trained network's Hessian is indefinite, so it is
    projected onto the PSD matrices (:func:`linalg.nearest_psd`, Higham 1988) and damped by λI before inversion.
    Limited to :data:`OBS_MAX_PARAMS` weights: a reference for the approximations on small models."""

    max_params: ClassVar[int] = OBS_MAX_PARAMS

    def __init__(self, cfg: SecondOrderConfig) -> None:
        self.cfg, self.damp_, self.phase_seconds_ = cfg, cfg.damp, {}
        self.blocks_: list[Block] = []

    @classmethod
    def check_size(cls, d: int) -> None:
        if d > cls.max_params:
            raise ValueError(f"OneShotPruner: exact OBS is limited to {cls.max_params} weights (an exact "
                             f"Hessian); this model has {d:,}. Use method='woodfisher'.")

    def memory(self, layout: Layout, ranges: list[tuple[int, int]], ranks: int = 1) -> dict[str, int]:
        d = layout.d
        return _mem(inverses=8 * d * d, work=16 * d * d, vectors=vectors_bytes(d))

    def fit(self, job: FitJob) -> None:
        self.check_size(job.layout.d)
        t0 = time.perf_counter()
        hess = self._hessian(job)
        t_inv = time.perf_counter()
        for start, stop in job.ranges:
            idx = torch.arange(start, stop, device=job.alive.device)[job.alive[start:stop]]
            h = nearest_psd(hess[idx][:, idx]) + self.damp_ * torch.eye(len(idx), dtype=torch.float64,
                                                                         device=hess.device)
            self.blocks_.append(Block(start, stop, idx, torch.linalg.inv(h)))
        self.phase_seconds_ = {"gradients": t_inv - t0, "inverses": time.perf_counter() - t_inv}

    def blocks(self, model: nn.Module) -> Iterator[Block]:
        return iter(self.blocks_)

    def _hessian(self, job: FitJob) -> Tensor:
        import torch.nn.functional as F
        from torch.func import functional_call, jacrev

        model, sizes = job.model, job.layout.sizes
        n = self.cfg.num_grads * self.cfg.grad_batch
        xs, ys = [], []
        for xb, yb in batches(job.data):
            xs.append(xb)
            ys.append(yb)
            if sum(len(v) for v in ys) >= n:
                break
        x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
        x = x.double() if x.is_floating_point() else x  # token ids stay integers
        keys = [_orig_key(t) for t in job.layout.tensors]
        was = model.training
        model.double().eval()  # BatchNorm with its running statistics (train mode would mutate them)
        try:
            base = {k: v.detach() for k, v in model.named_parameters()}

            def loss(flat: Tensor) -> Tensor:
                params = dict(base)
                for k, part in zip(keys, flat.split(sizes), strict=True):
                    params[k] = part.view_as(base[k])
                return F.cross_entropy(functional_call(model, params, (x,)), y)

            # reverse-over-reverse: torch.func.hessian uses forward mode, which warns through torch.jit
            # the fused attention kernels have no second derivative: the exact Hessian takes the math kernel
            with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                return jacrev(jacrev(loss))(torch.cat([base[k].flatten() for k in keys])).detach()
        finally:
            model.float().train(was)


def _orig_key(fqn: str) -> str:
    mod, _, attr = fqn.rpartition(".")
    return f"{mod}.parametrizations.{attr}.original"
