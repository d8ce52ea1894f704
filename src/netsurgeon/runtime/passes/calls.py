"""Pass ``calls``: the finished graph calls the functions of its plain torch layers directly (no
``nn.Module.__call__`` per layer), and a ReLU or a sum on a fresh tensor nothing else reads runs in place. Same
arithmetic, no timing needed."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import _call_counts

_FRESH = (torch.conv1d, torch.conv2d, torch._C._nn.linear, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d)
_ADDS = (operator.add, torch.add)


def _add_into(a: torch.Tensor, b: Any) -> torch.Tensor:
    """``a + b``, written into ``a`` where that gives the same tensor (same dtype, ``b`` broadcasts to ``a``'s
    shape): ``a`` is a fresh activation nothing else reads (:func:`_in_place`)."""
    if isinstance(a, torch.Tensor) and torch.result_type(a, b) == a.dtype and (
            not isinstance(b, torch.Tensor) or torch.broadcast_shapes(a.shape, b.shape) == a.shape):
        return a.add_(b)
    return a + b  # sizes, lists, a sum that broadcasts beyond ``a`` or promotes its dtype


# ops whose output is a new tensor; not a ReLU: its backward reads its output, so writing into that would break a
# gradient taken through the runtime form
_NEW_TENSOR = _FRESH + _ADDS + (_add_into,)


def _fresh(x: Any) -> bool:
    """``x`` is a tensor a graph op has just allocated and nothing but one node reads."""
    return (isinstance(x, fx.Node) and x.op == "call_function" and len(x.users) == 1 and x.target in _NEW_TENSOR
            and not (x.target in _ADDS and x.kwargs))  # torch.add(..., out=t) returns t


def _in_place(gm: fx.GraphModule) -> int:
    """Run functional ReLUs (``F.relu``, ``torch.relu``, ``.relu()``) and additions of two tensors in place
    where one input is fresh (:func:`_fresh`): a residual block's ``relu(conv(x) + shortcut)`` then allocates
    nothing. A new activation costs more than the pass itself at batch 256 (fresh pages; docs/runtime.md).
    Returns the number of nodes changed."""
    done = 0
    for node in list(gm.graph.nodes):
        a = node.args
        if node.op == "call_function" and node.target in (F.relu, torch.relu) and a and _fresh(a[0]) \
                and a[1:] in ((), (False,)) and node.kwargs in ({}, {"inplace": False}):
            node.target, node.args, node.kwargs, done = torch.relu_, a[:1], {}, done + 1
        elif node.op == "call_method" and node.target == "relu" and len(a) == 1 and not node.kwargs \
                and _fresh(a[0]):
            node.target, done = "relu_", done + 1
        elif node.op == "call_function" and node.target in _ADDS and len(a) == 2 and not node.kwargs \
                and (_fresh(a[0]) or _fresh(a[1])):
            node.target, node.args, done = _add_into, a if _fresh(a[0]) else (a[1], a[0]), done + 1
    return done


def _direct_calls(gm: fx.GraphModule) -> int:
    """Replace the calls of plain torch layers (Conv1d/2d, Linear, ReLU, ReLU6, GELU, max- and average-pooling,
    Flatten, Identity, Dropout in eval mode) by calls of their functions on the layers' own tensors, in place; a
    ReLU whose input is a fresh tensor read by nothing else runs in place (as does one built ``inplace=True``), and
    so do functional ReLUs and additions on such a tensor (:func:`_in_place`). Same arithmetic, no
    ``nn.Module.__call__`` per layer: at batch 1 that call is a large part of a small layer's time
    (docs/runtime.md). Layers with hooks or called more than once keep their call. Returns the number of calls
    replaced."""
    calls = _call_counts(gm.graph)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or calls[str(node.target)] != 1:
            continue
        m = gm.get_submodule(str(node.target))
        if m._forward_hooks or m._forward_pre_hooks:
            continue
        with gm.graph.inserting_before(node):
            new = _function_call(gm.graph, str(node.target), m, node.args[0])
        if new is not None:
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done += 1
    done += _in_place(gm)
    gm.recompile()
    return done


def _function_call(g: fx.Graph, name: str, m: nn.Module, x: Any) -> Any:
    """The node computing layer ``m`` (called ``name`` in ``g``) on ``x`` by its function; None for a layer
    that keeps its call."""
    def attr(field: str) -> fx.Node | None:
        return None if getattr(m, field) is None else g.get_attr(f"{name}.{field}")

    t = type(m)
    if t in (nn.Conv1d, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        fn = torch.conv1d if t is nn.Conv1d else torch.conv2d
        return g.call_function(fn, (x, attr("weight"), attr("bias"), m.stride, m.padding, m.dilation, m.groups))
    if t is nn.Linear:
        return g.call_function(torch._C._nn.linear, (x, attr("weight"), attr("bias")))
    if t is nn.ReLU:  # an in-place ReLU stays in place: what else reads its input sees the change
        return g.call_function(torch.relu_ if m.inplace or _fresh(x) else torch.relu, (x,))
    if t is nn.MaxPool2d and not m.return_indices:
        return g.call_function(F.max_pool2d, (x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode))
    if t is nn.AvgPool2d:
        return g.call_function(F.avg_pool2d, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                              m.count_include_pad, m.divisor_override))
    if t is nn.AdaptiveAvgPool2d:
        return g.call_function(F.adaptive_avg_pool2d, (x, m.output_size))
    if t is nn.Flatten:
        return g.call_function(torch.flatten, (x, m.start_dim, m.end_dim))
    if t is nn.GELU:
        return g.call_function(F.gelu, (x,), {"approximate": m.approximate})
    if t is nn.ReLU6 and not m.inplace:
        return g.call_function(F.relu6, (x,))
    if t in (nn.Identity, nn.Dropout) and not m.training:
        return x
    return None
