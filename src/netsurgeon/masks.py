"""Masks as parametrizations: the mask is a buffer on the module, so ``state_dict`` carries it.

A mask value of 1 means keep, 0 means pruned. Two gradient rules:

* :class:`Mask` -- forward ``W * T``, gradient ``T * dL/d(W*T)``: pruned weights get no gradient.
* :class:`StraightThroughMask` -- forward ``W * T``, gradient ``dL/d(W*T)`` for *every* entry of W. Dynamic
  Network Surgery (Guo et al. 2016, Sec. 3.2, the weight update after Eq. (1)) needs this so that a pruned
  weight keeps evolving and can be spliced back.

Tensors are named by fully-qualified names such as ``"fc1.weight"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "Mask", "StraightThroughMask", "SUPPORTED_LAYERS", "prunable_layers", "prunable_tensors",
    "attach_masks", "get_masks", "original", "bake", "LayerSparsity", "sparsity_report",
    "attach_masks_for_state_dict", "effective_state_dict", "layer_kind", "freeze_masks", "mask_zeros",
    "parse_nm", "nm_mask",
]

# Grouped and depthwise convolutions are ordinary Conv1d/Conv2d modules with ``groups > 1``.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Layers that hold parameters but are never pruned; they are left alone rather than refused.
_PASSIVE_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class Mask(nn.Module):
    """Parametrization ``W -> W * mask``; the gradient of pruned entries is zero."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


class StraightThroughMask(Mask):
    """Parametrization ``W -> W * mask`` whose gradient reaches every entry of W (DNS, Sec. 3.2)."""

    def forward(self, w: Tensor) -> Tensor:
        return w + (w * self.mask - w).detach()


def layer_kind(module: nn.Module) -> str:
    """``"conv"`` for a convolution, ``"fc"`` otherwise: the layer types that per-type options name."""
    return "conv" if isinstance(module, (nn.Conv1d, nn.Conv2d)) else "fc"


def prunable_layers(model: nn.Module, owner: str = "netsurgeon") -> dict[str, nn.Module]:
    """Return ``{module_name: module}`` for every Linear/Conv1d/Conv2d layer of ``model``.

    Raises:
        ValueError: a layer that holds parameters is of a type no method here supports (e.g. an LSTM),
            or the model has no prunable layer at all.
    """
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, SUPPORTED_LAYERS):
            out[name] = m
        elif not isinstance(m, _PASSIVE_LAYERS) and _own_params(m) and not _is_parametrization(name, m):
            raise ValueError(
                f"{owner}: layer {name!r} of type {type(m).__name__} is not supported "
                f"(supported: {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}).")
    if not out:
        raise ValueError(f"{owner}: the model has no Linear, Conv1d or Conv2d layer to compress.")
    return out


def _own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _is_parametrization(name: str, m: nn.Module) -> bool:
    """Masks, k-means codebooks, gates: modules that live inside a layer's ``parametrizations``."""
    return isinstance(m, (parametrize.ParametrizationList, Mask)) or "parametrizations." in f".{name}."


def prunable_tensors(model: nn.Module, include_bias: bool = False, owner: str = "netsurgeon") -> list[str]:
    """FQNs of the tensors a method prunes: every layer's ``weight`` (and ``bias`` if asked and present)."""
    names = []
    for lname, m in prunable_layers(model, owner).items():
        names.append(f"{lname}.weight")
        if include_bias and getattr(m, "bias", None) is not None:
            names.append(f"{lname}.bias")
    return names


def _split(fqn: str) -> tuple[str, str]:
    mod, _, attr = fqn.rpartition(".")
    return mod, attr


def attach_masks(model: nn.Module, tensors: Iterable[str] | None = None, *, straight_through: bool = False,
                 include_bias: bool = False) -> dict[str, Mask]:
    """Attach an all-ones mask to each tensor (default: every prunable weight). Modifies ``model`` in place.

    A tensor that already has a mask keeps its mask values; only its gradient rule follows
    ``straight_through``. Returns ``{fqn: mask_parametrization}``.
    """
    names = list(tensors) if tensors is not None else prunable_tensors(model, include_bias)
    cls = StraightThroughMask if straight_through else Mask
    out: dict[str, Mask] = {}
    for fqn in names:
        mod_name, attr = _split(fqn)
        module = model.get_submodule(mod_name)
        if parametrize.is_parametrized(module, attr):
            p = module.parametrizations[attr][0]
            if not isinstance(p, Mask):
                raise ValueError(f"attach_masks: {fqn!r} already has a parametrization {type(p).__name__}.")
            p.__class__ = cls  # same buffers, other gradient rule
            out[fqn] = p
            continue
        t = getattr(module, attr, None)
        if not isinstance(t, nn.Parameter):
            raise ValueError(f"attach_masks: module {mod_name!r} has no parameter {attr!r}.")
        p = cls(torch.ones_like(t, dtype=t.dtype))
        parametrize.register_parametrization(module, attr, p, unsafe=True)
        out[fqn] = p
    return out


