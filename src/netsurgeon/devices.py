"""The device a model is compressed on (issue 36 item 5): ``--device cpu|cuda|cuda:N``, default where the model's
parameters are.

A pipeline or a training run moves the model there once, moves in-memory data splits there once, and moves the
batches of a user's DataLoader as they come (:func:`running_on` tells :func:`netsurgeon.data.batches` where);
methods create their tensors beside the weights they work on (``device=w.device``), so masks, Fisher statistics,
Hessians and optimizer state stay on the model's device. Files are written from CPU copies of the tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

__all__ = ["parse_device", "model_device", "to_device", "running_on", "active_device", "place"]

_ACTIVE: ContextVar[torch.device | None] = ContextVar("netsurgeon_device", default=None)


def parse_device(spec: str | torch.device | None, owner: str = "--device") -> torch.device | None:
    """``spec`` as a torch.device (None stays None: the model's own device). Refused in one line, quoting it,
    unless it is ``cpu``, ``cuda`` or ``cuda:N`` with that GPU present."""
    if spec is None or isinstance(spec, torch.device):
        return spec
    text = str(spec).strip()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError(f"{owner} {spec!r}: expected cpu, cuda or cuda:N.")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{owner} {spec!r}: torch {torch.__version__} sees no CUDA device on this machine.")
        if index and int(index) >= count:
            raise ValueError(f"{owner} {spec!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}).")
    return torch.device(text)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device | None) -> Any:
    """``obj`` (a tensor, or tuples/lists/dicts of them) on ``device``; None or other objects as they are."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def active_device() -> torch.device | None:
    """The device of the run in progress (None outside a run, or on CPU)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def running_on(device: torch.device | None) -> Iterator[None]:
    """Within the block, :func:`netsurgeon.data.batches` yields its batches on ``device`` (None or CPU: as they
    come)."""
    token = _ACTIVE.set(device if device is not None and device.type != "cpu" else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def place(model: nn.Module, data: Any, device: str | torch.device | None) -> tuple[torch.device, Any]:
    """Move ``model`` to ``device`` (None: leave it where its parameters are) and in-memory data splits there
    too (a :class:`~netsurgeon.data.Dataset`, once); loader data stays and is moved batch by batch inside
    :func:`running_on`. Returns the device and the data to use."""
    dev = parse_device(device) or model_device(model)
    if model_device(model) != dev:
        model.to(dev)
    if dev.type != "cpu" and callable(getattr(data, "to", None)) and not isinstance(data, (nn.Module, torch.Tensor)):
        data = data.to(dev)
    return dev, data
