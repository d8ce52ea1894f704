"""A CPU proxy for the bugs a GPU would find (issue 36 item 5): every tensor a method creates without naming a
device.

On CUDA a tensor made by ``torch.zeros(n)`` lands on the CPU beside cuda weights, and the first op that mixes
them fails; on a CPU-only machine the same code runs. :class:`DefaultDeviceSpy` is a ``TorchFunctionMode`` that
sees every call of a torch factory (the functions ``torch.set_default_device`` redirects) and records, for each
one that names no device, where in ``src/netsurgeon`` it came from: ``direct`` when netsurgeon's own line called
the factory, ``via <torch file>`` when it went through torch code (``nn.Linear(...)`` built without a device, an
optimizer's state). A method that passes creates every tensor with ``device=`` (beside the weights or inputs it
works with, or ``"cpu"`` where the CPU is meant: a file's bytes, a generator's permutation).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import netsurgeon

SRC = os.path.dirname(os.path.abspath(netsurgeon.__file__)) + os.sep
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
CONSTRUCTORS = _device_constructors()


class DefaultDeviceSpy(TorchFunctionMode):
    """Records ``(site, how)`` -> calls for every factory call without ``device=`` (or with ``device=None``)
    reached from code under ``roots`` (default: ``src/netsurgeon``).

    ``site`` is ``file:line (function)`` of the innermost frame under a root (relative to the root's folder);
    ``how`` is ``direct`` or ``via torch/<file>:<function>`` (the torch frame the code called into, e.g. an
    ``nn.Linear`` built without a device). A call reached from elsewhere first (the test's own code, another
    library) is not recorded."""

    def __init__(self, roots: tuple[str, ...] = (SRC,)) -> None:
        super().__init__()
        self.roots = tuple(os.path.abspath(r) for r in roots)
        self.sites: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in CONSTRUCTORS and kwargs.get("device") is None:
            where = _site(self.roots)
            if where is not None:
                self.sites[where] += 1
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"  {site} [{how}] x{n}" for (site, how), n in sorted(self.sites.items()))


def _site(roots: tuple[str, ...]) -> tuple[str, str] | None:
    f = sys._getframe(2)  # the frame that called the factory (past __torch_function__ and _site)
    via = None
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        root = next((r for r in roots if path.startswith(r)), None)
        if root is not None:
            rel = os.path.relpath(path, os.path.dirname(root.rstrip(os.sep)))
            return f"{rel}:{f.f_lineno} ({f.f_code.co_name})", via or "direct"
        if path.startswith(TORCH):
            via = f"via torch/{os.path.relpath(path, TORCH)}:{f.f_code.co_name}"  # outermost torch frame
        elif path == __file__ or "contextlib" in path:
            pass
        else:
            return None  # the test's own code or another library
        f = f.f_back
    return None
