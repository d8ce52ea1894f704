"""Pass ``pack``, at a batch of 2 or more: the convolutional part of the model runs on G samples at once laid
side by side along the channel axis, each convolution grouped G times over copies of its weights
(:func:`_packed`): a layer left with 8 channels by pruning then fills oneDNN's 16-channel blocks (8 -> 8
channels over 28x28, batch 256: 1.9 vs 2.4 ms). Timed against the finished model; the fastest of G = 1, 2, 4 is
kept.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ...kernels.modules import ChannelsLast, ColumnConv2d, StridedMaxPool2d
from ..plan import RuntimePlan
from .calls import _direct_calls
from .graph import _call_counts
from .timing import _pick_whole

_PACKS = (2, 4)  # samples per packed group the ``pack`` step tries
PACK_STEP = "(whole model) samples packed into channels"  # the plan's label of the ``pack`` step


def _pack_candidates(gm: fx.GraphModule, batch: int, last: bool, calls: bool) -> dict[str, fx.GraphModule]:
    """The packed forms of ``gm`` (:func:`_packed`) for each group size the batch allows, finished as ``gm``
    will be (``calls``: with direct calls)."""
    packs = {f"pack{g}": p for g in _PACKS if batch >= g and (p := _packed(gm, g, last)) is not None}
    for p in packs.values():
        if calls:
            _direct_calls(p)
        p.graph.lint()
        p.recompile()
        p.delete_all_unused_submodules()
    return packs


def _choose_pack(net: nn.Module, packs: dict[str, fx.GraphModule], last: bool, x: torch.Tensor | None,
                 ref: torch.Tensor | None, repeats: int, plan: RuntimePlan, slack: float) -> nn.Module:
    """The fastest of the finished model ``net`` and its packed forms (in channels-last order if ``last``)."""
    if not packs:
        return net
    cands = {"dense": net} | {k: ChannelsLast(p) if last else p for k, p in packs.items()}
    return cands[_pick_whole(cands, x, ref, repeats, plan, PACK_STEP, slack)]  # type: ignore[arg-type]


_PER_SAMPLE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
                       nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, StridedMaxPool2d)
_PER_SAMPLE_FUNCTIONS = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.relu,
                         torch.relu_, F.relu, torch.sigmoid, torch.tanh, F.max_pool2d, F.avg_pool2d,
                         F.adaptive_avg_pool2d}
_PER_SAMPLE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_", "sub", "contiguous"}


def _pack_batch(x: torch.Tensor, g: int, last: bool) -> torch.Tensor:
    """``(B, C, H, W) -> (B/g, g·C, H, W)``: each group of ``g`` samples side by side along the channel axis (a
    batch that ``g`` does not divide is padded with zero samples)."""
    if x.shape[0] % g:
        x = torch.cat([x, x.new_zeros((g - x.shape[0] % g, *x.shape[1:]))])
    x = x.reshape(x.shape[0] // g, g * x.shape[1], *x.shape[2:])
    return x.contiguous(memory_format=torch.channels_last) if last and x.dim() == 4 else x


def _unpack_batch(y: torch.Tensor, g: int, x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pack_batch` for a packed activation ``y`` of the input ``x``."""
    y = y.reshape(y.shape[0] * g, y.shape[1] // g, *y.shape[2:])
    return y[:x.shape[0]] if y.shape[0] != x.shape[0] else y


def _packed(gm: fx.GraphModule, g: int, last: bool) -> fx.GraphModule | None:
    """A copy of ``gm`` whose convolutional part runs on ``g`` samples at once, laid side by side along the
    channel axis: the input is packed ``(B, C, H, W) -> (B/g, g·C, H, W)``; a plain Conv2d becomes the same
    convolution with ``g`` times its groups over ``g`` copies of its weights (sample i of a group reads channels
    i·C..(i+1)·C-1 and writes its own block of outputs), a BatchNorm2d gets ``g`` copies of its statistics, and
    what works per sample and per channel (activations, pooling, adds of two packed tensors) runs unchanged; the
    first op outside that set reads the activation unpacked again, as does the output. Same arithmetic per sample.
    None if nothing would run packed (no convolution)."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    x = inputs[0]
    calls = _call_counts(graph)
    with graph.inserting_after(x):
        px = graph.call_function(_pack_batch, (x, g, last))
    x.replace_all_uses_with(px, delete_user_cb=lambda user: user is not px)
    packed, unpacked, convs = {px}, {}, 0

    def unpack(n: fx.Node) -> fx.Node:
        if n not in unpacked:
            with graph.inserting_after(n):
                unpacked[n] = graph.call_function(_unpack_batch, (n, g, x))
        return unpacked[n]

    for node in list(graph.nodes):
        ins = node.all_input_nodes
        if node is px or not any(a in packed for a in ins):
            continue
        if node.op != "output" and all(a in packed for a in ins):
            kind = _pack_node(gm, node, g, calls)
            if kind:
                packed.add(node)
                convs += kind == "conv"
                continue
        node.args = fx.map_arg(node.args, lambda a: unpack(a) if a in packed else a)
        node.kwargs = fx.map_arg(node.kwargs, lambda a: unpack(a) if a in packed else a)
    if not convs:
        return None
    gm.recompile()
    return gm


def _pack_node(gm: fx.GraphModule, node: fx.Node, g: int, calls: dict[str, int]) -> str:
    """Make ``node`` run on packed input (see :func:`_packed`): "conv" for a convolution made grouped, "same"
    for a node that runs unchanged or with repeated per-channel tensors, "" for a node that needs its input
    unpacked."""
    if node.op == "call_function":
        return "same" if node.target in _PER_SAMPLE_FUNCTIONS else ""
    if node.op == "call_method":
        return "same" if node.target in _PER_SAMPLE_METHODS else ""
    if node.op != "call_module":
        return ""
    m = gm.get_submodule(str(node.target))
    if m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m):
        return ""
    if type(m) in _PER_SAMPLE_MODULES:
        return "" if getattr(m, "return_indices", False) or (isinstance(m, nn.Dropout) and m.training) else "same"
    if calls[str(node.target)] != 1:
        return ""
    if type(m) is ColumnConv2d and m.keep.numel() >= 0.9 * m.total_columns:  # it skips little: the direct
        m = m.to_conv2d()  # convolution, packed, may be the faster; the whole-model timing decides
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        conv = nn.Conv2d(g * m.in_channels, g * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         g * m.groups, m.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(m.weight.detach().repeat(g, 1, 1, 1))
            if m.bias is not None:
                conv.bias.copy_(m.bias.detach().repeat(g))
        gm.set_submodule(str(node.target), conv.eval().requires_grad_(False))
        return "conv"
    if type(m) is nn.BatchNorm2d and not m.training and m.running_mean is not None:
        bn = nn.BatchNorm2d(g * m.num_features, m.eps, affine=m.affine)
        with torch.no_grad():
            for name in ("running_mean", "running_var") + (("weight", "bias") if m.affine else ()):
                getattr(bn, name).copy_(getattr(m, name).detach().repeat(g))
        gm.set_submodule(str(node.target), bn.eval().requires_grad_(False))
        return "same"
    return ""
