"""YAML recipes: a pipeline as data, optionally naming the model and the data set.

    # recipes/deep_compression_lenet5.yaml
    model: {name: lenet5}                 # or {factory: "pkg.module:fn", kwargs: {...}}
    data: {name: mnist}                   # the data directory still comes from --data-dir
    stages:
      - magnitude: {sparsity: {conv1: 0.34, conv2: 0.88, fc1: 0.92, fc2: 0.81}, rounds: 3, epochs: 6}
      - kmeans: {bits: {conv: 8, fc: 5}}
      - finetune: {epochs: 2, lr: 0.001, weight_decay: 0}
      - encode: {value_dtype: float16}

Recipes of the first format (one flat mapping: ``method``, ``sparsity``, ``finetune``, ``quantize``, ``save``,
``dns``, ``fisher``, ``autoprune``) still load: :func:`convert_legacy` turns them into stages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from torch import nn

__all__ = ["read_recipe", "load_recipe", "load_yaml", "yaml_safe_load", "apply_recipe", "convert_legacy"]

_TOP_KEYS = ("stages", "model", "data")
_LEGACY_KEYS = {"method", "sparsity", "quality", "scope", "rounds", "lr_factor", "finetune", "save", "dns", "fisher",
                "update", "quantize", "autoprune"}
_SECOND_ORDER = ("woodfisher", "woodtaylor", "obs", "obd", "diag_fisher")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without YAML 1.1's base-60 numbers, which read an N:M pattern such as 2:4 as 124."""


_SEXAGESIMAL = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in _SEXAGESIMAL]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_SEXAGESIMAL[0], re.compile(  # PyYAML's int pattern less its base-60 branch
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_SEXAGESIMAL[1], re.compile(  # PyYAML's float pattern less its base-60 branch
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_safe_load(text: str) -> Any:
    """``yaml.safe_load`` except that ``2:4`` stays the string "2:4" (YAML 1.1 reads it as the base-60 number 124)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def load_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML file ``path`` parsed safely; a missing file or invalid YAML is one ValueError naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file not found: {str(p)!r}.")
    try:
        return yaml_safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {str(p)!r}: not valid YAML ({' '.join(str(e).split())}).") from None


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe file as ``{"stages": [...], "model": ..., "data": ...}`` (legacy files converted).

    Raises:
        ValueError: missing file, invalid YAML, unknown top-level keys (named, with the valid ones).
    """
    p = Path(path)
    raw = load_yaml(p, "recipe")
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {p}: expected a mapping with 'stages' at the top level.")
    if "stages" not in raw and "method" in raw:
        return convert_legacy(raw, str(p))
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown or "stages" not in raw:
        raise ValueError(f"recipe {p}: unknown key(s) {unknown}; a recipe has 'stages' (required), 'model' and "
                         "'data'." if unknown else f"recipe {p}: no 'stages' list.")
    for key in ("model", "data"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"recipe {p}: '{key}' must be a mapping; got {raw[key]!r}.")
    return raw


def convert_legacy(raw: dict[str, Any], source: str = "recipe") -> dict[str, Any]:
    """Turn a first-format recipe (one flat mapping) into ``{"stages": [...]}``."""
    unknown = sorted(set(raw) - _LEGACY_KEYS)
    if unknown:
        raise ValueError(f"recipe {source}: unknown key(s) {unknown}; known keys are {sorted(_LEGACY_KEYS)}.")
    method = raw["method"]
    ft = dict(raw.get("finetune") or {})
    stages: list[dict[str, Any]] = []
    if method in ("magnitude",):
        opts = {k: raw[k] for k in ("scope", "rounds", "lr_factor") if k in raw}
        if raw.get("quality") is not None:
            stages.append({"quality": {**ft, "quality": raw["quality"],
                                       **{k: v for k, v in opts.items() if k != "scope"}}})
        else:
            stages.append({"magnitude": {**ft, "sparsity": raw.get("sparsity"), **opts}})
    elif method in ("dns", "autoprune"):
        stages.append({method: {**ft, **(raw.get(method) or {})}})
    elif method in _SECOND_ORDER:
        stages.append({method: {"sparsity": raw.get("sparsity"), **(raw.get("fisher") or {}),
                                **({"update": raw["update"]} if "update" in raw else {})}})
        if ft:
            stages.append({"finetune": ft})
    elif method != "none":
        raise ValueError(f"recipe {source}: method must be one of magnitude, dns, autoprune, "
                         f"{', '.join(_SECOND_ORDER)}, none; got {method!r}.")
    q = dict(raw.get("quantize") or {})
    if q:
        epochs, lr = q.pop("epochs", 0), q.pop("lr", 0.001)
        stages.append({"kmeans": q})
        if epochs:
            stages.append({"finetune": {"epochs": epochs, "lr": lr, "weight_decay": 0.0}})
    stages.append({"encode": dict(raw.get("save") or {})})
    return {"stages": stages}


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> Any:
    """Parse and validate a recipe into a :class:`netsurgeon.pipeline.Pipeline`; errors name the file and key."""
    from .pipeline import Pipeline

    return Pipeline.from_yaml(path, overrides or (), defaults)


def apply_recipe(model: nn.Module, data: Any, recipe: Any, progress: bool = False) -> nn.Module:
    """Run a recipe (a path or a loaded Pipeline) on ``model`` in place; returns the model."""
    pipe = load_recipe(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe
    pipe.run(model, data, progress=progress)
    return model