def get_masks(model: nn.Module) -> dict[str, Mask]:
    """``{fqn: mask_parametrization}`` for every masked tensor of ``model``."""
    out: dict[str, Mask] = {}
    for mod_name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                if isinstance(plist[0], Mask):
                    out[f"{mod_name}.{attr}" if mod_name else attr] = plist[0]
    return out


def original(model: nn.Module, fqn: str) -> nn.Parameter:
    """The trainable tensor behind ``fqn``: the unmasked original if masked, else the parameter itself."""
    mod_name, attr = _split(fqn)
    module = model.get_submodule(mod_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def bake(model: nn.Module) -> nn.Module:
    """Multiply masks into the weights and remove the parametrizations. Modifies ``model`` in place."""
    for fqn in get_masks(model):
        mod_name, attr = _split(fqn)
        parametrize.remove_parametrizations(model.get_submodule(mod_name), attr, leave_parametrized=True)
    return model


@torch.no_grad()
def freeze_masks(model: nn.Module) -> nn.Module:
    """Make every mask a plain :class:`Mask` (no gradient to pruned entries) and zero the hidden originals of
    pruned weights, so later training keeps them at zero. Modifies ``model`` in place and returns it."""
    for fqn, p in get_masks(model).items():
        p.__class__ = Mask
        original(model, fqn).mul_(p.mask)
    return model


@torch.no_grad()
def mask_zeros(model: nn.Module, tensors: Iterable[str] | None = None) -> dict[str, Mask]:
    """Attach (or tighten) masks so that every weight that is exactly zero now stays zero. In place."""
    masks = attach_masks(model, tensors)
    for fqn, p in masks.items():
        p.mask.mul_((original(model, fqn) != 0).to(p.mask.dtype))
    return masks


@torch.no_grad()
def effective_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict a plain (unmasked) copy of ``model`` would have: masks multiplied in, masks dropped.

    Does not copy the model: ``remove_parametrizations`` on a deep copy would delete the property from
    the parametrized class that the original shares.
    """
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key and not key.startswith("parametrizations."):
            out[key] = value
            continue
        mod_name, _, rest = key.rpartition("parametrizations.")
        attr, _, tail = rest.partition(".")
        if tail == "original":
            mod_name = mod_name.rstrip(".")
            out[f"{mod_name}.{attr}" if mod_name else attr] = getattr(
                model.get_submodule(mod_name), attr).detach().clone()
    return out


def attach_masks_for_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Attach masks to ``model`` for every ``*.parametrizations.<attr>.0.mask`` key of ``state_dict``.

    Lets a plain model receive the state of a masked one. Modifies ``model`` in place.
    """
    suffix = ".0.mask"
    names = []
    for key in state_dict:
        if key.endswith(suffix) and ".parametrizations." in key:
            mod_name, _, attr = key[: -len(suffix)].partition(".parametrizations.")
            names.append(f"{mod_name}.{attr}" if mod_name else attr)
    missing = [n for n in names if n not in get_masks(model)]
    if missing:
        attach_masks(model, missing)


@dataclass(frozen=True)
class LayerSparsity:
    """Nonzero count of one tensor; ``kept`` is the fraction of nonzero entries."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int

    @property
    def kept(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0


@torch.no_grad()
def sparsity_report(model: nn.Module, include_bias: bool = True) -> list[LayerSparsity]:
    """Per-tensor nonzero counts of the effective (masked) weights of every prunable layer."""
    rows = []
    for lname, m in prunable_layers(model).items():
        for attr in ("weight", "bias") if include_bias else ("weight",):
            t = getattr(m, attr, None)
            if t is not None:
                rows.append(LayerSparsity(f"{lname}.{attr}", tuple(t.shape), t.numel(), int((t != 0).sum())))
    return rows


# -- N:M semi-structured sparsity ------------------------------------------------------------------------------
def parse_nm(owner: str, pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M): keep N of every M consecutive inputs of a row, 0 < N < M.

    N counts the weights *kept* (NVIDIA's 2:4 keeps 2 of 4). The SparseGPT and Wanda code count the weights
    *pruned* (``prunen``); the two agree for 2:4 and 4:8.
    """
    if pattern == "unstructured":
        return None
    n, sep, m = str(pattern).partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m) <= 256:
        return int(n), int(m)
    raise ValueError(f"{owner}: pattern must be 'unstructured' or 'N:M' with 0 < N < M <= 256 (e.g. '2:4'); "
                     f"got {pattern!r}.")


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries along the input dimension: a 0/1 mask.

    ``scores`` has the weight's shape (out, in, ...); groups run along the flattened input dimension (in x kernel
    for a convolution), as in SparseGPT's and Wanda's code. Ties go to the earlier position. Raises ValueError
    when that dimension is not a multiple of ``m``. Shapes: (out, ...) -> (out, ...), dtype of ``scores``.
    """
    flat = scores.reshape(scores.shape[0], -1)
    if flat.shape[1] % m:
        raise ValueError(f"nm_mask: the input dimension {flat.shape[1]} is not a multiple of M={m}.")
    groups = flat.reshape(flat.shape[0], -1, m)                                # (out, in/m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups)
    keep.scatter_(-1, order[..., :n], 1.0)
    return keep.reshape(scores.shape)
