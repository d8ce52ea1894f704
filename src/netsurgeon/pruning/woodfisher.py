"""Second-order one-shot pruning: OBD, OBS, WoodFisher and WoodTaylor, with one global sparsity target.

* OBD (LeCun, Denker, Solla 1990): ρ_q = ½ H_qq w_q², no weight update. H_qq is the Gauss-Newton (true
  Fisher) diagonal, estimated from gradients with labels drawn from the model's own predictions.
* Diagonal Fisher: the same statistic with the *empirical* Fisher diagonal (the WoodFisher paper's baseline).
* OBS (Hassibi & Stork 1993): ρ_q = w_q² / (2 [H⁻¹]_qq) and δw = −(w_q/[H⁻¹]_qq) H⁻¹e_q, with the exact
  Hessian of the loss (small models only: a reference for the approximations), projected onto the positive
  semi-definite matrices (Higham 1988) and damped, since a trained network's Hessian is indefinite.
* WoodFisher (Singh & Alistarh 2020, arXiv:2004.14340): OBS with H ≈ F = λI + (1/m) Σ ∇ℓ∇ℓᵀ, the damped
  empirical Fisher, inverted by Woodbury (Sec. 3), block-wise (blocks never straddle a tensor) or in full.
  Several weights removed at once get either the sum of single-weight updates (the official code) or the
  exact joint solution δw = −F⁻¹E_Qᵀ(E_QF⁻¹E_Qᵀ)⁻¹E_Qw (Sec. 4).
* WoodTaylor (Sec. 5): keeps the gradient term of the local model; λ = 0.1 by default, as in the paper's
  MNIST sweep.
* K-FAC (Martens & Grosse 2015): OBS with each Linear layer's Fisher approximated by A ⊗ G (input and
  output-gradient covariances, factored Tikhonov damping), the Kronecker baseline of WoodFisher's Table 1.

All methods rank every weight of every layer together against one target sparsity: the per-layer sparsity
is chosen by the ranking and reported. Biases are not pruned (as in the official code).

Under ``torchrun`` (several ranks), WoodFisher and WoodTaylor shard the block-diagonal Fisher: each rank owns a
contiguous run of blocks (:func:`distributed.owner_ranges`), computes its share of the per-sample gradients,
receives every sample's gradient entries of its own blocks (one all-to-all), inverts and scores its blocks; the
scores are gathered into one global ranking, each rank computes the OBS update of its blocks and the updates
are gathered, so every rank ends with the model a single process prunes. Memory per rank: about 1/W of the
gradients and inverses (docs/distributed.md). The other methods run the same computation on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed as ddp
from .._validation import check_finite_model, check_fraction, check_positive
from ..data import Split, batches
from ..linalg import (
    ImplicitFisherInverse,
    KroneckerInverse,
    fisher_inverse,
    kfac_damped_inverses,
    nearest_psd,
    obs_scores,
    obs_update_joint,
    obs_update_single_sum,
    woodtaylor_scores,
    woodtaylor_update,
)
from ..masks import attach_masks, original, prunable_tensors, sparsity_report
from ..plan import pruned_then_finetuned
from ..progress import Progress
from ..progress import log as progress_log
from ..registry import MethodConfig, StageContext, option, register
from ..stats import collect_gradients, kfac_factors

__all__ = ["METHODS", "FisherConfig", "OneShotPruner", "one_shot_prune", "available_memory", "SecondOrderConfig"]

log = logging.getLogger(__name__)

METHODS = ("magnitude", "diag_fisher", "obd", "obs", "woodfisher", "woodtaylor", "kfac")
_UPDATES = ("single", "joint", "none")
_OBS_MAX_PARAMS = 4096
_EXPLICIT_MAX = 8192     # larger blocks (the full inverse of a big model) stay in factored Woodbury form


def _factored(n: int, m: int) -> bool:
    """Keep a block of n weights (m gradients) as the factored Woodbury form (m·n numbers held, 2·m·n while it
    is built) rather than the explicit n x n inverse, when that is smaller (n > 2m) or the block is too big to
    hold explicitly."""
    return n > 2 * m or n > _EXPLICIT_MAX
_JOINT_MAX = 4096        # the exact joint update solves a |Q| x |Q| system per block


@dataclass(frozen=True)
class FisherConfig:
    """How the curvature statistics are gathered."""

    num_grads: int = 1000            # m: outer products (the paper's N)
    grad_batch: int = 1              # samples averaged into each gradient
    damp: float = 1e-5               # λ
    block_size: int | None = 2000    # None: one full inverse over all weights
    seed: int = 0
    relative_damp: bool = False      # λ = damp · mean(diag F) instead of damp (ours, see docs/woodfisher.md)

    def __post_init__(self) -> None:
        check_positive("FisherConfig", "num_grads", self.num_grads, integer=True)
        check_positive("FisherConfig", "grad_batch", self.grad_batch, integer=True)
        check_positive("FisherConfig", "damp", self.damp)
        if self.block_size is not None:
            check_positive("FisherConfig", "block_size", self.block_size, integer=True)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or a large number where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


@dataclass
class _Block:
    start: int
    stop: int
    alive: Tensor            # (n,) indices (into the flat vector) of unpruned weights in the block
    hinv: Tensor | ImplicitFisherInverse | None  # (n, n) inverse curvature over alive entries


class OneShotPruner:
    """Fit curvature statistics once on a model, then prune it (or copies of it) to any sparsity.

    Args:
        method: one of :data:`METHODS`.
        fisher: gradient statistics (ignored by ``magnitude``).
        update: ``"single"`` (sum of single-weight OBS updates), ``"joint"`` (exact for the removed set,
            per block) or ``"none"``; OBD, diagonal Fisher and magnitude never update.
        memory_limit: bytes the inverses may take (default: 80% of available memory). A full inverse
            that would not fit is refused with a clear error instead of running out of memory.

    Attributes:
        fit_seconds_: wall time of :meth:`fit`.
        phase_seconds_: its parts: ``gradients`` (with the all-to-all when sharded) and ``inverses``.
        held_bytes_: bytes of the inverses this process holds after :meth:`fit` (its own blocks when sharded).
    """

    def __init__(self, method: str = "woodfisher", fisher: FisherConfig | None = None, update: str = "single",
                 memory_limit: int | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"OneShotPruner: method must be one of {METHODS}; got {method!r}.")
        if update not in _UPDATES:
            raise ValueError(f"OneShotPruner: update must be one of {_UPDATES}; got {update!r}.")
        if method == "woodtaylor" and update == "joint":
            raise ValueError("OneShotPruner: woodtaylor has no joint update (its step is the Newton step plus summed "
                             "single-weight corrections); use update='single' or method='woodfisher'.")
        default_damp = 0.1 if method == "woodtaylor" else 1e-5
        self.method, self.update = method, update
        self.fisher = fisher or FisherConfig(damp=default_damp)
        self.memory_limit = memory_limit
        self.fit_seconds_ = 0.0
        self.phase_seconds_: dict[str, float] = {}
        self.held_bytes_ = 0

    # -- statistics ----------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: Split | Any, *, progress: bool = False) -> OneShotPruner:
        """Gather the statistics of ``model`` on ``data`` (use the train or validation split, never test).

        ``data`` is a Split or any iterable of ``(x, y)`` batches (the user's DataLoader). The memory the
        statistics will take is estimated and logged first; a fit that would not fit is refused before any
        gradient is computed. ``progress`` shows the gradient and inversion phases."""
        # Sharded, memory is the point: the inversions' temporaries must not fragment the heap. In one process
        # this costs more than it saves (measured: inversions 30 -> 40 s on LeNet-5, same peak in 2 of 2 runs).
        with ddp.mapped_large_allocations() if self._sharded() else contextlib.nullcontext():
            return self._fit(model, data, progress)

    def _sharded(self) -> bool:
        """Under torchrun, WoodFisher and WoodTaylor split their Fisher blocks across ranks."""
        return ddp.world()[1] > 1 and self.method in ("woodfisher", "woodtaylor")

    def _fit(self, model: nn.Module, data: Split | Any, progress: bool) -> OneShotPruner:
        t0 = time.perf_counter()
        check_finite_model("OneShotPruner", model)
        self.tensors_ = prunable_tensors(model, include_bias=False, owner="OneShotPruner")
        masks = attach_masks(model, self.tensors_)
        self.sizes_ = [original(model, t).numel() for t in self.tensors_]
        self.shapes_ = [tuple(original(model, t).shape) for t in self.tensors_]
        w = self._flat(model)
        alive = torch.cat([masks[t].mask.flatten() for t in self.tensors_]).bool()
        d = w.numel()
        m = self.method
        rank, size = ddp.world()
        self.shard_: tuple[int, int] | None = None  # this rank's [lo, hi) of the flat weights when sharded
        self.shard_sizes_: list[int] = [d]
        sharded = self._sharded()
        ranges = self._plan(d, size if sharded else 1)  # memory estimate, refusal: before any work
        if sharded:
            spans = ddp.owner_ranges(ranges, size)
            bounds = [ranges[a][0] if a < len(ranges) else d for a, _ in spans] + [d]
            self.shard_sizes_ = [bounds[r + 1] - bounds[r] for r in range(size)]
            self.shard_ = (bounds[rank], bounds[rank + 1])
            ranges = ranges[spans[rank][0]:spans[rank][1]]
        progress = progress and rank == 0
        if m == "woodtaylor":
            self.probe_ = _probe_batch(data, 512)
        self.grad_mean_: Tensor | None = None
        self.blocks_: list[_Block] = []
        if m == "magnitude":
            self.scores_ = w.abs()
        elif m == "kfac":
            self._fit_kfac(model, data, w, progress)
        elif m in ("diag_fisher", "obd"):
            g = self._grads(model, data, sample_labels=(m == "obd"), progress=progress)
            diag = g.pow(2).mean(0)
            damp = self.fisher.damp * float(diag.mean()) if self.fisher.relative_damp else self.fisher.damp
            self.scores_ = 0.5 * w.pow(2) * (damp + diag)
        else:
            self.scores_ = torch.full((d,), float("inf"))
            lo = self.shard_[0] if self.shard_ else 0
            t_grad = time.perf_counter()
            exchange: list[Tensor] = []
            if m == "obs":
                g = None
            elif self.shard_:  # (m, hi - lo): all rows, this rank's columns; buffers kept to the end of fit
                g, exchange = self._sharded_grads(model, data, progress)
            else:
                g = self._grads(model, data, progress=progress)
            self.damp_ = self.fisher.damp
            if g is not None and self.fisher.relative_damp:
                sq = ddp.all_reduce_sum(g.double().pow(2).sum().reshape(1)) if self.shard_ else g.double().pow(2).sum()
                self.damp_ = self.fisher.damp * float(sq.sum()) / (g.shape[0] * d)
            if m == "woodtaylor":
                mean = g.mean(0).double()
                self.grad_mean_ = ddp.all_gather_concat(mean, self.shard_sizes_) if self.shard_ else mean
            hess = self._exact_hessian(model, data) if m == "obs" else None
            t_inv = time.perf_counter()
            self.phase_seconds_ = {"gradients": t_inv - t_grad}
            bar = Progress(f"{m}: inverting {len(ranges)} block(s)", len(ranges), enabled=progress)
            for i, (start, stop) in enumerate(ranges):
                bar.update(i)
                idx = torch.arange(start, stop)[alive[start:stop]]
                cols = idx - lo  # this block's columns of g (g holds only this rank's columns when sharded)
                if hess is not None:  # projected to PSD, then damped: positive definite (see linalg.nearest_psd)
                    h = nearest_psd(hess[idx][:, idx]) + self.damp_ * torch.eye(len(idx), dtype=torch.float64)
                    hinv = torch.linalg.inv(h)
                elif _factored(len(idx), self.fisher.num_grads):
                    hinv = ImplicitFisherInverse(g[:, cols].double(), self.damp_)
                else:
                    hinv = fisher_inverse(g[:, cols].double(), self.damp_)
                wb = w[idx].double()
                if m == "woodtaylor":
                    s = woodtaylor_scores(wb, hinv, self.grad_mean_[idx])
                else:
                    s = obs_scores(wb, hinv.diagonal())
                self.scores_[idx] = s.float()
                self.blocks_.append(_Block(start, stop, idx, hinv))
            bar.update(len(ranges))
            bar.close()
            self.phase_seconds_["inverses"] = time.perf_counter() - t_inv
            self.held_bytes_ = sum(_nbytes(b.hinv) for b in self.blocks_)
            del g, exchange  # the gradients and buffers go now (only the inverses are kept)
            if self.shard_:  # one global ranking: every rank's scores, on every rank
                self.scores_ = ddp.all_gather_concat(self.scores_[self.shard_[0]:self.shard_[1]].contiguous(),
                                                     self.shard_sizes_)
        self.scores_[~alive] = -float("inf")  # already pruned: counted as removed first
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _fit_kfac(self, model: nn.Module, data: Split | Any, w: Tensor, progress: bool) -> None:
        f = self.fisher
        layers = [t.rsplit(".", 1)[0] for t in self.tensors_]
        factors = kfac_factors(model, data, layers, f.num_grads, f.grad_batch, f.seed, progress=progress)
        self.damp_ = f.damp
        self.scores_ = torch.full((w.numel(),), float("inf"))
        off = 0
        for layer, n in zip(layers, self.sizes_, strict=True):
            a, g = factors[layer]
            damp = f.damp * float(g.diagonal().mean() * a.diagonal().mean()) if f.relative_damp else f.damp
            hinv = KroneckerInverse(*kfac_damped_inverses(a, g, damp))
            idx = torch.arange(off, off + n)
            self.scores_[idx] = obs_scores(w[idx].double(), hinv.diagonal()).float()
            self.blocks_.append(_Block(off, off + n, idx, hinv))
            off += n

    def _flat(self, model: nn.Module) -> Tensor:
        return torch.cat([model.get_submodule(t.rsplit(".", 1)[0]).weight.detach().flatten()
                          for t in self.tensors_])

    def _grads(self, model: nn.Module, data: Split | Any, sample_labels: bool = False,
               progress: bool = False) -> Tensor:
        f = self.fisher
        return collect_gradients(model, data, self.tensors_, f.num_grads, f.grad_batch, f.seed,
                                 sample_labels=sample_labels, progress=progress)

    def _sharded_grads(self, model: nn.Module, data: Split | Any, progress: bool) -> tuple[Tensor, list[Tensor]]:
        """Every gradient row's entries in this rank's columns. Rank r computes rows i ≡ r (mod W), ``chunk`` at a
        time; after each chunk one all-to-all sends every rank the columns of its blocks, so a rank never holds
        more than its (m, d/W) share plus two exchange buffers of ``chunk`` x W rows of d/W (chunk <= m/4W, so
        the buffers stay under half the share). Returns the (num_grads, hi - lo) columns and the two buffers, which
        the caller frees after the inversions (see :func:`distributed.mapped_large_allocations`)."""
        import torch.distributed as dist

        from ..stats import gradient_rows

        rank, size = ddp.world()
        f = self.fisher
        cuts = [0]
        for n in self.shard_sizes_:
            cuts.append(cuts[-1] + n)
        width = max(self.shard_sizes_)  # gloo's all-to-all takes equal shapes: pad to the widest share
        chunk = _exchange_chunk(f.num_grads, size)
        out = torch.empty(f.num_grads, self.shard_sizes_[rank])
        send, recv = torch.zeros(size, chunk, width), torch.empty(size, chunk, width)
        rows = gradient_rows(model, data, self.tensors_, f.num_grads, f.grad_batch, f.seed, progress=progress,
                             every=(rank, size))
        for first in range(0, f.num_grads, chunk * size):  # global rows first .. first + chunk*size - 1
            for j in range(len(range(first + rank, min(first + chunk * size, f.num_grads), size))):
                _, row = next(rows)
                for q in range(size):
                    send[q, j, :self.shard_sizes_[q]] = row[cuts[q]:cuts[q + 1]]
            dist.all_to_all(list(recv.unbind(0)), list(send.unbind(0)))
            for r in range(size):  # rank r's j-th row of this chunk is global row first + r + j*size
                for j, i in enumerate(range(first + r, min(first + chunk * size, f.num_grads), size)):
                    out[i].copy_(recv[r, j, :self.shard_sizes_[rank]])  # row by row: no chunk-sized temporary
        rows.close()
        return out, [send, recv]

    def _ranges(self, d: int, block_size: int | None) -> list[tuple[int, int]]:
        if self.method == "kfac":  # one Kronecker block per layer
            block_size = max(self.sizes_)
        if block_size is None or self.method == "obs":
            return [(0, d)]
        ranges, off = [], 0
        for n in self.sizes_:
            ranges += [(off + s, off + min(s + block_size, n)) for s in range(0, n, block_size)]
            off += n
        return ranges

    def memory_estimate(self, d: int, block_size: int | None, ranks: int = 1) -> dict[str, int]:
        """Bytes the statistics take: the gradients (float32, m x d), the stored inverses (float64; per block the
        cheaper of the explicit B x B matrix and the factored 2 x m x B form) and the work space of the largest.
        ``ranks`` > 1 (sharded WoodFisher/WoodTaylor): per rank, about 1/ranks of the gradients (plus this rank's
        own rows before the all-to-all) and of the inverses."""
        m, meth = self.fisher.num_grads, self.method
        if meth == "magnitude":
            return {"gradients": 0, "inverses": 0, "work": 0, "total": 0}
        if meth == "kfac":
            inv = sum(8 * 2 * (s[0] ** 2 + (n // s[0]) ** 2) for s, n in zip(self.shapes_, self.sizes_, strict=True))
            return {"gradients": 0, "inverses": inv, "work": 0, "total": inv}
        grads = 0 if meth == "obs" else 4 * m * d
        if meth in ("diag_fisher", "obd"):
            return {"gradients": grads, "inverses": 0, "work": 4 * d, "total": grads + 4 * d}
        if meth == "obs":
            inv, work = 8 * d * d, 16 * d * d
        else:
            sizes = [b - a for a, b in self._ranges(d, block_size)]
            inv = sum(8 * (2 * m * n if _factored(n, m) else n * n) for n in sizes)
            big = max(sizes)
            work = 8 * (m * big + (m * m if _factored(big, m) else big * big))
            if ranks > 1:  # this rank's columns of every row, plus the two exchange buffers (_sharded_grads)
                chunk = _exchange_chunk(m, ranks)
                grads, inv = 4 * (m + 2 * chunk * ranks) * -(-d // ranks), -(-inv // ranks)
        return {"gradients": grads, "inverses": inv, "work": work, "total": grads + inv + work}

    def _plan(self, d: int, ranks: int = 1) -> list[tuple[int, int]]:
        """Estimate memory (per rank when sharded), log it, and refuse (with a block size that would fit) before
        any gradient."""
        if self.method == "obs" and d > _OBS_MAX_PARAMS:
            raise ValueError(f"OneShotPruner: exact OBS is limited to {_OBS_MAX_PARAMS} weights (an exact "
                             f"Hessian); this model has {d:,}. Use method='woodfisher'.")
        bs = self.fisher.block_size
        est = self.memory_estimate(d, bs, ranks)
        limit = self.memory_limit if self.memory_limit is not None else int(0.8 * available_memory())
        sizes = [b - a for a, b in self._ranges(d, bs)]
        factored = 0 if self.method == "kfac" else sum(_factored(n, self.fisher.num_grads) for n in sizes)
        progress_log.info("%s: %s weights, %d gradients: about %.2f GiB (gradients %.2f, inverses %.2f, work %.2f; "
                          "%d block(s), %d factored) of %.1f GiB available", self.method, f"{d:,}",
                          self.fisher.num_grads, est["total"] / 2**30, est["gradients"] / 2**30,
                          est["inverses"] / 2**30, est["work"] / 2**30, len(sizes), factored, limit / 2**30)
        if est["total"] > limit:
            fits = [b for b in (4000, 2000, 1000, 500, 250, 100)
                    if self.memory_estimate(d, b, ranks)["total"] <= limit]
            hint = (f"use block_size={fits[0]}" if fits and self.method != "obs" else
                    "use fewer num_grads" if self.method != "obs" else "use woodfisher")
            raise ValueError(
                f"OneShotPruner: {self.method} over {d:,} weights with {self.fisher.num_grads} gradients and "
                f"block_size={bs} needs about {est['total'] / 2**30:.1f} GiB but {limit / 2**30:.1f} GiB are "
                f"available; {hint}.")
        return self._ranges(d, bs)

    def _exact_hessian(self, model: nn.Module, data: Split | Any) -> Tensor:
        d = sum(self.sizes_)
        if d > _OBS_MAX_PARAMS:
            raise ValueError(f"OneShotPruner: exact OBS is limited to {_OBS_MAX_PARAMS} weights (an exact "
                             f"Hessian); this model has {d:,}. Use method='woodfisher'.")
        import torch.nn.functional as F
        from torch.func import functional_call, jacrev

        n = self.fisher.num_grads * self.fisher.grad_batch
        xs, ys = [], []
        for xb, yb in batches(data):
            xs.append(xb)
            ys.append(yb)
            if sum(len(v) for v in ys) >= n:
                break
        x, y = torch.cat(xs)[:n].double(), torch.cat(ys)[:n]
        keys = [_orig_key(t) for t in self.tensors_]
        was = model.training
        model.double().eval()  # BatchNorm with its running statistics (train mode would mutate them)
        try:
            base = {k: v.detach() for k, v in model.named_parameters()}

            def loss(flat: Tensor) -> Tensor:
                params = dict(base)
                for k, part in zip(keys, flat.split(self.sizes_), strict=True):
                    params[k] = part.view_as(base[k])
                return F.cross_entropy(functional_call(model, params, (x,)), y)

            # reverse-over-reverse: torch.func.hessian uses forward mode, which warns through torch.jit
            return jacrev(jacrev(loss))(torch.cat([base[k].flatten() for k in keys])).detach()
        finally:
            model.float().train(was)

    # -- pruning -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, model: nn.Module, sparsity: float) -> dict[str, Any]:
        """Prune ``model`` (the fitted model, or one with identical weights) in place to ``sparsity`` overall.

        Returns ``{"sparsity", "per_layer", "seconds"}`` with the per-layer sparsity the ranking chose.
        """
        check_fraction("OneShotPruner", "sparsity", sparsity)
        if not hasattr(self, "scores_"):
            raise ValueError("OneShotPruner: call fit(model, data) before prune().")
        t0 = time.perf_counter()
        masks = attach_masks(model, self.tensors_)
        w = self._flat(model).double()
        d = w.numel()
        k = int(round(sparsity * d))
        prune = torch.zeros(d, dtype=torch.bool)
        if k:
            prune[torch.sort(self.scores_, stable=True).indices[:k]] = True
        delta = torch.zeros(d, dtype=torch.float64)
        update = self.update if self.method in ("obs", "woodfisher", "woodtaylor", "kfac") else "none"
        for b in self.blocks_:
            if update == "none" or b.hinv is None:
                break
            q = prune[b.alive]
            if update == "joint" and int(q.sum()) > _JOINT_MAX:
                raise ValueError(f"OneShotPruner: the joint update would remove {int(q.sum()):,} weights of one "
                                 f"block at once (limit {_JOINT_MAX}); use block_size <= {_JOINT_MAX} or "
                                 "update='single'.")
            if self.method == "woodtaylor":
                delta[b.alive] = woodtaylor_update(w[b.alive], b.hinv, self.grad_mean_[b.alive], q)
            elif update == "joint":
                delta[b.alive] = obs_update_joint(w[b.alive], b.hinv, q)
            elif q.any():
                delta[b.alive] = obs_update_single_sum(w[b.alive], b.hinv, q)
        if self.shard_ and update != "none":  # each rank computed its blocks' update: gather them all
            delta = ddp.all_gather_concat(delta[self.shard_[0]:self.shard_[1]].contiguous(), self.shard_sizes_)
        scale = 1.0
        if self.method == "woodtaylor":  # the Newton part can overshoot: a line search on held-out fit data
            scale = self._line_search(model, masks, w, delta, prune)
        self._apply(model, masks, torch.where(prune, torch.zeros_like(w), w + scale * delta).float(), prune)
        per_layer = {r.name.removesuffix(".weight"): 1 - r.kept for r in sparsity_report(model, include_bias=False)}
        return {"sparsity": float(prune.float().mean()), "per_layer": per_layer, "step_scale": scale,
                "seconds": time.perf_counter() - t0}

    def _apply(self, model: nn.Module, masks: dict, new_w: Tensor, prune: Tensor) -> None:
        for t, part, keep in zip(self.tensors_, new_w.split(self.sizes_), (~prune).split(self.sizes_), strict=True):
            masks[t].mask.copy_(keep.view_as(masks[t].mask).float())
            original(model, t).copy_(part.view_as(masks[t].mask))

    def _line_search(self, model: nn.Module, masks: dict, w: Tensor, delta: Tensor, prune: Tensor) -> float:
        """The scale in {1, 1/2, ..., 1/16, 0} of the WoodTaylor update with the lowest loss on the probe batch
        kept from the fitting data (never the test split). 0 keeps the surviving weights as they were, so pruning
        nothing can never make the model worse."""
        import torch.nn.functional as F

        x, y = self.probe_
        was = model.training
        model.eval()
        best = (float("inf"), 0.0)
        try:
            for scale in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0):
                self._apply(model, masks, torch.where(prune, torch.zeros_like(w), w + scale * delta).float(), prune)
                loss = float(F.cross_entropy(model(x), y))
                if loss < best[0]:
                    best = (loss, scale)
        finally:
            model.train(was)
        return best[1]


def _exchange_chunk(num_grads: int, ranks: int) -> int:
    """Gradient rows each rank sends per all-to-all of the sharded fit: at most 32, and at most m/4W so that the
    two exchange buffers stay under half a rank's share of the gradients."""
    return max(1, min(32, num_grads // (4 * ranks)))


def _nbytes(hinv: Tensor | ImplicitFisherInverse | None) -> int:
    if hinv is None:
        return 0
    if isinstance(hinv, Tensor):
        return hinv.numel() * hinv.element_size()
    return sum(t.numel() * t.element_size() for t in vars(hinv).values() if isinstance(t, Tensor))


def _probe_batch(data: Split | Any, n: int) -> tuple[Tensor, Tensor]:
    """Up to ``n`` samples of the fitting data (the first ones), for WoodTaylor's line search."""
    xs, ys, have = [], [], 0
    for xb, yb in batches(data, n):
        xs.append(xb)
        ys.append(yb)
        have += len(yb)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _orig_key(fqn: str) -> str:
    mod, _, attr = fqn.rpartition(".")
    return f"{mod}.parametrizations.{attr}.original"


def one_shot_prune(model: nn.Module, data: Split, sparsity: float, method: str = "woodfisher",
                   fisher: FisherConfig | None = None, update: str = "single") -> dict[str, Any]:
    """Fit and prune in one call. Modifies ``model`` in place; returns :meth:`OneShotPruner.prune`'s report."""
    pruner = OneShotPruner(method, fisher, update).fit(model, data)
    out = pruner.prune(model, sparsity)
    out["fit_seconds"] = pruner.fit_seconds_
    return out


# -- registered methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SecondOrderConfig(MethodConfig):
    """One global sparsity, the gradient statistics, and the weight update (see module docstring)."""

    owner: ClassVar[str] = "second-order"
    sparsity: float = option(0.9, "fraction of all weights removed (one global ranking)", low=0, high=1,
                             high_open=True)
    num_grads: int = option(1000, "gradients in the Fisher (the paper's m)", low=1)
    grad_batch: int = option(1, "samples averaged into each gradient", low=1)
    damp: float = option(1e-5, "dampening lambda", low=0, low_open=True)
    block_size: int | None = option(2000, "Fisher block size (null: one full inverse)", low=1)
    relative_damp: bool = option(False, "lambda = damp x mean(diag F) (docs/woodfisher.md)")
    update: str = option("single", "weight update: sum of single OBS updates, exact joint, or none",
                         choices=_UPDATES)
    seed: int = option(0, "seed of the gradient mini-batches", low=0)

    def validate(self) -> None:
        if self.owner == "woodtaylor" and self.update == "joint":
            raise ValueError("woodtaylor: update 'joint' does not exist for WoodTaylor; use 'single' or 'none'.")

    def fisher(self) -> FisherConfig:
        return FisherConfig(self.num_grads, self.grad_batch, self.damp, self.block_size, self.seed, self.relative_damp)


_SECOND_ORDER = {
    "obd": ("LeCun, Denker, Solla 1990, Optimal Brain Damage (NIPS 2), saliency h_kk u_k^2 / 2",
            "saliency 1/2 H_qq w_q^2 with the Gauss-Newton diagonal; no weight update"),
    "diag_fisher": ("Singh & Alistarh 2020, arXiv:2004.14340, Sec. 6 (diagonal-Fisher baseline)",
                    "saliency 1/2 F_qq w_q^2 with the empirical Fisher diagonal"),
    "obs": ("Hassibi & Stork 1993, Optimal Brain Surgeon (NIPS 5), saliency and update",
            "exact Hessian inverse, OBS saliency and update (small models only)"),
    "woodfisher": ("Singh & Alistarh 2020, arXiv:2004.14340, Sec. 3-4",
                   "OBS with the Woodbury-inverted empirical Fisher (block-wise or full)"),
    "woodtaylor": ("Singh & Alistarh 2020, arXiv:2004.14340, Sec. 5",
                   "WoodFisher keeping the gradient term of the local quadratic model"),
    "kfac": ("Martens & Grosse 2015 (ICML), K-FAC, Sec. 3 and 6.3; as the OBS baseline of Singh & Alistarh 2020 "
             "Table 1", "OBS with each Linear layer's Fisher as a Kronecker product A x G (K-FAC)"),
}


def _register_second_order(name: str, citation: str, summary: str) -> None:
    damp = 0.1 if name == "woodtaylor" else 1e-5
    cfg = dataclass(frozen=True)(type(f"{name.title().replace('_', '')}Config", (SecondOrderConfig,), {
        "__annotations__": {"damp": "float"}, "owner": name,
        "damp": option(damp, "dampening lambda", low=0, low_open=True),
        "__module__": __name__}))

    def run(model: nn.Module, c: SecondOrderConfig, ctx: StageContext) -> dict[str, Any]:
        pruner = OneShotPruner(name, c.fisher(), c.update).fit(model, ctx.require_data(name).train,
                                                               progress=ctx.progress)
        out = pruner.prune(model, c.sparsity)
        return {**out, "fit_seconds": pruner.fit_seconds_}

    quick = {"obs": {"sparsity": 0.3, "num_grads": 4}, "kfac": {"sparsity": 0.5, "num_grads": 8}}.get(
        name, {"sparsity": 0.5, "num_grads": 8, "block_size": None})
    register(name, kind="oneshot", config=cfg, citation=citation, summary=summary, needs_data=True,
             family="second order", compare=pruned_then_finetuned(name, num_grads=500), quick=quick)(run)


for _name, (_cite, _summary) in _SECOND_ORDER.items():
    _register_second_order(_name, _cite, _summary)
