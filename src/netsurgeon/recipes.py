"""YAML recipes: one compression pipeline as data (prune -> fine-tune -> encode), validated key by key.

Example (``recipes/magnitude_lenet300.yaml``; ``recipes/dns_lenet5.yaml`` for method ``dns``)::

    method: magnitude
    sparsity: {fc1: 0.92, fc2: 0.91, fc3: 0.74}   # or one number
    scope: layer                                  # or global (one number)
    rounds: 3
    finetune: {epochs: 2, lr: 0.01, batch_size: 64}
    save: {value_dtype: float16, index_bits: auto}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .data import Dataset
from .pruning.magnitude import prune_and_retrain, prune_magnitude
from .train import TrainConfig, train

__all__ = ["Recipe", "load_recipe", "apply_recipe", "METHODS"]

SECOND_ORDER = ("woodfisher", "woodtaylor", "obs", "obd", "diag_fisher")
METHODS = ("magnitude", "dns", "autoprune", *SECOND_ORDER, "none")  # "none": keep the zeros (e.g. only quantize)
_AUTOPRUNE_KEYS = {"mu", "ste", "alpha", "tau", "m_lr", "m_init", "m_every", "val_batch", "sensitivity",
                   "correlation", "direction", "stop", "seed", "log_every"}
_FISHER_KEYS = {"num_grads", "grad_batch", "damp", "block_size", "seed"}
_DNS_KEYS = {"c_rate", "gamma", "power", "iter_start", "iter_stop", "low", "high", "include_bias", "seed",
             "log_every"}


@dataclass(frozen=True)
class Recipe:
    """A compression pipeline. ``finetune`` holds :class:`TrainConfig` fields. For ``magnitude`` its lr is
    the *original* LR (retraining runs at ``lr * lr_factor``); for ``dns`` it is the surgery run's LR and
    ``dns`` holds the :class:`netsurgeon.pruning.DNS` arguments; for the second-order methods ``fisher``
    holds :class:`netsurgeon.pruning.FisherConfig` fields, ``sparsity`` is one global number, and a
    non-empty ``finetune`` fine-tunes after the one-shot step."""

    method: str = "magnitude"
    sparsity: float | dict[str, float] | None = None
    quality: float | dict[str, float] | None = None
    scope: str = "layer"
    rounds: int = 3
    lr_factor: float = 0.1
    finetune: dict[str, Any] = field(default_factory=dict)
    save: dict[str, Any] = field(default_factory=dict)
    dns: dict[str, Any] = field(default_factory=dict)
    fisher: dict[str, Any] = field(default_factory=dict)
    update: str = "single"
    quantize: dict[str, Any] = field(default_factory=dict)   # k-means sharing after pruning (Deep Compression)
    autoprune: dict[str, Any] = field(default_factory=dict)  # AutoPrune arguments (mu, ste, m_lr, ...)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"recipe: method must be one of {METHODS}; got {self.method!r}.")
        unknown = set(self.finetune) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"recipe: unknown key(s) {sorted(unknown)} under 'finetune'.")
        bad_save = set(self.save) - {"value_dtype", "index_bits"}
        if bad_save:
            raise ValueError(f"recipe: unknown key(s) {sorted(bad_save)} under 'save'.")
        bad_dns = set(self.dns) - _DNS_KEYS
        if bad_dns:
            raise ValueError(f"recipe: unknown key(s) {sorted(bad_dns)} under 'dns'.")
        bad_q = set(self.quantize) - {"bits", "init", "epochs", "lr"}
        if bad_q:
            raise ValueError(f"recipe: unknown key(s) {sorted(bad_q)} under 'quantize'.")
        bad_fisher = set(self.fisher) - _FISHER_KEYS
        if bad_fisher:
            raise ValueError(f"recipe: unknown key(s) {sorted(bad_fisher)} under 'fisher'.")
        if self.method in SECOND_ORDER and not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"recipe: method {self.method!r} takes one global 'sparsity' number.")
        bad_ap = set(self.autoprune) - _AUTOPRUNE_KEYS
        if bad_ap:
            raise ValueError(f"recipe: unknown key(s) {sorted(bad_ap)} under 'autoprune'.")
        if self.method in ("dns", "autoprune", "none"):
            if self.sparsity is not None or self.quality is not None:
                raise ValueError(f"recipe: method {self.method!r} takes no 'sparsity'/'quality'.")
        elif (self.sparsity is None) == (self.quality is None):
            raise ValueError("recipe: give exactly one of 'sparsity' or 'quality'.")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"recipe: scope must be 'layer' or 'global'; got {self.scope!r}.")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"recipe: rounds must be a positive integer; got {self.rounds!r}.")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.finetune)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Parse and validate a YAML recipe; errors name the file and the offending key."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {p}: not valid YAML ({e}).") from e
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {p}: expected a mapping of keys at the top level.")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"recipe {p}: unknown key(s) {unknown}; known keys are {sorted(known)}.")
    try:
        return Recipe(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe {p}: {e}") from e


def apply_recipe(model: nn.Module, data: Dataset | None, recipe: Recipe, progress: bool = False) -> nn.Module:
    """Run ``recipe``'s pruning, fine-tuning and (if asked) k-means sharing on ``model`` in place."""
    _prune(model, data, recipe, progress)
    q = recipe.quantize
    if q:
        from .quantization.kmeans import share_weights

        share_weights(model, q.get("bits"), q.get("init", "linear"))
        if data is not None and q.get("epochs", 0) > 0:  # centroid fine-tuning (Deep Compression Sec. 3.3)
            train(model, data, TrainConfig(epochs=q["epochs"], lr=q.get("lr", 0.001), weight_decay=0.0),
                  progress=progress)
    return model


