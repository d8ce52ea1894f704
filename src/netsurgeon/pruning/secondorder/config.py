"""The one config of every second-order method: the sparsity (or an N:M pattern), how the curvature statistics are
gathered, the weight update, and the memory the statistics may take.

Each registered method (``obd``, ``diag_fisher``, ``obs``, ``woodfisher``, ``woodtaylor``, ``kfac``) gets a view
of this class from :func:`config_for`: the same fields, with the method's name in messages and its own default
damping (WoodTaylor 0.1, the paper's MNIST sweep; the others 1e-5). Options a method does not use are accepted
and ignored (``block_size`` for OBD, say); combinations that cannot work are refused in :meth:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from ...masks import parse_nm
from ...registry import MethodConfig, option

__all__ = ["SecondOrderConfig", "FisherConfig", "config_for", "UPDATES", "BLOCKINGS", "LOW_MEMORY_METHODS"]

UPDATES = ("single", "joint", "none")
BLOCKINGS = ("size", "layer")
LOW_MEMORY_METHODS = ("woodfisher", "woodtaylor")  # the methods whose statistics are a (blocked) Woodbury Fisher


@dataclass(frozen=True)
class SecondOrderConfig(MethodConfig):
    """One global sparsity, the gradient statistics, the weight update and the memory bound (module docstring)."""

    owner: ClassVar[str] = "second-order"
    sparsity: float = option(0.9, "fraction of all weights removed (one global ranking; not used with an N:M "
                             "pattern)", low=0, high=1, high_open=True)
    pattern: str = option("unstructured", "unstructured (one global ranking to sparsity), or N:M: in every M "
                          "consecutive inputs of a row remove the M-N lowest saliencies, then the same update "
                          "(e.g. 2:4; sparsity is then 1 - N/M and the sparsity option is not used; embeddings "
                          "and rows not a multiple of M stay dense and are listed as skipped)")
    num_grads: int = option(1000, "gradients in the Fisher (the paper's m)", low=1)
    grad_batch: int = option(1, "samples averaged into each gradient", low=1)
    damp: float = option(1e-5, "dampening lambda", low=0, low_open=True)
    block_size: int | None = option(2000, "Fisher block size (null: one full inverse)", low=1)
    relative_damp: bool = option(False, "lambda = damp x mean(diag F) (docs/woodfisher.md)")
    update: str = option("single", "weight update: sum of single OBS updates, exact joint, or none",
                         choices=UPDATES)
    seed: int = option(0, "seed of the gradient mini-batches", low=0)
    blocks: str = option("size", "Fisher blocks: 'size' (block_size consecutive weights of one tensor, oBERT-style) "
                         "or 'layer' (one block per tensor)", choices=BLOCKINGS)
    low_memory: bool = option(False, "woodfisher/woodtaylor: keep no inverses, recompute them in chunks of blocks "
                              "(and the gradients group by group if they do not fit max_memory)")
    max_memory: float = option(16.0, "GiB the statistics may take (estimated and logged before any work; refused "
                               "above)", low=0, low_open=True)

    def validate(self) -> None:
        check_method_options(self.owner, self)


def check_method_options(method: str, cfg: SecondOrderConfig, update: str | None = None) -> None:
    """Refuse option combinations ``method`` cannot run (one line each, naming the option and its value)."""
    update = cfg.update if update is None else update
    parse_nm(method, cfg.pattern)
    if method == "woodtaylor" and update == "joint":
        raise ValueError("woodtaylor: update 'joint' does not exist for WoodTaylor; use 'single' or 'none'.")
    if cfg.low_memory and method in _METHOD_NAMES and method not in LOW_MEMORY_METHODS:
        raise ValueError(f"{method}: low_memory applies to {' and '.join(LOW_MEMORY_METHODS)}; got low_memory=True.")
    if cfg.low_memory and update == "joint":
        raise ValueError(f"{method}: update 'joint' needs each block's inverse columns; with low_memory=True use "
                         "'single' or 'none'.")


_METHOD_NAMES = ("magnitude", "diag_fisher", "obd", "obs", "woodfisher", "woodtaylor", "kfac")
_DEFAULT_DAMP = {"woodtaylor": 0.1}


@cache
def config_for(method: str) -> type[SecondOrderConfig]:
    """:class:`SecondOrderConfig` as ``method`` sees it: its name in messages, its default damping. No new fields."""
    damp = _DEFAULT_DAMP.get(method, 1e-5)
    name = f"{method.title().replace('_', '')}Config"
    ns = {"__annotations__": {"damp": "float"}, "owner": method, "__module__": __name__,
          "__doc__": f"{SecondOrderConfig.__doc__} ({method}; damp default {damp:g})",
          "damp": option(damp, "dampening lambda", low=0, low_open=True)}
    return dataclass(frozen=True)(type(name, (SecondOrderConfig,), ns))


def FisherConfig(num_grads: int = 1000, grad_batch: int = 1, damp: float = 1e-5,  # noqa: N802 - the old class name
                 block_size: int | None = 2000, seed: int = 0, relative_damp: bool = False,
                 **options: Any) -> SecondOrderConfig:
    """A :class:`SecondOrderConfig` built with the statistics' options first, in the order (and with the defaults)
    of the former ``FisherConfig`` class, so ``FisherConfig(1000, 1, 1e-5, 2000, 0)`` still works. Other options
    (``blocks``, ``low_memory``, ``max_memory``, ``update``) by keyword."""
    return SecondOrderConfig(num_grads=num_grads, grad_batch=grad_batch, damp=damp, block_size=block_size, seed=seed,
                             relative_damp=relative_damp, **options)
