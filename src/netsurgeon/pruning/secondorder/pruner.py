"""One-shot second-order pruning to one global sparsity: a curvature estimator (``curvature.py``, ``lowmem.py``)
composed with a saliency, a global selection and an update (the math: :mod:`netsurgeon.linalg`).

| method | curvature | saliency | update |
| --- | --- | --- | --- |
| magnitude | none | abs(w) | none |
| diag_fisher | empirical Fisher diagonal | OBD's ½ h_qq w_q² | none |
| obd | true Fisher (Gauss-Newton) diagonal | OBD's ½ h_qq w_q² | none |
| obs | exact Hessian, PSD-projected | OBS's w_q² / 2[H⁻¹]_qq | OBS (single, joint) |
| woodfisher | Woodbury empirical Fisher, block-wise or full | OBS | OBS (single, joint) |
| woodtaylor | same | WoodTaylor (gradient kept) | Newton step + OBS, line search |
| kfac | K-FAC Kronecker factors per layer | OBS | OBS (single, joint) |

Every method ranks all weights of all layers together: the per-layer sparsity is chosen by the ranking and
reported. Biases are not pruned (as in the official WoodFisher code).

With an N:M pattern (``prune(model, pattern="2:4")``) the selection is per group instead: in every M consecutive
inputs of an output (the flattened input dimension, as :func:`masks.nm_mask`; for Hugging Face's Conv1D, stored
(in, out), its first axis) the M−N weights of lowest saliency are removed, and the surviving weights get the same
update as in the unstructured case, for exactly that removed set.
The papers rank globally (Singh & Alistarh 2020 Sec. 3-4: one threshold on ρ_q = w_q²/2[F⁻¹]_qq); under a
per-group constraint that ranking becomes this greedy per-group choice. The N:M form is ours (no WoodFisher paper
reports N:M); SparseGPT and Wanda choose their N:M masks per group of M inputs the same way. Embeddings (a table
lookup) and tensors whose row length is not a multiple of M stay dense and are reported as skipped, as magnitude's
N:M does; weights already pruned stay pruned (a group may then keep fewer than N).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ... import distributed as ddp
from ..._validation import check_finite_model, check_fraction
from ...data import Split, batches
from ...linalg import (
    obd_scores,
    obs_scores,
    obs_update_joint,
    obs_update_single_sum,
    prefer_factored,
    woodtaylor_scores,
    woodtaylor_update,
)
from ...masks import attach_masks, nm_mask, original, parse_nm, prunable_tensors, sparsity_report
from ...progress import log as progress_log
from ...stats import saved_activation_bytes
from .config import UPDATES, SecondOrderConfig, check_method_options, config_for
from .curvature import (
    Block,
    Curvature,
    DiagonalFisher,
    ExactHessian,
    FitJob,
    KroneckerFisher,
    Layout,
    WoodburyFisher,
    vectors_bytes,
)
from .lowmem import LowMemoryWoodbury

__all__ = ["METHODS", "Recipe", "RECIPES", "OneShotPruner", "one_shot_prune", "available_memory"]

JOINT_MAX = 4096  # the exact joint update solves a |Q| x |Q| system per block


def _obs_saliency(w: Tensor, b: Block) -> Tensor:
    return obs_scores(w.double(), b.hinv.diagonal())


def _obd_saliency(w: Tensor, b: Block) -> Tensor:
    return obd_scores(w, b.hinv.curvature, b.hinv.damp)


def _woodtaylor_saliency(w: Tensor, b: Block) -> Tensor:
    return woodtaylor_scores(w.double(), b.hinv, b.grad)


@dataclass(frozen=True)
class Recipe:
    """A method as a composition: which curvature it estimates, how it scores a weight from its block, whether it
    updates the surviving weights, and whether its blocks can be sharded across ranks."""

    curvature: Callable[[SecondOrderConfig], Curvature] | None
    saliency: Callable[[Tensor, Block], Tensor] | None
    updates: bool = False
    shardable: bool = False
    keeps_mean: bool = False


RECIPES: dict[str, Recipe] = {
    "magnitude": Recipe(None, None),
    "diag_fisher": Recipe(lambda c: DiagonalFisher(c, sample_labels=False), _obd_saliency),
    "obd": Recipe(lambda c: DiagonalFisher(c, sample_labels=True), _obd_saliency),
    "obs": Recipe(ExactHessian, _obs_saliency, updates=True),
    "woodfisher": Recipe(WoodburyFisher, _obs_saliency, updates=True, shardable=True),
    "woodtaylor": Recipe(WoodburyFisher, _woodtaylor_saliency, updates=True, shardable=True, keeps_mean=True),
    "kfac": Recipe(KroneckerFisher, _obs_saliency, updates=True),
}
METHODS = tuple(RECIPES)


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


class OneShotPruner:
    """Fit curvature statistics once on a model, then prune it (or copies of it) to any sparsity.

    Args:
        method: one of :data:`METHODS`.
        fisher: a :class:`SecondOrderConfig` (or ``FisherConfig(...)``): the statistics' options, the update and
            the memory bound (default: the method's defaults; ignored by ``magnitude``).
        update: overrides ``fisher.update``: ``"single"`` (sum of single-weight OBS updates), ``"joint"`` (exact
            for the removed set, per block) or ``"none"``; OBD, diagonal Fisher and magnitude never update.
        memory_limit: bytes the statistics may take besides ``max_memory`` (default: 80% of available memory).
            A fit whose estimate exceeds either is refused before any gradient, with both numbers.

    Attributes:
        curvature_: the fitted estimator; scores_: the global ranking statistic per weight.
        fit_seconds_: wall time of :meth:`fit`; phase_seconds_: its parts (``gradients``, ``inverses``).
        memory_: the estimate logged before the fit; held_bytes_: bytes of the inverses kept after it;
        activations_: the bytes one gradient's forward and backward take besides it (:meth:`_plan`).
    """

    def __init__(self, method: str = "woodfisher", fisher: SecondOrderConfig | None = None, update: str | None = None,
                 memory_limit: int | None = None) -> None:
        if method not in RECIPES:
            raise ValueError(f"OneShotPruner: method must be one of {METHODS}; got {method!r}.")
        if update is not None and update not in UPDATES:
            raise ValueError(f"OneShotPruner: update must be one of {UPDATES}; got {update!r}.")
        self.config = fisher if fisher is not None else config_for(method)()
        self.method, self.update = method, self.config.update if update is None else update
        if method == "woodtaylor" and self.update == "joint":
            raise ValueError("OneShotPruner: woodtaylor has no joint update (its step is the Newton step plus summed "
                             "single-weight corrections); use update='single' or method='woodfisher'.")
        check_method_options(method, self.config, self.update)
        self.recipe = RECIPES[method]
        self.memory_limit = memory_limit
        self.fit_seconds_ = 0.0
        self.activations_ = 0
        self.phase_seconds_: dict[str, float] = {}
        self.held_bytes_ = 0

    # -- fit -----------------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: Split | Any, *, progress: bool = False) -> OneShotPruner:
        """Gather the statistics of ``model`` on ``data`` (use the train or validation split, never test).

        ``data`` is a Split or any iterable of ``(x, y)`` batches (the user's DataLoader). The memory the
        statistics will take is estimated and logged first; a fit that would not fit is refused before any
        gradient is computed. ``progress`` shows the gradient and inversion phases."""
        # Sharded, memory is the point: the inversions' temporaries must not fragment the heap. In one process
        # this costs more than it saves (measured: inversions 30 -> 40 s on LeNet-5, same peak in 2 of 2 runs).
        with ddp.mapped_large_allocations() if self._sharded() else contextlib.nullcontext(), \
                next_token_logits(model, data):
            return self._fit(model, data, progress)

    def _sharded(self) -> bool:
        """Under torchrun, WoodFisher and WoodTaylor split their Fisher blocks across ranks."""
        return ddp.world()[1] > 1 and self.recipe.shardable and not self.config.low_memory

    def _fit(self, model: nn.Module, data: Split | Any, progress: bool) -> OneShotPruner:
        t0 = time.perf_counter()
        check_finite_model("OneShotPruner", model)
        self.tensors_ = prunable_tensors(model, include_bias=False, owner="OneShotPruner")
        masks = attach_masks(model, self.tensors_)
        self.sizes_ = [original(model, t).numel() for t in self.tensors_]
        self.shapes_ = [tuple(original(model, t).shape) for t in self.tensors_]
        self.linear_ = [t.endswith(".weight") and isinstance(model.get_submodule(t.rpartition(".")[0]), nn.Linear)
                        for t in self.tensors_]
        layout = self._layout()
        w = self._flat(model)
        alive = torch.cat([masks[t].mask.flatten() for t in self.tensors_]).bool()
        d = w.numel()
        rank, size = ddp.world()
        self.shard_: tuple[int, int] | None = None  # this rank's [lo, hi) of the flat weights when sharded
        self.shard_sizes_: list[int] = [d]
        sharded = self._sharded()
        ranges = self._plan(model, layout, size if sharded else 1, data)  # estimate, refusal: before any gradient
        if sharded:
            spans = ddp.owner_ranges(ranges, size)
            bounds = [ranges[a][0] if a < len(ranges) else d for a, _ in spans] + [d]
            self.shard_sizes_ = [bounds[r + 1] - bounds[r] for r in range(size)]
            self.shard_ = (bounds[rank], bounds[rank + 1])
            ranges = ranges[spans[rank][0]:spans[rank][1]]
        if self.method == "woodtaylor":
            self.probe_ = _probe_batch(data, 512)
        if self.curvature_ is None:
            self.scores_ = w.abs()
        else:
            job = FitJob(self.method, model, data, layout, self.config, w, alive, ranges, progress and rank == 0,
                         self.recipe.keeps_mean, self.shard_, self.shard_sizes_)
            self.curvature_.fit(job)
            self.scores_ = torch.full((d,), float("inf"), device=w.device)
            for b in self.curvature_.blocks(model):
                self.scores_[b.alive] = self.recipe.saliency(w[b.alive], b).float()
            self.phase_seconds_ = dict(self.curvature_.phase_seconds_)
            self.held_bytes_ = sum(_nbytes(b.hinv) for b in self.blocks_)
            if self.shard_:  # one global ranking: every rank's scores, on every rank
                self.scores_ = ddp.all_gather_concat(self.scores_[self.shard_[0]:self.shard_[1]].contiguous(),
                                                     self.shard_sizes_)
        self.scores_[~alive] = -float("inf")  # already pruned: counted as removed first
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    @property
    def blocks_(self) -> list[Block]:
        """The blocks the estimator keeps (none for magnitude or low_memory)."""
        return list(getattr(self.curvature_, "blocks_", []))

    @property
    def damp_(self) -> float:
        """The damping λ used (with ``relative_damp``: damp x mean(diag F))."""
        return self.curvature_.damp_ if self.curvature_ is not None else self.config.damp

    def _layout(self) -> Layout:
        return Layout(list(getattr(self, "tensors_", [])), list(self.sizes_), list(self.shapes_),
                      tuple(getattr(self, "linear_", ())))

    def _flat(self, model: nn.Module) -> Tensor:
        return torch.cat([getattr(model.get_submodule(t.rpartition(".")[0]), t.rpartition(".")[2]).detach().flatten()
                          for t in self.tensors_])

    # -- memory --------------------------------------------------------------------------------------------------
    def block_ranges(self, d: int, block_size: int | None) -> list[tuple[int, int]]:
        """[start, stop) of the Fisher blocks this method uses with ``block_size`` (K-FAC: one per layer; exact OBS
        and the diagonal methods: one over all weights)."""
        layout = self._layout()
        if self.method == "kfac" or (self.config.blocks == "layer" and self.method in ("woodfisher", "woodtaylor")):
            return layout.block_ranges(None, "layer")
        if block_size is None or self.method not in ("woodfisher", "woodtaylor"):
            return [(0, d)]
        return layout.block_ranges(block_size)

    def _curvature(self, cfg: SecondOrderConfig, budget: int | None, sample_numel: int = 0) -> Curvature | None:
        if self.recipe.curvature is None:
            return None
        if cfg.low_memory:
            return LowMemoryWoodbury(cfg, budget, sample_numel)
        return self.recipe.curvature(cfg)

    def memory_estimate(self, d: int, block_size: int | None, ranks: int = 1,
                        budget: int | None = None) -> dict[str, int]:
        """Bytes the statistics take with ``block_size`` (keys ``gradients``, ``inverses``, ``work``, ``vectors``,
        ``activations``, ``total``; low_memory also ``groups``), from the layout (``sizes_``, ``shapes_``) and,
        once a fit has measured them, :attr:`activations_`. ``ranks`` > 1 (sharded WoodFisher/WoodTaylor): per
        rank. ``budget``: the bytes low_memory plans to fit."""
        cfg = dataclasses.replace(self.config, block_size=block_size)
        curv = self._curvature(cfg, budget)
        if curv is None:
            v = vectors_bytes(d)
            return {"gradients": 0, "inverses": 0, "work": 0, "vectors": v, "activations": 0, "total": v}
        return _with_activations(curv.memory(self._layout(), self.block_ranges(d, block_size), ranks),
                                 self.activations_)

    def _limit(self) -> tuple[int, str]:
        """The bytes a fit may take and what bounds it: ``max_memory`` or the memory available."""
        avail = self.memory_limit if self.memory_limit is not None else int(0.8 * available_memory())
        cap = int(self.config.max_memory * 2**30)
        if cap < avail:
            return cap, f", more than max_memory={self.config.max_memory:g} GiB"
        return avail, f" but {avail / 2**30:.1f} GiB are available"

    def _plan(self, model: nn.Module, layout: Layout, ranks: int, data: Any) -> list[tuple[int, int]]:
        """Estimate memory (per rank when sharded), log it, and refuse (with a block size that would fit) before any
        gradient. Builds :attr:`curvature_`.

        Besides the statistics, each gradient's forward and backward: twice the bytes autograd saves for one
        mini-batch (:func:`stats.saved_activation_bytes`; the backward makes a gradient of each saved tensor, at
        most as large). A language model's grows with B x T x (width, and the vocabulary through its logits): 0.09
        GiB at 4 sequences of 128 bytes on the 3.3M-weight GPT, 1.09 GiB at 64 (measured beside the gradients,
        with a row and the originals' gradients: 0.08 and 0.74 GiB). That takes one forward pass, made only when
        the statistics alone fit: a plan refused on the layout touches neither the model nor the data."""
        d, cfg, m = layout.d, self.config, self.config.num_grads
        if self.method == "obs":
            ExactHessian.check_size(d)
        limit, bound = self._limit()
        sample = int(data.x[0].numel()) if isinstance(data, Split) and len(data) else 0
        bs = cfg.block_size
        ranges = self.block_ranges(d, bs)

        def estimate(act: int) -> dict[str, int]:
            self.activations_ = act
            self.curvature_ = self._curvature(cfg, max(0, limit - act), sample)
            return self.memory_estimate(d, bs, ranks) if self.curvature_ is None else \
                _with_activations(self.curvature_.memory(layout, ranges, ranks), act)

        est = estimate(0)
        if est["total"] <= limit and self.curvature_ is not None and self.method != "obs":
            est = estimate(2 * saved_activation_bytes(model, data, cfg.grad_batch))
        self.memory_ = est
        factored = 0 if self.method == "kfac" else sum(prefer_factored(b - a, m) for a, b in ranges)
        groups = f", {est['groups']} gradient group(s)" if "groups" in est else ""
        progress_log.info("%s: %s weights, %d gradients: about %.2f GiB (gradients %.2f, inverses %.2f, work %.2f, "
                          "vectors %.2f, activations %.2f; %d block(s), %d factored%s), limit %.1f GiB (max_memory "
                          "%g GiB)", self.method, f"{d:,}", m, est["total"] / 2**30, est["gradients"] / 2**30,
                          est["inverses"] / 2**30, est["work"] / 2**30, est["vectors"] / 2**30,
                          est["activations"] / 2**30, len(ranges), factored, groups, limit / 2**30, cfg.max_memory)
        if est["total"] > limit:
            raise ValueError(f"OneShotPruner: {self.method} over {d:,} weights with {m} gradients and block_size={bs}"
                             f"{' (low_memory)' if cfg.low_memory else ''} needs about {est['total'] / 2**30:.3g} "
                             f"GiB{bound}; {self._hint(d, ranks, limit)}.")
        return ranges

    def _hint(self, d: int, ranks: int, limit: int) -> str:
        if self.method == "obs":
            return "use woodfisher"
        if self.config.low_memory:
            return "raise max_memory or use a smaller block_size or fewer num_grads"
        fits = [b for b in (4000, 2000, 1000, 500, 250, 100)
                if self.memory_estimate(d, b, ranks)["total"] <= limit]
        hint = f"use block_size={fits[0]}" if fits else "use fewer num_grads"
        return hint + (" or low_memory=true" if self.method in ("woodfisher", "woodtaylor") else "")

    # -- prune ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, model: nn.Module, sparsity: float | None = None, *,
              pattern: str = "unstructured") -> dict[str, Any]:
        """Prune ``model`` (the fitted model, or one with identical weights) in place to ``sparsity`` overall, or
        to an N:M ``pattern`` (e.g. ``"2:4"``: in every 4 consecutive inputs of a row the 2 lowest saliencies are
        removed; module docstring). Give one of the two.

        Returns ``{"sparsity", "per_layer", "step_scale", "seconds"}`` with the per-layer sparsity the ranking
        chose; with a pattern also ``"skipped"``: ``{layer: why}`` of the tensors left dense."""
        nm = _check_target("OneShotPruner", sparsity, pattern)
        if not hasattr(self, "scores_"):
            raise ValueError("OneShotPruner: call fit(model, data) before prune().")
        t0 = time.perf_counter()
        masks = attach_masks(model, self.tensors_)
        w = self._flat(model).double()
        d = w.numel()
        skipped: dict[str, str] = {}
        if nm is not None:
            prune, skipped = self._nm_selection(model, *nm)
        else:
            k = int(round(sparsity * int((self.scores_ < float("inf")).sum())))  # of the weights it covers
            prune = torch.zeros(d, dtype=torch.bool, device=w.device)
            if k:  # the k lowest scores (stable: ties go to the earlier weight)
                prune[torch.sort(self.scores_, stable=True).indices[:k]] = True
        delta = self._update(model, w, prune) if self.recipe.updates and self.update != "none" else \
            torch.zeros(d, dtype=torch.float64, device=w.device)
        scale = 1.0
        if self.method == "woodtaylor":  # the Newton part can overshoot: a line search on held-out fit data
            scale = self._line_search(model, masks, w, delta, prune)
        self._apply(model, masks, torch.where(prune, torch.zeros_like(w), w + scale * delta).float(), prune)
        per_layer = {r.name.removesuffix(".weight"): 1 - r.kept for r in sparsity_report(model, include_bias=False)}
        out = {"sparsity": float(prune.float().mean()), "per_layer": per_layer, "step_scale": scale,
               "seconds": time.perf_counter() - t0}
        if nm is not None:
            out["skipped"] = skipped
        return out

    def _nm_selection(self, model: nn.Module, n: int, m: int) -> tuple[Tensor, dict[str, str]]:
        """The weights an N:M pattern removes: the M−N lowest scores of every M consecutive inputs of each row
        (stable: ties go to the earlier weight), and the weights already pruned; tensors N:M cannot apply to (an
        embedding, a row length not a multiple of M) lose none and are returned as ``{layer: why}``. (Blocks never
        straddle a tensor, so the update leaves them as they are too, except with one Fisher block over several
        tensors, ``block_size=None``, where the OBS update adjusts every surviving weight of the block.)"""
        from ..magnitude import _nm_kind, _nm_skip  # magnitude's N:M rules (imported late: no import cycle)

        parts, skipped = [], {}
        for t, scores, shape in zip(self.tensors_, self.scores_.split(self.sizes_), self.shapes_, strict=True):
            why = _nm_skip(model, t, original(model, t), m)
            if why is None and bool(torch.isposinf(scores).all()):  # no statistics: the estimator left it (K-FAC)
                why = f"{self.method} has no curvature for it"
            part = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
            if why:
                skipped[t.removesuffix(".weight")] = why
            else:  # the M-N lowest = the M-N highest negated (ties: the earlier weight), in each output's inputs
                part = nm_mask(-scores.view(shape), m - n, m, _nm_kind(model, t)).bool().flatten()
            parts.append(part)
        prune = torch.cat(parts) | torch.isneginf(self.scores_)  # weights pruned before stay pruned
        if skipped:
            progress_log.info("%s %d:%d: left dense: %s", self.method, n, m,
                              "; ".join(f"{k} ({v})" for k, v in skipped.items()))
        return prune, skipped

    def _update(self, model: nn.Module, w: Tensor, prune: Tensor) -> Tensor:
        """The update of the surviving weights, block by block (each rank its own blocks, then gathered)."""
        delta = torch.zeros(w.numel(), dtype=torch.float64, device=w.device)
        for b in self.curvature_.blocks(model):
            q = prune[b.alive]
            if self.update == "joint" and int(q.sum()) > JOINT_MAX:
                raise ValueError(f"OneShotPruner: the joint update would remove {int(q.sum()):,} weights of one "
                                 f"block at once (limit {JOINT_MAX}); use block_size <= {JOINT_MAX} or "
                                 "update='single'.")
            if self.method == "woodtaylor":
                delta[b.alive] = woodtaylor_update(w[b.alive], b.hinv, b.grad, q)
            elif self.update == "joint":
                delta[b.alive] = obs_update_joint(w[b.alive], b.hinv, q)
            elif q.any():
                delta[b.alive] = obs_update_single_sum(w[b.alive], b.hinv, q)
        if self.shard_:  # each rank computed its blocks' update: gather them all
            delta = ddp.all_gather_concat(delta[self.shard_[0]:self.shard_[1]].contiguous(), self.shard_sizes_)
        return delta

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


def _check_target(owner: str, sparsity: float | None, pattern: str) -> tuple[int, int] | None:
    """Exactly one of a sparsity and an N:M pattern, each valid (one-line errors quoting the value); the (N, M)."""
    nm = parse_nm(owner, pattern)
    if nm is not None and sparsity is not None:
        raise ValueError(f"{owner}: give a sparsity or an N:M pattern, not both; got sparsity={sparsity!r} and "
                         f"pattern={pattern!r}.")
    if nm is None:
        if sparsity is None:
            raise ValueError(f"{owner}: give a sparsity or an N:M pattern; got neither.")
        check_fraction(owner, "sparsity", sparsity)
    return nm


def _is_token_data(data: Split | Any) -> bool:
    """Whether ``data`` holds a language model's (B, T) next-token targets (a Split's or the first batch's)."""
    if isinstance(data, Split):
        return data.y.dim() == 2 and not data.y.is_floating_point()
    for _, yb in batches(data, 1):
        return yb.dim() == 2 and not yb.is_floating_point()
    return False


@contextlib.contextmanager
def next_token_logits(model: nn.Module, data: Split | Any) -> Iterator[None]:
    """While fitting on token data, the model's (B, T, V) logits are handed to the loss as (B, V, T): the
    cross-entropy of the gradient rows (``stats.gradient_rows``: ``F.cross_entropy(logits, y)``) is then the mean
    next-token loss over every position, with the (B, T) targets as they are, instead of a shape error (its
    class dimension would be T). Classifier data: nothing changes."""
    if not _is_token_data(data):
        yield
        return

    def channels_first(mod: nn.Module, inp: Any, out: Tensor) -> Tensor:
        return out.transpose(1, 2) if isinstance(out, Tensor) and out.dim() == 3 else out

    handle = model.register_forward_hook(channels_first)
    try:
        yield
    finally:
        handle.remove()


def _with_activations(est: dict[str, int], act: int) -> dict[str, int]:
    """An estimate with the bytes of each gradient's forward and backward (:meth:`OneShotPruner._plan`) added."""
    return {**est, "activations": act, "total": est["total"] + act}


def _nbytes(hinv: Any) -> int:
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


def one_shot_prune(model: nn.Module, data: Split, sparsity: float | None = None, method: str = "woodfisher",
                   fisher: SecondOrderConfig | None = None, update: str | None = None, *,
                   pattern: str = "unstructured") -> dict[str, Any]:
    """Fit and prune in one call, to ``sparsity`` or an N:M ``pattern`` (:meth:`OneShotPruner.prune`). Modifies
    ``model`` in place; returns :meth:`OneShotPruner.prune`'s report."""
    _check_target("one_shot_prune", sparsity, pattern)  # refused before the statistics are gathered
    pruner = OneShotPruner(method, fisher, update).fit(model, data)
    out = pruner.prune(model, sparsity, pattern=pattern)
    out["fit_seconds"] = pruner.fit_seconds_
    return out
