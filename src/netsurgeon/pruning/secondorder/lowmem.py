"""WoodFisher in bounded memory (issue 37 item 5): the block-diagonal inverse Fisher with no inverse kept.

The same matrix as :class:`.curvature.WoodburyFisher` (F_b = λI + (1/m) G_bᵀG_b per block, Singh & Alistarh 2020,
Sec. 3), but the inverses are built a chunk of equal-size blocks at a time (:class:`linalg.BatchedFisherInverse`,
float64), used for the scores or the update, and dropped; oBERT (Kurtic et al. 2022) prunes BERT with such
blocks of consecutive weights. What is held:

* the gradients (float32, m x d) when they fit the budget, computed once; otherwise the weights are split into
  *groups* of consecutive blocks whose gradients fit, and each pass (the scores at fit, the update at every prune)
  recomputes one group's gradients at a time from the m mini-batches, cached at fit so every pass sees the
  same samples;
* one chunk of inverses (at most 64 MiB of float64 work, or a quarter of the budget);
* the flat vectors of the ranking and the update (:func:`.curvature.vectors_bytes`, 40 bytes a weight).

Pruned weights stay inside their blocks: their gradients are exactly zero (masks are differentiated through),
so F_b decouples them (λ on their diagonal) and the inverse over the other weights is the one the keeping
estimator computes over unpruned weights only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...data import Split
from ...linalg import BatchedFisherInverse, prefer_factored, relative_damp, squared_norm
from ...progress import Progress
from ...stats import _gradient_batches, gradient_rows
from .config import SecondOrderConfig
from .curvature import Block, FitJob, Layout, _mem, vectors_bytes

__all__ = ["LowMemoryWoodbury", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20  # float64 work of one chunk of block inverses (at most a quarter of the budget)


class LowMemoryWoodbury:
    """WoodFisher's blocked inverse Fisher recomputed chunk by chunk (module docstring). ``budget``: the bytes the
    plan must fit (the gradients are grouped to fit it); ``sample_numel``: numbers in one input sample, for the
    cached mini-batches (0 if unknown)."""

    def __init__(self, cfg: SecondOrderConfig, budget: int | None = None, sample_numel: int = 0) -> None:
        self.cfg, self.budget, self.sample_numel = cfg, budget, sample_numel
        self.damp_, self.phase_seconds_ = cfg.damp, {"gradients": 0.0, "inverses": 0.0}
        self.groups_: list[tuple[int, int]] = []   # [first, last) block index of each group
        self.chunk_ = 1

    # -- plan ------------------------------------------------------------------------------------------------
    def _block_work(self, n: int) -> int:
        """float64 bytes of one n-weight block's inverse while it is built and used (gradients copy, m x m
        Cholesky, factored Y or explicit n x n and their temporaries)."""
        m = self.cfg.num_grads
        return 8 * (3 * m * n + 2 * m * m + (0 if prefer_factored(n, m) else 3 * n * n) + 4 * n)

    def memory(self, layout: Layout, ranges: list[tuple[int, int]], ranks: int = 1) -> dict[str, int]:
        m, d = self.cfg.num_grads, layout.d
        sizes = [b - a for a, b in ranges]
        per = self._block_work(max(sizes))
        chunk_bytes = CHUNK_BYTES if self.budget is None else min(CHUNK_BYTES, self.budget // 4)
        self.chunk_ = max(1, min(len(sizes), chunk_bytes // per))
        work = self.chunk_ * per
        batches = 4 * m * self.cfg.grad_batch * (self.sample_numel + 2)
        fixed = vectors_bytes(d) + 8 * d + batches  # + one gradient row and autograd's parameter gradients
        cap = d if self.budget is None else max(0, (self.budget - fixed - work) // (4 * m))
        self.groups_ = _pack(sizes, cap)
        if not self.groups_:  # even one block's gradients do not fit: report what a single block needs
            self.groups_ = [(i, i + 1) for i in range(len(sizes))]
        width = max(ranges[b - 1][1] - ranges[a][0] for a, b in self.groups_)
        out = _mem(gradients=4 * m * width, work=work, vectors=fixed)
        out["groups"] = len(self.groups_)
        return out

    # -- fit -------------------------------------------------------------------------------------------------
    def fit(self, job: FitJob) -> None:
        """Keep the gradients (one group) or cache the mini-batches (several); relative damping needs Σ‖g‖² over
        all weights first."""
        t0 = time.perf_counter()
        c, d = self.cfg, job.layout.d
        self.job_ = job
        self.ranges_ = job.ranges
        self.g_: Tensor | None = None
        if len(self.groups_) == 1:
            self.g_ = self._group_gradients(job.model, 0, job.data)
            sum_sq = float(squared_norm(self.g_)) if c.relative_damp else 0.0
        else:
            gen = torch.Generator().manual_seed(c.seed)
            self.batches_ = list(_gradient_batches(job.data, c.num_grads, c.grad_batch, gen))
            sum_sq = 0.0
            if c.relative_damp:
                with torch.enable_grad():
                    for _, row in gradient_rows(job.model, self.batches_, job.layout.tensors, c.num_grads,
                                                c.grad_batch, c.seed, progress=job.progress):
                        sum_sq += float(row.double().pow(2).sum())
        if c.relative_damp:
            self.damp_ = relative_damp(c.damp, sum_sq, c.num_grads, d)
        self.phase_seconds_["gradients"] += time.perf_counter() - t0

    def _group_gradients(self, model: nn.Module, k: int, data: Split | Any | None = None) -> Tensor:
        """(m, group width) float32: every gradient's entries in group ``k``'s columns, differentiating only the
        tensors the group touches."""
        job, c = self.job_, self.cfg
        lo, hi = self.ranges_[self.groups_[k][0]][0], self.ranges_[self.groups_[k][1] - 1][1]
        starts = [0]
        for n in job.layout.sizes:
            starts.append(starts[-1] + n)
        first = max(i for i in range(len(job.layout.sizes)) if starts[i] <= lo)
        last = min(i for i in range(1, len(starts)) if starts[i] >= hi)
        tensors = job.layout.tensors[first:last]
        off = starts[first]
        out = torch.empty(c.num_grads, hi - lo, device=job.w.device)
        with torch.enable_grad():
            for i, row in gradient_rows(model, self.batches_ if data is None else data, tensors, c.num_grads,
                                        c.grad_batch, c.seed, progress=job.progress and k == 0):
                out[i] = row[lo - off:hi - off]
        return out

    # -- blocks ----------------------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> Iterator[Block]:
        """Chunks of up to ``chunk_`` equal-size consecutive blocks, group after group (recomputing each group's
        gradients on ``model`` unless they were kept)."""
        m = self.cfg.num_grads
        bar = Progress(f"{self.job_.method}: inverting {len(self.ranges_)} block(s)", len(self.ranges_),
                       enabled=self.job_.progress)
        done = 0
        for k, (a, b) in enumerate(self.groups_):
            t0 = time.perf_counter()
            g = self.g_ if self.g_ is not None else self._group_gradients(model, k)
            t1 = time.perf_counter()
            self.phase_seconds_["gradients"] += t1 - t0
            base = self.ranges_[a][0]
            mean = g.mean(0).double() if self.job_.keep_mean else None
            for first, count, n in _runs(self.ranges_[a:b], self.chunk_):
                bar.update(done)
                s = first - base
                gb = g[:, s:s + count * n].reshape(m, count, n).transpose(0, 1).double()   # (nb, m, n)
                t = time.perf_counter()
                hinv = BatchedFisherInverse(gb, self.damp_)
                self.phase_seconds_["inverses"] += time.perf_counter() - t
                idx = torch.arange(first, first + count * n, device=g.device).reshape(count, n)
                grad = mean[s:s + count * n].reshape(count, n) if mean is not None else None
                yield Block(first, first + count * n, idx, hinv, grad)
                done += count
            del g
        bar.update(done)
        bar.close()


def _pack(sizes: list[int], cap: int) -> list[tuple[int, int]]:
    """Consecutive blocks packed into as few groups of at most ``cap`` weights as greedy packing needs, as even as
    the blocks allow (the largest group sets the memory); [] if one block exceeds ``cap``."""
    if not sizes or max(sizes) > cap:
        return []
    greedy = _greedy(sizes, cap)
    even = -(-sum(sizes) // len(greedy))
    for target in (even, even + max(sizes)):
        groups = _greedy(sizes, min(max(target, max(sizes)), cap))
        if len(groups) == len(greedy):
            return groups
    return greedy


def _greedy(sizes: list[int], cap: int) -> list[tuple[int, int]]:
    groups, first, width = [], 0, 0
    for i, n in enumerate(sizes):
        if width + n > cap:
            groups.append((first, i))
            first, width = i, 0
        width += n
    groups.append((first, len(sizes)))
    return groups


def _runs(ranges: list[tuple[int, int]], chunk: int) -> Iterator[tuple[int, int, int]]:
    """(first weight, number of blocks, block size) of each run of consecutive equal-size blocks, at most
    ``chunk`` blocks a run."""
    i = 0
    while i < len(ranges):
        n = ranges[i][1] - ranges[i][0]
        j = i + 1
        while (j < len(ranges) and j - i < chunk and ranges[j][1] - ranges[j][0] == n
               and ranges[j][0] == ranges[j - 1][1]):
            j += 1
        yield ranges[i][0], j - i, n
        i = j
