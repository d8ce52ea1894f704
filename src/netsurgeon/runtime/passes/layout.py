"""Pass ``layout``, for a model with convolutions and a recorded input shape: first the model in its own memory
order timed against channels-last order (:class:`ChannelsLast`), before the column and pooling swaps, which are
then timed in the order chosen; last, the finished model against itself on cache-sized slices of the batch
(:class:`BatchChunks`). A candidate whose output differs from the model's is dropped, and a finished
channels-last model that differs is compiled again without ``layout`` (the driver's last check).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ...kernels.modules import BatchChunks, ChannelsLast, XnorConv2d
from ...stats import example_input
from ..plan import RuntimePlan
from .fold import _fold_batchnorm
from .graph import _materialize_all
from .timing import _pick_whole

_CHUNKS = (16, 32, 64)  # slice sizes the ``layout`` step tries at larger batches


def _whole_input(net: nn.Module, probe: nn.Module, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A random input of ``batch`` samples at ``probe``'s recorded (C, H, W) input shape and ``net``'s output on
    it, for a model with convolutions whose output is one tensor of ``batch`` rows; else (None, None): the layout
    steps do not apply."""
    from ...models import arch_of

    shape = (arch_of(probe) or {}).get("input_shape")
    if not shape or len(shape) != 3 or not any(isinstance(m, (nn.Conv2d, XnorConv2d)) for m in net.modules()):
        return None, None
    x = example_input(probe, tuple(shape), batch, torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            out = net(x)
    except Exception:  # noqa: BLE001 - a model that does not run on its recorded shape keeps its layout
        return None, None
    return (x, out) if isinstance(out, torch.Tensor) and out.shape[:1] == (batch,) else (None, None)


def _channels_last_pays(gm: nn.Module, x: torch.Tensor, ref: torch.Tensor, repeats: int, plan: RuntimePlan,
                        fold: bool) -> bool:
    """Whether the whole model runs faster in channels-last order, timed before the per-layer choices (which are
    then timed in the order chosen), on a copy with plain weights (and BatchNorm folded, as it will be)."""
    trial = copy.deepcopy(gm).eval()
    _materialize_all(trial)
    if fold and isinstance(trial, fx.GraphModule):
        _fold_batchnorm(trial, None)
    cands = {"dense": trial, "channels_last": ChannelsLast(copy.deepcopy(trial))}
    return _pick_whole(cands, x, ref, repeats, plan, "(whole model) memory order") == "channels_last"


def _slack(net: nn.Module, x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """How far the whole-model forms may differ from ``ref``: int8 kernels, say, are close to the float model,
    not equal to it: the memory order and the slicing may differ from it by twice what the finished model's
    kernels do (0 without a whole-model input ``x``)."""
    if x is None:
        return 0.0
    with torch.inference_mode():
        return 2 * float((net.eval()(x) - ref).abs().max())


def _choose_chunks(net: nn.Module, x: torch.Tensor, ref: torch.Tensor, repeats: int, plan: RuntimePlan,
                   slack: float) -> nn.Module:
    """``net`` as it is or on slices of the batch (:class:`BatchChunks`), whichever is fastest at ``x``'s batch."""
    cands: dict[str, nn.Module] = {"dense": net}
    cands.update({f"chunks{n}": BatchChunks(net, n) for n in _CHUNKS if n < x.shape[0]})
    return cands[_pick_whole(cands, x, ref, repeats, plan, "(whole model) batch slices", slack)]
