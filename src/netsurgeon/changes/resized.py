"""``resized``: layers rebuilt at smaller sizes by structured pruning (``pruning/channels.py``).

The record is ``{layer: {field: size}}`` for the fields of Linear (in/out_features), Conv1d/2d (in/out_channels,
groups) and BatchNorm (num_features) layers that differ from the architecture as built; the loader rebuilds those
layers at their recorded sizes, still on the meta device first and still without pickle. A Hugging Face ``Conv1D``
(GPT-2's Linear stored transposed, weight (in, out); found by duck typing, ``transformers`` is not imported) records
in/out_features like a Linear and is resized in place (FFN-neuron pruning, ``pruning/ffn.py``). A bare parameter with
one value per channel ((C,), (C, 1, 1): a ConvNeXt-style layer scale, owned by a module that is none of these layers)
records ``{"channels": C}`` under its own name when the channels it scales were removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..coding.container import NszError
from ..coding.schema import check_int, check_mapping, short
from ..masks import is_hf_conv1d as is_conv1d  # Hugging Face's Conv1D, stored (in, out), also once masked
from . import ArchChange, record_change, register_change

__all__ = ["Resized", "is_conv1d", "layer_sizes", "resized_record", "apply_resized", "record_resized", "SIZE_FIELDS"]

SIZE_FIELDS = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features", "channels")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The size fields of every Linear, Conv1d/2d, BatchNorm and Hugging Face Conv1D layer, by name."""
    out = {}
    for name, m in model.named_modules():
        if is_conv1d(m):
            out[name] = {"in_features": int(m.weight.shape[0]), "out_features": int(m.weight.shape[1])}
            continue
        keys = ("in_features", "out_features") if isinstance(m, nn.Linear) else \
            ("in_channels", "out_channels", "groups") if isinstance(m, (nn.Conv1d, nn.Conv2d)) else \
            ("num_features",) if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) else ()
        if keys:
            out[name] = {k: int(getattr(m, k)) for k in keys}
        elif not isinstance(m, _LAYERS) and not is_conv1d(m):
            for attr, p in m.named_parameters(prefix=name, recurse=False):
                if _channel_dim(p) is not None:  # a bare per-channel parameter (a layer scale): its channel count
                    out[attr] = {"channels": int(p.numel())}
    return out


def _channel_dim(p: torch.Tensor) -> int | None:
    """The axis of a parameter that holds one value per channel ((C,), (C, 1, 1), (1, 1, C)); None for any other."""
    big = [i for i, d in enumerate(p.shape) if d != 1]
    return big[0] if len(big) == 1 else 0 if p.dim() == 1 else None


def resized_record(model: nn.Module, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The layers of ``model`` whose sizes differ from ``before`` (:func:`layer_sizes` of the architecture as
    built), with their new sizes: what a ``.nsz`` file records so the smaller model is rebuilt without pickle."""
    out = {}
    for name, sizes in layer_sizes(model).items():
        diff = {k: v for k, v in sizes.items() if before.get(name, {}).get(k, v) != v}
        if diff:
            out[name] = diff
    return out


def record_resized(model: nn.Module, resized: dict[str, dict[str, int]]) -> None:
    """Record on ``model`` the layer sizes that differ from its architecture as built (merged per layer)."""
    record_change(model, "resized", resized)


def apply_resized(model: nn.Module, resized: dict[str, dict[str, int]], source: str = "file") -> nn.Module:
    """Rebuild the layers named in ``resized`` at their recorded sizes (fresh weights, on the model's device);
    raises ValueError naming a layer or field that does not fit."""
    for name, sizes in resized.items():
        if set(sizes) == {"channels"}:
            _resize_parameter(model, name, sizes["channels"], source)
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: resized layer {name!r} is not in the model.") from None
        p = next(old.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        if is_conv1d(old) and set(sizes) <= {"in_features", "out_features"}:
            _resize_conv1d(old, sizes.get("in_features", old.weight.shape[0]),
                           sizes.get("out_features", old.weight.shape[1]))
            continue
        if isinstance(old, nn.Linear) and set(sizes) <= {"in_features", "out_features"}:
            new: nn.Module = nn.Linear(sizes.get("in_features", old.in_features),
                                       sizes.get("out_features", old.out_features), bias=old.bias is not None,
                                       device=dev)
        elif isinstance(old, (nn.Conv1d, nn.Conv2d)) and set(sizes) <= {"in_channels", "out_channels", "groups"}:
            new = type(old)(sizes.get("in_channels", old.in_channels), sizes.get("out_channels", old.out_channels),
                            old.kernel_size, old.stride, old.padding, old.dilation, sizes.get("groups", old.groups),
                            old.bias is not None, old.padding_mode, device=dev)
        elif isinstance(old, (nn.BatchNorm1d, nn.BatchNorm2d)) and set(sizes) <= {"num_features"}:
            new = type(old)(sizes["num_features"], old.eps, old.momentum, old.affine, old.track_running_stats,
                            device=dev)
        else:
            raise ValueError(f"{source}: cannot resize layer {name!r} ({type(old).__name__}) with {sizes}.")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _resize_parameter(model: nn.Module, name: str, channels: int, source: str) -> None:
    """A bare per-channel parameter (a layer scale) at ``channels`` along its channel axis, in place (fresh values)."""
    try:
        p = model.get_parameter(name)
    except AttributeError:
        raise ValueError(f"{source}: resized parameter {name!r} is not in the model.") from None
    dim = _channel_dim(p)
    if dim is None:
        raise ValueError(f"{source}: parameter {name!r} of shape {tuple(p.shape)} holds no one value per channel; "
                         "it cannot be resized.")
    shape = list(p.shape)
    shape[dim] = channels
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr,
            nn.Parameter(torch.empty(shape, device=p.device, dtype=p.dtype), requires_grad=p.requires_grad))


def _resize_conv1d(m: nn.Module, n_in: int, n_out: int) -> None:
    """A Conv1D at (n_in, n_out), in place: fresh (uninitialized) weight and bias on its device and dtype."""
    w = m.weight
    m.weight = nn.Parameter(torch.empty(n_in, n_out, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    b = getattr(m, "bias", None)
    if b is not None:
        m.bias = nn.Parameter(torch.empty(n_out, device=w.device, dtype=b.dtype), requires_grad=b.requires_grad)
    m.nf = n_out
    if hasattr(m, "nx"):
        m.nx = n_in


@register_change
class Resized(ArchChange):
    key = "resized"
    reshapes = True
    order = 10

    def check(self, where: str, value: Any) -> None:
        def one(layer: str, sizes: Any) -> None:
            if not isinstance(sizes, dict) or not sizes or set(sizes) - set(SIZE_FIELDS):
                raise NszError(f"{where}: field 'resized' entry {short(layer)}: {short(sizes)} must map "
                               f"{sorted(SIZE_FIELDS)} to sizes.")
            for k, v in sizes.items():
                check_int(where, f"resized.{layer}.{k}", v, 1, 1 << 24)

        check_mapping(where, "resized", value, one)

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        apply_resized(model, value, source)

    def merge(self, old: Any, new: Any) -> Any:
        merged = {k: dict(v) for k, v in (old or {}).items()}
        for name, sizes in new.items():
            merged.setdefault(name, {}).update(sizes)
        return merged
