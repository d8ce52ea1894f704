"""Second-order one-shot pruning, registered as methods: OBD, diagonal Fisher, OBS, WoodFisher, WoodTaylor, K-FAC.

* OBD (LeCun, Denker, Solla 1990): ρ_q = ½ H_qq w_q², no weight update. H_qq is the Gauss-Newton (true
  Fisher) diagonal, estimated from gradients with labels drawn from the model's own predictions.
* Diagonal Fisher: the same statistic with the *empirical* Fisher diagonal (the WoodFisher paper's baseline).
* OBS (Hassibi & Stork 1993): ρ_q = w_q² / (2 [H⁻¹]_qq) and δw = −(w_q/[H⁻¹]_qq) H⁻¹e_q, with the exact
  Hessian of the loss (small models only: a reference for the approximations), projected onto the positive
  semi-definite matrices (Higham 1988) and damped, since a trained network's Hessian is indefinite.
* WoodFisher (Singh & Alistarh 2020, arXiv:2004.14340): OBS with H ≈ F = λI + (1/m) Σ ∇ℓ∇ℓᵀ, the damped
  empirical Fisher, inverted by Woodbury (Sec. 3), block-wise (blocks never straddle a tensor) or in full;
  ``low_memory`` keeps no inverse (oBERT-style blocks in bounded memory). Several weights removed at once get
  either the sum of single-weight updates (the official code) or the exact joint solution
  δw = −F⁻¹E_Qᵀ(E_QF⁻¹E_Qᵀ)⁻¹E_Qw (Sec. 4).
* WoodTaylor (Sec. 5): keeps the gradient term of the local model; λ = 0.1 by default, as in the paper's
  MNIST sweep.
* K-FAC (Martens & Grosse 2015): OBS with each Linear layer's Fisher approximated by A ⊗ G (input and
  output-gradient covariances, factored Tikhonov damping), the Kronecker baseline of WoodFisher's Table 1.

Every method takes ``pattern="N:M"`` (e.g. 2:4) instead of a sparsity: in every M consecutive inputs of a row the
M−N lowest saliencies are removed and the survivors get the method's update for exactly that set (the N:M form is
ours: :mod:`netsurgeon.pruning.secondorder.pruner`); embeddings and rows not a multiple of M stay dense (listed as
skipped).

The implementation is the package :mod:`netsurgeon.pruning.secondorder` (one config, the curvature estimators,
the pruner); this module registers the methods and keeps the names it has always exported.

Under ``torchrun`` (several ranks), WoodFisher and WoodTaylor shard the block-diagonal Fisher: each rank owns a
contiguous run of blocks (:func:`distributed.owner_ranges`), computes its share of the per-sample gradients,
receives every sample's gradient entries of its own blocks (one all-to-all), inverts and scores its blocks; the
scores are gathered into one global ranking, each rank computes the OBS update of its blocks and the updates
are gathered, so every rank ends with the model a single process prunes. Memory per rank: about 1/W of the
gradients and inverses (docs/distributed.md). The other methods run the same computation on every rank.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..masks import note_skipped, parse_nm
from ..plan import pruned_then_finetuned
from ..registry import StageContext, register
from .secondorder.config import FisherConfig, SecondOrderConfig, config_for
from .secondorder.pruner import METHODS, OneShotPruner, available_memory, one_shot_prune

__all__ = ["METHODS", "FisherConfig", "OneShotPruner", "one_shot_prune", "available_memory", "SecondOrderConfig"]

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
    def run(model: nn.Module, c: SecondOrderConfig, ctx: StageContext) -> dict[str, Any]:
        nm = parse_nm(name, c.pattern)
        pruner = OneShotPruner(name, c).fit(model, ctx.require_data(name).train, progress=ctx.progress)
        out = pruner.prune(model, None if nm else c.sparsity, pattern=c.pattern)
        if out.get("skipped"):  # the stage record lists them (compare's row and page too)
            note_skipped(model, out["skipped"])
        return {**out, "fit_seconds": pruner.fit_seconds_}

    quick = {"obs": {"sparsity": 0.3, "num_grads": 4}, "kfac": {"sparsity": 0.5, "num_grads": 8}}.get(
        name, {"sparsity": 0.5, "num_grads": 8, "block_size": None})
    register(name, kind="oneshot", config=config_for(name), citation=citation, summary=summary, needs_data=True,
             family="second order", compare=pruned_then_finetuned(name, num_grads=500), quick=quick)(run)


for _name, (_cite, _summary) in _SECOND_ORDER.items():
    _register_second_order(_name, _cite, _summary)
