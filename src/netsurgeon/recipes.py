"""YAML recipes: a pipeline as data, optionally naming the model and the data set.

    # recipes/deep_compression_lenet5.yaml
    model: {name: lenet5}                 # or {factory: "pkg.module:fn", kwargs: {...}}
    data: {name: mnist}                   # the data directory still comes from --data-dir
    stages:
      - magnitude: {sparsity: {conv1: 0.34, conv2: 0.88, fc1: 0.92, fc2: 0.81}, rounds: 3, epochs: 6}
      - kmeans: {bits: {conv: 8, fc: 5}}
      - finetune: {epochs: 2, lr: 0.001, weight_decay: 0}
      - encode: {value_dtype: float16}

This module only reads and checks the file's shape; ``Pipeline.from_yaml`` (pipeline.py) builds and validates
the stages, so recipes are parsed without importing the pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_recipe", "load_yaml"]

_TOP_KEYS = ("stages", "model", "data")


def load_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML file ``path`` parsed safely; a missing file or invalid YAML is one ValueError naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file not found: {str(p)!r}.")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {str(p)!r}: not valid YAML ({' '.join(str(e).split())}).") from None


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe file as ``{"stages": [...], "model": ..., "data": ...}``.

    Raises:
        ValueError: missing file, invalid YAML, unknown top-level keys (named, with the valid ones).
    """
    p = Path(path)
    raw = load_yaml(p, "recipe")
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {p}: expected a mapping with 'stages' at the top level.")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown or "stages" not in raw:
        raise ValueError(f"recipe {p}: unknown key(s) {unknown}; a recipe has 'stages' (required), 'model' and "
                         "'data'." if unknown else f"recipe {p}: no 'stages' list.")
    for key in ("model", "data"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"recipe {p}: '{key}' must be a mapping; got {raw[key]!r}.")
    return raw
