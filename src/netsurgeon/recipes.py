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
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_recipe", "load_yaml", "yaml_safe_load"]

_TOP_KEYS = ("stages", "model", "data")


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
