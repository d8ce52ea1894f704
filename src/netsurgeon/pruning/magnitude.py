"""Magnitude pruning with retraining (Han, Pool, Tran, Dally 2015, "Learning both Weights and Connections
for Efficient Neural Networks", arXiv:1506.02626).

* Sec. 3.1/3.3: connections with |w| below a threshold are removed; the network is retrained with the
  pruned connections held at zero, and prune/retrain is iterated.
* Sec. 4 ("the pruning threshold is chosen as a quality parameter multiplied by the standard deviation of a
  layer's weights"): ``quality=q`` gives the per-layer threshold q·std(W_l).
* Sec. 3.3 notes retraining should start from a lower learning rate: we retrain at 1/10 of the original LR.

Besides the quality rule, a target ``sparsity`` (per layer, or one global budget ranked across layers) can
be given, or an N:M ``pattern`` (keep the N largest |w| of every M consecutive inputs of each output, e.g. 2:4, also
in Hugging Face's Conv1D, stored (in, out); the magnitude baseline of SparseGPT's and Wanda's N:M tables; embeddings
stay dense, as in those methods). Pruned entries stay pruned: a later round only removes more, as in Han et al.'s
iterative pruning (Sec. 3.3). Weights that are already exactly zero (a model pruned and baked, or pruned elsewhere)
count as pruned, and a target below a layer's current sparsity keeps its mask as it is (logged, and listed in the
stage report).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._validation import check_finite_model, check_fraction, check_positive
from ..data import Dataset
from ..masks import (
    LAYER_KINDS,
    LayerSparsity,
    attach_masks,
    mask_zeros,
    nm_mask,
    original,
    parse_nm,
    prunable_tensors,
    site_kind_of,
    sparsity_report,
    weight_matrix,
    weight_sites,
)
from ..plan import trained
from ..progress import log as progress_log
from ..registry import StageContext, option, register
from ..train import TrainConfig, TrainResult, train

__all__ = ["magnitude_mask", "magnitude_nm_mask", "quality_mask", "prune_magnitude", "prune_and_retrain",
           "round_targets", "MagnitudeConfig", "QualityConfig"]

log = logging.getLogger(__name__)


def magnitude_mask(w: Tensor, mask: Tensor, sparsity: float) -> Tensor:
    """Return a mask that zeroes the ``round(sparsity·numel)`` smallest |w|, keeping pruned entries pruned.

    Entries already masked out rank below every live entry, so the new mask is a subset of ``mask``.
    Shapes: w, mask (any, same shape). Ties are broken by position (stable sort).
    """
    n = w.numel()
    k = int(round(sparsity * n))
    score = torch.where(mask.bool(), w.abs(), torch.full_like(w, -1.0)).flatten()
    out = torch.ones(n, dtype=mask.dtype, device=mask.device)
    if k > 0:
        out[torch.sort(score, stable=True).indices[:k]] = 0
    return out.view_as(mask) * mask


def magnitude_nm_mask(w: Tensor, mask: Tensor, n: int, m: int, kind: str = "linear") -> Tensor:
    """Keep the ``n`` largest |w| of every ``m`` consecutive inputs of each output (``masks.nm_mask``; ``kind``
    ``"transposed"`` for Hugging Face's Conv1D, stored (in, out)); entries already masked out rank lowest and stay
    pruned. Shapes: w, mask (out, in, ...), or (in, out) when transposed."""
    return nm_mask(torch.where(mask.bool(), w.abs(), torch.full_like(w, -1.0)), n, m, kind) * mask


def _nm_kind(model: nn.Module, fqn: str) -> str:
    """The site kind of tensor ``fqn`` (:data:`masks.SITE_KINDS`; "linear" for anything not a weight site): it
    says which axis of the tensor holds the inputs N:M groups run along."""
    mod, _, attr = fqn.rpartition(".")
    return dict(site_kind_of(model.get_submodule(mod))).get(attr, "linear")


def _nm_unfit(w: Tensor, m: int, kind: str = "linear") -> bool:
    """A tensor N:M cannot apply to: a bias, or a row length (inputs per output) that is not a multiple of M."""
    return w.dim() < 2 or weight_matrix(w, kind).shape[1] % m != 0


def _nm_skip(model: nn.Module, fqn: str, w: Tensor, m: int) -> str | None:
    """Why N:M leaves tensor ``fqn`` dense, or None: an embedding (a table lookup: N:M speeds up no matmul there,
    and SparseGPT, Wanda and the calibrated methods here leave embeddings alone too), a bias, or a row length that
    is not a multiple of M."""
    if isinstance(model.get_submodule(fqn.rpartition(".")[0]), nn.Embedding):
        return "an embedding is a table lookup (N:M speeds up no matmul there)"
    return f"inputs per row not a multiple of M={m}" if _nm_unfit(w, m, _nm_kind(model, fqn)) else None


def quality_mask(w: Tensor, mask: Tensor, quality: float) -> Tensor:
    """Han et al. 2015 Sec. 4: drop |w| < quality·std, std taken over the layer's surviving weights."""
    live = w[mask.bool()]
    if live.numel() < 2:
        return mask.clone()
    thr = quality * live.std()
    return mask * (w.abs() >= thr).to(mask.dtype)


def _per_tensor(owner: str, param: str, value: float | Mapping[str, float], names: list[str],
                check, model: nn.Module) -> dict[str, float]:
    """``{tensor: value}``: one number for every tensor, or a mapping keyed by tensor (``fc1.weight``), layer
    (``fc1``) or layer kind (``conv``, ``fc``, ``embedding``: every layer of it), the most specific key winning;
    tensors the mapping does not cover are left out."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names) - {n.rsplit(".", 1)[0] for n in names} - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"{owner}: unknown layer(s) {unknown}; the model has {names} "
                             f"(or {'/'.join(LAYER_KINDS)} for every layer of a kind).")
        kinds = {s.module: s.layer_kind for s in weight_sites(model)}
        out = {}
        for n in names:
            layer = n.rsplit(".", 1)[0]
            v = value.get(n, value.get(layer, value.get(kinds.get(layer, ""))))
            if v is not None:
                out[n] = check(owner, f"{param} for {n!r}", v)
        return out
    v = check(owner, param, value)
    return dict.fromkeys(names, v)


@torch.no_grad()
def prune_magnitude(model: nn.Module, *, sparsity: float | Mapping[str, float] | None = None,
                    quality: float | Mapping[str, float] | None = None, scope: str = "layer",
                    include_bias: bool = False, pattern: str = "unstructured") -> list[LayerSparsity]:
    """Prune ``model`` in place by weight magnitude; masks are attached (or tightened) and returned as a report.

    Args:
        sparsity: fraction of each tensor to remove, in [0, 1): one number, or ``{layer_or_tensor: s}``
            (a layer kind, ``conv``/``fc``/``embedding``, covers every layer of it; a layer's own name wins).
            With ``scope="global"`` a single number: one threshold over all tensors, so each layer's
            sparsity is chosen by the ranking. Pruning only removes: weights already exactly zero count as
            pruned, and a tensor already sparser than its target keeps its mask as it is (logged).
        quality: Han's rule instead: remove |w| < quality·std(layer). One number or a mapping.
        scope: ``"layer"`` or ``"global"``.
        include_bias: prune biases too (they are few; off by default as in Han et al.).
        pattern: ``"N:M"`` (e.g. ``"2:4"``) instead of sparsity/quality: keep the N largest |w| of every M
            consecutive inputs of each row. Tensors whose row length is not a multiple of M stay as they are
            (logged).

    Raises:
        ValueError: not exactly one of sparsity/quality/pattern, a value out of range, NaN weights,
            an unsupported layer type.
    """
    owner = "prune_magnitude"
    nm = parse_nm(owner, pattern)
    if (sparsity is None) + (quality is None) + (nm is None) != 2:
        raise ValueError(f"{owner}: give exactly one of sparsity or quality, or an N:M pattern instead of both.")
    if scope not in ("layer", "global"):
        raise ValueError(f"{owner}: scope must be 'layer' or 'global'; got {scope!r}.")
    check_finite_model(owner, model)
    names = prunable_tensors(model, include_bias, owner)
    if nm is None and sparsity is not None:
        targets = _sparsity_targets(owner, model, sparsity, names, scope)
    elif nm is None and scope == "global":
        raise ValueError(f"{owner}: scope='global' takes one sparsity number; got quality={quality!r}.")
    elif nm is None:
        targets = _per_tensor(owner, "quality", quality, names,
                              lambda o, n, v: check_positive(o, n, v) if v != 0 else 0.0, model)
    # weights already exactly zero (pruned, then baked) count as pruned; a tensor that is zero throughout is an
    # initialization (a zero-initialized bias), not a pruning result, and stays free to train
    masks = mask_zeros(model, [n for n in names if bool(original(model, n).any())])
    masks = {**attach_masks(model, names), **masks}
    weights = {n: original(model, n) for n in names}
    if nm is not None:
        for n in names:
            why = _nm_skip(model, n, weights[n], nm[1])
            if why:
                log.info("%s: %s stays as it is: %s", owner, n, why)
            else:
                masks[n].mask.copy_(magnitude_nm_mask(weights[n], masks[n].mask, *nm, _nm_kind(model, n)))
        return _zero_originals(model, masks, weights)
    if sparsity is not None:
        above = _sparser_than_asked(model, targets, scope)
        if above:
            log.info("%s: already sparser than asked, masks kept as they are (pruning only removes): %s", owner,
                     ", ".join(f"{k} ({100 * v:.1f}%)" for k, v in above.items()))
    if scope == "global":
        s = next(iter(targets.values()))
        flat_w = torch.cat([weights[n].flatten() for n in names])
        flat_m = torch.cat([masks[n].mask.flatten() for n in names])
        new = magnitude_mask(flat_w, flat_m, s)
        for n, part in zip(names, new.split([weights[n].numel() for n in names]), strict=True):
            masks[n].mask.copy_(part.view_as(masks[n].mask))
    else:
        rule = magnitude_mask if sparsity is not None else quality_mask
        for n, v in targets.items():
            masks[n].mask.copy_(rule(weights[n], masks[n].mask, v))
    return _zero_originals(model, masks, weights)


def _zero_originals(model: nn.Module, masks: dict, weights: dict[str, Tensor]) -> list[LayerSparsity]:
    for n, w in weights.items():  # the hidden originals of pruned weights are zeroed too: the file holds exact zeros
        w.mul_(masks[n].mask)
    return sparsity_report(model)


def _sparsity_targets(owner: str, model: nn.Module, sparsity: float | Mapping[str, float], names: list[str],
                      scope: str) -> dict[str, float]:
    """``{tensor: target sparsity}`` for the tensors ``sparsity`` covers (with ``scope="global"``, one number for
    every tensor: a single ranking over them all)."""
    if scope == "global":
        if isinstance(sparsity, Mapping):
            raise ValueError(f"{owner}: scope='global' takes one sparsity number; got {dict(sparsity)!r}.")
        return dict.fromkeys(names, check_fraction(owner, "sparsity", sparsity))
    return _per_tensor(owner, "sparsity", sparsity, names, check_fraction, model)


@torch.no_grad()
def _sparser_than_asked(model: nn.Module, targets: Mapping[str, float], scope: str = "layer") -> dict[str, float]:
    """The tensors already sparser than their target, ``{layer: sparsity now}`` (with ``scope="global"`` one entry,
    ``"all layers"``, for the total). Exact zeros of the masked weight count as pruned. Pruning only removes
    (Han et al. 2015, Sec. 3.3: pruned connections stay pruned through the rounds), so their masks stay as they are."""
    counts = {}
    for n in targets:
        mod, _, attr = n.rpartition(".")
        w = getattr(model.get_submodule(mod), attr)
        counts[n] = (int((w == 0).sum()), w.numel())
    if scope == "global":
        pruned, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        s = next(iter(targets.values()), 0.0)
        return {"all layers": pruned / total} if total and pruned > round(s * total) else {}
    return {n.removesuffix(".weight"): p / t for n, (p, t) in counts.items() if p > round(targets[n] * t)}


def round_targets(final: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` rounds: each round removes the same fraction of what survives."""
    kept = 1.0 - final
    return [1.0 - kept ** ((r + 1) / rounds) for r in range(rounds)]


def prune_and_retrain(model: nn.Module, data: Dataset, *, sparsity: float | Mapping[str, float],
                      rounds: int = 3, epochs_per_round: int = 2, scope: str = "layer",
                      config: TrainConfig | None = None, lr_factor: float = 0.1,
                      progress: bool = False, pattern: str = "unstructured") -> list[TrainResult]:
    """Iterative pruning (Han et al. 2015 Sec. 3.3): ``rounds`` times prune, then retrain at ``lr·lr_factor``.

    The final per-layer sparsity is ``sparsity``; intermediate targets follow :func:`round_targets`. With an N:M
    ``pattern`` every round applies the pattern (``sparsity`` is not used). Modifies ``model`` in place. Returns
    the training result of each round.
    """
    check_positive("prune_and_retrain", "rounds", rounds, integer=True)
    base = config or TrainConfig()
    rt = replace(base, lr=base.lr * lr_factor, epochs=epochs_per_round)
    results = []
    for r in range(rounds):
        if pattern != "unstructured":
            rep = prune_magnitude(model, pattern=pattern)
        else:
            if isinstance(sparsity, Mapping):
                target: float | dict[str, float] = {k: round_targets(v, rounds)[r] for k, v in sparsity.items()}
            else:
                target = round_targets(sparsity, rounds)[r]
            rep = prune_magnitude(model, sparsity=target, scope=scope)
        kept = sum(x.nonzero for x in rep) / sum(x.numel for x in rep)
        (progress_log if progress else log).info("magnitude round %d/%d: kept %.2f%% of prunable weights",
                                                 r + 1, rounds, 100 * kept)
        if epochs_per_round > 0:
            results.append(train(model, data, replace(rt, seed=base.seed + r + 1), progress=progress))
    return results



# -- registered methods ----------------------------------------------------------------------------------
_HAN = "Han, Pool, Tran, Dally 2015, arXiv:1506.02626, Sec. 3.1-3.3 and 4"


@dataclass(frozen=True)
class MagnitudeConfig(TrainConfig):
    """Iterative magnitude pruning to a target sparsity; the training fields are those of each retraining
    round (``lr`` is the *original* LR, retraining runs at ``lr * lr_factor``)."""

    owner: ClassVar[str] = "magnitude"
    epochs: int = option(2, "retraining epochs per round (0: prune only, no data needed)", low=0)
    sparsity: float | dict[str, float] = option(0.9, "fraction of weights removed: one number or {conv|fc|layer: s}",
                                                 low=0, high=1, high_open=True)
    scope: str = option("layer", "layer: each tensor to its sparsity; global: one ranking over all layers",
                        choices=("layer", "global"))
    rounds: int = option(3, "prune/retrain rounds; each removes the same fraction of the survivors", low=1)
    lr_factor: float = option(0.1, "retraining LR = lr x lr_factor (Sec. 3.3)", low=0, low_open=True)
    pattern: str = option("unstructured", "unstructured, or N:M: keep the N largest |w| of every M consecutive "
                                          "inputs of a row (e.g. 2:4; sparsity is then 1 - N/M)")

    def validate(self) -> None:
        if self.scope == "global" and isinstance(self.sparsity, dict):
            raise ValueError(f"{self.owner}: scope 'global' takes one sparsity number; got {self.sparsity!r}.")
        if parse_nm(self.owner, self.pattern) is not None and self.scope == "global":
            raise ValueError(f"{self.owner}: an N:M pattern is per row; scope must be 'layer'; got 'global'.")


@dataclass(frozen=True)
class QualityConfig(TrainConfig):
    """Han's own rule: each round removes |w| < quality x std of the layer's surviving weights."""

    owner: ClassVar[str] = "quality"
    epochs: int = option(2, "retraining epochs per round (0: prune only, no data needed)", low=0)
    quality: float | dict[str, float] = option(0.5, "threshold in layer std units: one number or {conv|fc|layer: q}",
                                                low=0)
    rounds: int = option(3, "prune/retrain rounds", low=1)
    lr_factor: float = option(0.1, "retraining LR = lr x lr_factor (Sec. 3.3)", low=0, low_open=True)


def _kept(model: nn.Module) -> dict[str, Any]:
    rows = sparsity_report(model, include_bias=False)
    return {"kept": sum(r.nonzero for r in rows) / sum(r.numel for r in rows),
            "kept_per_layer": {r.name.removesuffix(".weight"): r.kept for r in rows}}


@register("magnitude", family="pruning", quick={"sparsity": 0.5, "rounds": 1, "epochs": 1},
          compare={"magnitude": trained("magnitude", sparse=True, rounds=1),
                   "magnitude_global": trained("magnitude", sparse=True, rounds=1, scope="global")},
          kind="oneshot", config=MagnitudeConfig, citation=_HAN, needs_data=lambda c: c.epochs > 0,
          summary="remove the smallest |w| (per layer or global), retrain, repeat")
def _run_magnitude(model: nn.Module, cfg: MagnitudeConfig, ctx: StageContext) -> dict[str, Any]:
    nm = parse_nm(cfg.owner, cfg.pattern)
    above = {} if nm is not None else _sparser_than_asked(
        model, _sparsity_targets(cfg.owner, model, cfg.sparsity, prunable_tensors(model, owner=cfg.owner), cfg.scope),
        cfg.scope)
    if cfg.epochs == 0:
        if nm is not None:
            prune_magnitude(model, pattern=cfg.pattern)
        else:
            prune_magnitude(model, sparsity=cfg.sparsity, scope=cfg.scope)
    else:
        prune_and_retrain(model, ctx.require_data("magnitude"), sparsity=cfg.sparsity, rounds=cfg.rounds,
                          epochs_per_round=cfg.epochs, scope=cfg.scope, config=replace(cfg, epochs=1).train_config(),
                          lr_factor=cfg.lr_factor, progress=ctx.progress, pattern=cfg.pattern)
    report = _kept(model)
    if above:  # kept as they were: a mask only ever removes
        report["sparser_than_asked"] = {k: round(v, 4) for k, v in above.items()}
    if nm is not None:
        why = {n: _nm_skip(model, n, original(model, n), nm[1]) for n in prunable_tensors(model, owner=cfg.owner)}
        report["skipped"] = {n.removesuffix(".weight"): w for n, w in why.items() if w}
    return report


@register("quality", family="pruning", compare=trained("quality", rounds=1),
          quick={"quality": 0.5, "rounds": 1, "epochs": 1},
          kind="oneshot", config=QualityConfig, citation=_HAN, needs_data=lambda c: c.epochs > 0,
          summary="Han's rule: remove |w| < quality x std(layer), retrain, repeat")
def _run_quality(model: nn.Module, cfg: QualityConfig, ctx: StageContext) -> dict[str, Any]:
    for r in range(cfg.rounds):
        prune_magnitude(model, quality=cfg.quality)
        (progress_log if ctx.progress else log).info("quality round %d/%d: kept %.2f%%", r + 1, cfg.rounds,
                                                     100 * _kept(model)["kept"])
        if cfg.epochs > 0:
            train(model, ctx.require_data("quality"),
                  replace(cfg, lr=cfg.lr * cfg.lr_factor, seed=cfg.seed + r + 1).train_config(), progress=ctx.progress)
    return _kept(model)
