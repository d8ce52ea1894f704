"""netsurgeon: make trained PyTorch networks smaller and faster, and measure it honestly.

Public names are imported on first use (PEP 562), so ``netsurgeon --help`` and argument errors answer
without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "masks", "models", "pipeline", "pruning", "quantization", "registry", "stats", "coding", "nsz",
               "forms", "changes", "architecture", "compress",
               "runtime", "train", "report", "modelfile", "linalg", "recipes", "demo", "export", "compare")
_NAMES = {
    # storage
    "NszError": "coding", "read_compressed": "nsz", "save_compressed": "nsz", "load_compressed": "modelfile",
    "compile_runtime": "runtime", "export_onnx": "export",
    # data & models
    "DataError": "data", "load_dataset": "data", "build_model": "models",
    # methods and pipelines
    "Pipeline": "pipeline", "get_method": "pipeline", "methods": "pipeline", "run_comparison": "compare",
    # engine
    "Callback": "train", "BestOnValidation": "train", "TrainConfig": "train", "evaluate": "train", "train": "train",
}
__all__ = ["__version__", *_SUBMODULES, *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'netsurgeon' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``netsurgeon.train`` is the training function, as it always was, although a submodule of that name
    exists: importing the submodule must not rebind the package attribute (the import system would)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _NAMES and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # resolved again by __getattr__, to the function
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import data, masks, models, pipeline, pruning, quantization, registry, stats  # noqa: F401
    from .coding import NszError  # noqa: F401
    from .data import DataError, load_dataset  # noqa: F401
    from .export import export_onnx  # noqa: F401
    from .modelfile import load_compressed  # noqa: F401
    from .models import build_model  # noqa: F401
    from .nsz import read_compressed, save_compressed  # noqa: F401
    from .pipeline import Pipeline, get_method, methods  # noqa: F401
    from .runtime import compile_runtime  # noqa: F401
    from .train import Callback, TrainConfig, evaluate, train  # noqa: F401
