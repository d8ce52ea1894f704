"""HashedNets: random weight sharing by hashing (Chen, Wilson, Tyree, Weinberger, Chen 2015, "Compressing Neural
Networks with the Hashing Trick", arXiv:1504.04788).

A layer's virtual weight matrix V (n_out x n_in) is never stored: K = ⌈c·n_out·n_in⌉ real weights w are, and
V_ij = ξ(i, j)·w_{h(i, j)} with an index hash h: (i, j) → {0..K−1} and a sign hash ξ: (i, j) → {±1}, both fixed
functions of the position and a seed (the paper's Eq. (8) forward pass z_i = Σ_j ξ(i,j)·w_{h(i,j)}·a_j). The
gradient of a real weight is the ξ-signed sum of the gradients of its virtual entries (autograd through the
gather gives exactly that; the authors' code does not rescale by bucket occupancy). Biases are hashed too by
default, into ⌈c·n_out⌉ buckets, as in the authors' release.

Deviation, written down: the authors' Torch code hashes decimal key strings with xxHash32; here h and ξ come
from a 64-bit integer mixer (SplitMix64's finalizer) of (seed, position, which hash), vectorized in numpy, so
no extra dependency is needed and a million positions hash in milliseconds. Both are fixed pseudo-random maps;
the method does not depend on which one. Each layer gets its own seed (the release reuses one map for layers of
equal shape).

Implemented as a parametrization of the layer's ``weight`` (and ``bias``) whose stored tensor *is* the K-vector
(``right_inverse`` projects a dense matrix onto the buckets: w_k = mean of ξ·V over the bucket, the
least-squares fit), so parameter names are unchanged, any optimizer trains w, and a ``.nsz`` file stores w and
the seed only (codec ``hashed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..coding.hashing import hash_maps
from ..forms.hashed import HashedWeights
from ..masks import prunable_layers
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import TrainConfig, run_training

__all__ = ["hash_maps", "HashedWeights", "hash_layers", "HashedNetsConfig"]

def hash_layers(model: nn.Module, compression: float, *, seed: int = 0, hash_bias: bool = True,
                conv: bool = False, init: str = "project", generator: torch.Generator | None = None
                ) -> dict[str, dict[str, int]]:
    """Turn every Linear (and, with ``conv``, every convolution) layer of ``model`` into a hashed layer with
    ⌈compression·n⌉ real weights per tensor, in place. ``init``: ``project`` (w from the current weights, the
    least-squares fit) or ``random`` (U(±1/√n_in), the authors' code). Returns {layer: {weight, bias buckets}}.
    """
    if not 0 < compression <= 1:
        raise ValueError(f"hash_layers: compression must be in (0, 1]; got {compression!r}.")
    if init not in ("project", "random"):
        raise ValueError(f"hash_layers: init must be 'project' or 'random'; got {init!r}.")
    check_finite_model("hash_layers", model)
    out = {}
    for k, (name, m) in enumerate(prunable_layers(model, "hashednets").items()):
        if not isinstance(m, nn.Linear) and not conv:
            continue
        if parametrize.is_parametrized(m):
            raise ValueError(f"hashednets: layer {name!r} already holds a parametrization "
                             f"({', '.join(type(p).__name__ for p in m.parametrizations['weight'])}); hash a "
                             "float model.")
        sizes = {}
        for j, attr in enumerate(("weight", "bias")):
            t = getattr(m, attr)
            if t is None or (attr == "bias" and not hash_bias):
                continue
            buckets = max(1, math.ceil(compression * t.numel()))
            par = HashedWeights(tuple(t.shape), buckets, seed * 1_000_003 + 2 * k + j)
            if init == "random":
                bound = 1 / math.sqrt(m.weight[0].numel())
                with torch.no_grad():
                    vals = torch.rand(buckets, generator=generator, device="cpu")  # a CPU generator's draws
                    vals = vals.to(m.weight.device) * 2 * bound - bound
                parametrize.register_parametrization(m, attr, par, unsafe=True)
                with torch.no_grad():
                    m.parametrizations[attr].original.copy_(vals)
            else:
                parametrize.register_parametrization(m, attr, par, unsafe=True)
            sizes[attr] = buckets
        out[name] = sizes
    if not out:
        raise ValueError("hashednets: the model has no Linear layer to hash (set conv=true to hash convolutions).")
    return out


_CITE = "Chen, Wilson, Tyree, Weinberger, Chen 2015, Compressing Neural Networks with the Hashing Trick, " \
        "arXiv:1504.04788, Sec. 4 (Eq. (8))"


@dataclass(frozen=True)
class HashedNetsConfig(TrainConfig):
    owner: ClassVar[str] = "hashednets"
    compression: float = option(0.125, "real weights per virtual weight, c (K = ceil(c·n) per tensor)", low=0,
                                high=1, low_open=True)
    hash_bias: bool = option(True, "hash the biases too (the authors' default)")
    conv: bool = option(False, "hash convolutions too (the paper hashes fully connected layers)")
    init: str = option("project", "project: start from the model's weights; random: from scratch",
                       choices=("project", "random"))
    weight_decay: float = option(0.0, "L2 weight decay (the authors' code uses none)", low=0)


@register("hashednets", family="sharing", compare=trained("hashednets"),
          quick={"epochs": 1, "compression": 0.25},
          kind="training", config=HashedNetsConfig, gives="hashed", needs_data=True, citation=_CITE,
          summary="random weight sharing by hashing: K = c·n real weights per layer, stored with the seed only")
def _run(model: nn.Module, cfg: HashedNetsConfig, ctx: StageContext) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(cfg.seed)
    sizes = hash_layers(model, cfg.compression, seed=cfg.seed, hash_bias=cfg.hash_bias, conv=cfg.conv,
                        init=cfg.init, generator=gen)
    return {**run_training(model, ctx, cfg), "buckets": sizes}