def _prune(model: nn.Module, data: Dataset | None, recipe: Recipe, progress: bool) -> nn.Module:
    if recipe.method == "none":
        return model
    cfg = recipe.train_config()
    if recipe.method == "dns":
        if data is None:
            raise ValueError("recipe: method 'dns' prunes while training and needs data.")
        from .pruning.dns import DNS

        train(model, data, cfg, callbacks=[DNS(**recipe.dns)], progress=progress)
        return model
    if recipe.method == "autoprune":
        if data is None:
            raise ValueError("recipe: method 'autoprune' trains on the train and validation splits; give data.")
        from .pruning.autoprune import AutoPrune

        ap = AutoPrune(**recipe.autoprune)
        train(model, data, cfg, callbacks=[ap], progress=progress)
        ap.finalize(model)
        return model
    if recipe.method in SECOND_ORDER:
        if data is None:
            raise ValueError(f"recipe: method {recipe.method!r} needs data for its gradient statistics.")
        from .pruning.woodfisher import FisherConfig, OneShotPruner

        fisher = FisherConfig(**recipe.fisher) if recipe.fisher else None
        OneShotPruner(recipe.method, fisher, recipe.update).fit(model, data.train).prune(model, recipe.sparsity)
        if recipe.finetune:  # then fine-tune with the masks fixed
            train(model, data, cfg, progress=progress)
        return model
    if recipe.quality is not None:  # Han's rule, iterated: each round drops |w| < q*std of the survivors
        for r in range(recipe.rounds):
            prune_magnitude(model, quality=recipe.quality)
            if data is not None and cfg.epochs > 0:
                train(model, data, dataclasses.replace(cfg, lr=cfg.lr * recipe.lr_factor, seed=cfg.seed + r + 1),
                      progress=progress)
        return model
    if data is None:
        prune_magnitude(model, sparsity=recipe.sparsity, scope=recipe.scope)
        return model
    prune_and_retrain(model, data, sparsity=recipe.sparsity, rounds=recipe.rounds,
                      epochs_per_round=cfg.epochs, scope=recipe.scope, config=cfg,
                      lr_factor=recipe.lr_factor, progress=progress)
    return model
