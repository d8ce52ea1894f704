"""Dependency-aware removal of whole channels (structured pruning's surgery), traced with torch.fx.

A *channel group* is a set of tensor slices that must be removed together: the output channels (rows) of the
layers that produce a feature map, every per-channel parameter on its way (BatchNorm, depthwise convolutions),
and the input columns of the layers that consume it, including a Linear layer after a flatten (one block of
H·W columns per channel; a BatchNorm1d there holds H·W features per channel). A residual add ties the groups of
its inputs into one. A concatenation along the channel axis keeps its inputs' groups apart: a layer after it
reads each group's channels at that input's offset (``ChannelGroup.spans``). A concatenation of flattened
tensors (a Conv2d branch and a Conv1d branch, each flattened, then one Linear) does the same along the
features: each group's channels are a block of columns at its input's offset, each channel as many columns as
its own branch's spatial size. A group whose feature map reaches anything else (the model's output, a
concatenation along another axis, a reshape other than flatten, an op this module does not know) cannot be
shrunk, and :func:`channel_groups` says which op stops it.

A Linear layer applied to tokens (B, T, d) has its channels on the *last* axis: elementwise ops pass them, a Linear
reads them as its columns, and everything that works along axis 1 or the spatial axes (pooling, BatchNorm,
convolutions, flatten, concatenation) blocks them; so a transformer MLP's hidden neurons form a group while its
residual stream (which meets LayerNorm, attention and the embedding) stays blocked. An elementwise product of two
spaces ties them like an add (a gated MLP). A parameter with one value per channel that scales (or shifts) a space, a
ConvNeXt-style layer scale of shape (C,) or (C, 1, 1), follows the channels as a ``scale`` member.

:func:`remove_channels` then slices every member in place: the model stays the same ``nn.Module`` with smaller
layers, and ``models.resized_record`` lists the new sizes so a ``.nsz`` file can rebuild it without pickle.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..stats import example_input

__all__ = ["ChannelGroup", "channel_groups", "remove_channels"]

_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
                 nn.Dropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.elu,
                   F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
# of those, the ones that act on each entry alone (no pooling): they also pass channels that lie on the last axis
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
                        nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.elu,
                          F.dropout}
_ADD = {operator.add, torch.add, operator.iadd}
_MUL = {operator.mul, torch.mul, operator.imul}


@dataclass
class ChannelGroup:
    """One removable set of channels. ``members``: (module name, role, flat factor) with role ``out`` (rows of
    a producer), ``in`` (columns of a consumer; a flatten makes each channel ``factor`` columns), ``bn`` or
    ``dw`` (a per-channel module on the way; a BatchNorm1d after a flatten holds ``factor`` features per
    channel), or ``scale`` (a per-channel *parameter*, named by its full name, sliced along
    ``param_dims[name]``). ``blocked``: why the group cannot shrink (empty if it can). ``spans``: for a member after a
    concatenation, (offset, total) along the axis it reads, in its own units: channels for a convolution or
    BatchNorm2d, columns (features) for a Linear or BatchNorm1d after a flatten."""

    size: int
    members: list[tuple[str, str, int]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # member after a torch.cat: (offset, total)
    param_dims: dict[str, int] = field(default_factory=dict)  # a ``scale`` member (a parameter): its channel axis

    def offset(self, name: str) -> int:
        """Where this group's channels (or their columns) start in member ``name``'s axis."""
        return self.spans.get(name, (0, 0))[0]

    @property
    def producers(self) -> list[str]:
        return [n for n, role, _ in self.members if role == "out"]

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers)

    def channels(self, name: str, t: Tensor, factor: int = 1) -> Tensor:
        """This group's channels of member ``name``'s tensor ``t`` as a view: a per-channel tensor (a BatchNorm
        scale: (channel,), or (channel, factor) after a flatten) or a consumer's weight (channel, rows, columns
        per channel), at the member's offset where a concatenation put this group's channels after others."""
        off = self.offset(name)
        if t.dim() == 1:
            part = t.narrow(0, off, self.size * factor)
            return part if factor == 1 else part.view(self.size, factor)
        if t.dim() == 2:  # a Linear: the offset and the block are columns
            return t.narrow(1, off, self.size * factor).unflatten(1, (self.size, factor)).transpose(0, 1)
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1).narrow(0, off, self.size)


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True  # a buffer sliced by the input's length (a causal mask) traces like a parameter

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_CONV, nn.Linear, *_BN)) or super().is_leaf_module(m, qualname)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def channel_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[ChannelGroup]:
    """The channel groups of ``model`` for inputs of ``input_shape`` (one sample, no batch dimension)."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # noqa: BLE001 - any tracing failure is one clear error
        raise ValueError(f"channel_groups: torch.fx cannot trace the model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); structured removal needs a traceable forward.") from e
    was = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input(model, tuple(input_shape), 2, torch.Generator().manual_seed(0)))
    model.train(was)
    parent: list[int] = []
    groups: list[ChannelGroup] = []

    def new(size: int) -> int:
        parent.append(len(parent))
        groups.append(ChannelGroup(size))
        return len(parent) - 1

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> int:
        a, b = find(a), find(b)
        if a != b:
            parent[b] = a
            groups[a].members += groups[b].members
            groups[a].blocked += groups[b].blocked
            if set(groups[a].spans) & set(groups[b].spans):
                groups[a].blocked.append("an add that ties two channel sets one concatenation keeps apart")
            groups[a].spans.update(groups[b].spans)
            groups[a].param_dims.update(groups[b].param_dims)
            if groups[a].size != groups[b].size:
                groups[a].blocked.append("an add of feature maps with different channel counts")
        return a

    # node -> the segments of its axis 1: (group, offset, columns per channel); one segment except after a
    # torch.cat, whose consumers read each input's channels at that input's offset. Before a flatten the offset
    # counts channels and each channel is one entry (factor 1); after it, columns, each channel ``factor`` of them.
    space: dict[fx.Node, list[tuple[int, int, int]]] = {}
    flat: set[fx.Node] = set()    # nodes after a flatten

    def block(n: fx.Node, why: str) -> None:
        for g, _, _ in space.get(n, []):
            groups[find(g)].blocked.append(why)

    def join(n: fx.Node, name: str, role: str) -> None:
        """``name`` reads (or, per channel, transforms) ``n``'s channels: a member of each of its groups."""
        segs = space[n]
        total = int(n.meta["tensor_meta"].shape[1])  # every entry of a concatenation is in a segment
        for g, off, factor in segs:
            grp = groups[find(g)]
            grp.members.append((name, role, factor))
            if len(segs) > 1:
                grp.spans[name] = (off, total)

    last: set[fx.Node] = set()    # nodes whose channels are their last axis (a Linear's output on a 3-d+ input)
    scales: dict[str, int] = {}    # a per-channel parameter (layer scale) -> the group it follows

    def carry(node: fx.Node, src: fx.Node | None) -> None:
        """An elementwise op: the output has its input's channels, on the same axis."""
        _pass(node, src, space, flat)
        if src in last and node in space:
            last.add(node)

    def along_last(src: fx.Node | None, what: str) -> bool:
        """An op that works on axis 1 or the spatial axes cannot take channels that lie on the last axis."""
        if src in last:
            block(src, f"{what} (on a tensor whose channels are its last axis)")
            return True
        return False

    def ndim(n: fx.Node) -> int:
        meta = n.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else -1

    def tied(a: fx.Node, b: fx.Node) -> bool:
        """Two tensors combined elementwise whose channels line up (one segment each, same axis and layout)."""
        return len(space.get(a, [])) == 1 and len(space.get(b, [])) == 1 and (a in flat) == (b in flat) \
            and (a in last) == (b in last) and ndim(a) == ndim(b) and space[a][0][2] == space[b][0][2]

    def scale(node: fx.Node) -> bool:
        """``x * p`` or ``x + p`` with ``p`` a parameter holding one value per channel of ``x`` (a ConvNeXt-style
        layer scale, (C,) or (C, 1, 1)): the output keeps the channels and ``p`` follows them (role ``scale``)."""
        if len(node.args) != 2 or node.kwargs:
            return False
        a, b = node.args
        x, p = (a, b) if isinstance(b, fx.Node) and b.op == "get_attr" else (b, a)
        if not (isinstance(x, fx.Node) and isinstance(p, fx.Node) and p.op == "get_attr" and x in space) \
                or x in flat or len(space[x]) != 1:
            return False
        try:
            param = model.get_parameter(str(p.target))
        except AttributeError:
            return False
        xs, ps, out = x.meta["tensor_meta"].shape, tuple(param.shape), node.meta.get("tensor_meta")
        if out is None or tuple(out.shape) != tuple(xs) or len(ps) > len(xs):
            return False
        ch = len(xs) - 1 if x in last else 1
        lead = len(xs) - len(ps)
        if any(d != 1 for i, d in enumerate(ps) if lead + i != ch):
            return False
        carry(node, x)
        if ch < lead or ps[ch - lead] != xs[ch]:  # one value for all channels: nothing follows
            return True
        name = str(p.target)
        g = space[x][0][0]
        if name in scales or len(p.users) != 1:  # used elsewhere too: cutting it here would break the other use
            why = f"{name} (a per-channel parameter used by more than one op)"
            block(x, why)
            if name in scales:
                groups[find(scales[name])].blocked.append(why)
            return True
        scales[name] = g
        groups[find(g)].members.append((name, "scale", 1))
        groups[find(g)].param_dims[name] = ch - lead
        return True

    for node in gm.graph.nodes:
        args = list(node.all_input_nodes)  # nested ones too (torch.cat's list)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            name = str(node.target)
            if isinstance(m, nn.Linear) or (isinstance(m, _CONV) and m.groups == 1):
                if src in space and not (isinstance(m, _CONV) and along_last(src, f"{name} (a convolution)")):
                    join(src, name, "in")
                    if src not in flat and src not in last and isinstance(m, nn.Linear) and ndim(src) != 2:
                        block(src, f"{name} (a Linear on a {ndim(src)}-d input reads its last axis, not the "
                                   "channels)")
                out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
                g = new(out)
                space[node] = [(g, 0, 1)]
                groups[g].members.append((name, "out", 1))
                if isinstance(m, nn.Linear) and ndim(node) >= 3:  # (B, T, features): channels on the last axis
                    last.add(node)
            elif _is_depthwise(m) or isinstance(m, _BN):
                if src in space and not along_last(src, f"{name} ({type(m).__name__})"):
                    _pass(node, src, space, flat)
                    join(src, name, "dw" if isinstance(m, _CONV) else "bn")
            elif isinstance(m, _CONV):  # grouped, not depthwise: channel sets would have to stay per group
                if src is not None:
                    block(src, f"{name} (a grouped convolution)")
                g = new(m.out_channels)
                space[node] = [(g, 0, 1)]
                groups[g].blocked.append(f"{name} (a grouped convolution)")
            elif isinstance(m, nn.Flatten):
                if not along_last(src, f"{name} (Flatten)"):
                    _pass_flatten(node, src, space, flat, block)
            elif isinstance(m, _ELEMENTWISE_MODULES):
                carry(node, src)
            elif isinstance(m, _PASS_MODULES):  # pooling: along the spatial axes
                if not along_last(src, f"{name} ({type(m).__name__})"):
                    _pass(node, src, space, flat)
            else:
                for a in args:
                    block(a, f"{name} ({type(m).__name__})")
        elif node.op == "call_function":
            if node.target in _ADD and len(args) == 2 and tied(args[0], args[1]):
                space[node] = [(union(space[args[0]][0][0], space[args[1]][0][0]), 0, space[args[0]][0][2])]
                if args[0] in flat:
                    flat.add(node)
                if args[0] in last:
                    last.add(node)
            elif node.target in _MUL and len(args) == 2 and len(node.args) == 2 and tied(args[0], args[1]):
                # an elementwise product of two channel sets (a gated MLP): channel i of one meets channel i of the
                # other, so they go together
                space[node] = [(union(space[args[0]][0][0], space[args[1]][0][0]), 0, 1)]
                if args[0] in last:
                    last.add(node)
            elif node.target in _ADD | _MUL and scale(node):
                pass
            elif node.target is torch.cat:
                if not any(along_last(a, "torch.cat") for a in args):
                    _concat(node, space, flat, block)
            elif node.target is torch.flatten and node.args[1:] in ((1,), ()) and not node.kwargs:
                if not along_last(src, "torch.flatten"):
                    _pass_flatten(node, src, space, flat, block)
            elif node.target in _PASS_FUNCTIONS:
                if node.target in _ELEMENTWISE_FUNCTIONS:
                    carry(node, src)
                elif not along_last(src, f"{getattr(node.target, '__name__', node.target)}"):
                    _pass(node, src, space, flat)
                for a in args[1:]:
                    block(a, f"{getattr(node.target, '__name__', node.target)}")
            else:
                for a in args:
                    block(a, f"{getattr(node.target, '__name__', str(node.target))}")
        elif node.op == "call_method":
            if node.target in _PASS_METHODS:
                carry(node, src)
            elif node.target in ("view", "reshape", "flatten") and src in space and _is_flatten(node) \
                    and not along_last(src, f"the tensor method .{node.target}()"):
                _pass_flatten(node, src, space, flat, block)
            else:
                for a in args:
                    block(a, f"the tensor method .{node.target}()")
        elif node.op == "output":
            for a in args:
                block(a, "the model's output")
    roots = sorted({find(i) for i in range(len(parent))})
    out = []
    for r in roots:
        g = groups[r]
        g.blocked = sorted(set(g.blocked))
        out.append(g)
    return out


def _concat(node: fx.Node, space, flat, block) -> None:
    """torch.cat along axis 1: the output's channels are its inputs' segments one after another, each group
    keeping its own channels (a consumer reads each at its offset). Of flattened tensors (2-d), the segments are
    blocks of columns, each channel as many columns as its own input had per channel. Along any other axis, of a
    tensor outside every group, or of one group twice: the groups are blocked."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    inputs = list(node.all_input_nodes)
    meta = node.meta.get("tensor_meta")
    ndim = len(meta.shape) if meta is not None else 0
    ok = isinstance(parts, (list, tuple)) and all(isinstance(p, fx.Node) for p in parts) and ndim >= 2 \
        and isinstance(dim, int) and dim % ndim == 1 and all(p in space for p in parts)
    segs: list[tuple[int, int, int]] = []
    if ok:
        off = 0
        for p in parts:
            segs += [(g, off + o, f) for g, o, f in space[p]]
            off += int(p.meta["tensor_meta"].shape[1])
        ok = len({g for g, _, _ in segs}) == len(segs)
    if not ok:
        for a in inputs:
            block(a, f"torch.cat (along dim {dim}, or of a tensor whose channels cannot all be tracked)")
        return
    space[node] = segs
    if any(p in flat for p in parts):
        flat.add(node)


def _is_flatten(node: fx.Node) -> bool:
    shape = node.meta.get("tensor_meta")
    return shape is not None and len(shape.shape) == 2


def _pass(node: fx.Node, src, space, flat) -> None:
    if src in space:
        space[node] = space[src]
        if src in flat:
            flat.add(node)


def _pass_flatten(node: fx.Node, src, space, flat, block) -> None:
    if src not in space:
        return
    if src in flat:
        _pass(node, src, space, flat)
        return
    shape = src.meta["tensor_meta"].shape  # (batch, channels, *spatial)
    per = 1
    for d in shape[2:]:
        per *= int(d)
    space[node] = [(g, off * per, per) for g, off, _ in space[src]]  # channel c -> columns [c·per, (c+1)·per)
    flat.add(node)


@torch.no_grad()
def remove_channels(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, Tensor]) -> None:
    """Keep only channels ``keep[i]`` (sorted indices) of ``groups[i]``, slicing every member in place."""
    chosen: dict[int, Tensor] = {}
    for i, idx in keep.items():
        g = groups[i]
        if not g.prunable:
            raise ValueError(f"remove_channels: group {i} cannot shrink: {', '.join(g.blocked)}.")
        idx = torch.as_tensor(idx, dtype=torch.long, device="cpu").sort().values  # indices on the host: moved per slice
        if idx.numel() == 0 or int(idx.max()) >= g.size or int(idx.min()) < 0:
            raise ValueError(f"remove_channels: group {i} keeps {idx.numel()} of {g.size} channels; it must keep "
                             "at least one, with indices below its size.")
        chosen[i] = idx
    # every module's channel axis as segments (offset, group, entries per channel): one segment, or one per
    # input of a torch.cat; a segment whose group keeps everything keeps all of its channels
    layout: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for i, g in enumerate(groups):
        for name, role, factor in g.members:
            layout.setdefault((name, "cols" if role == "in" else "rows"), []).append((g.offset(name), i, factor))
    rows: dict[str, Tensor] = {}
    cols: dict[str, Tensor] = {}
    for (name, axis), segs in layout.items():
        if not any(i in chosen for _, i, _ in segs):
            continue
        parts = []
        for off, i, factor in sorted(segs):
            chans = chosen.get(i, torch.arange(groups[i].size, device="cpu"))
            parts.append(off + ((chans[:, None] * factor + torch.arange(factor, device="cpu")).reshape(-1)
                                if factor > 1 else chans))
        (cols if axis == "cols" else rows)[name] = torch.cat(parts)
    dims = {n: d for g in groups for n, d in g.param_dims.items()}
    for name in set(rows) | set(cols):
        if name in dims:  # a per-channel parameter (layer scale): sliced along its channel axis
            p = model.get_parameter(name)
            p.data = p.data.index_select(dims[name], rows[name].to(p.device)).contiguous()
            continue
        _slice(model.get_submodule(name), rows.get(name), cols.get(name))


def _slice(m: nn.Module, r: Tensor | None, c: Tensor | None) -> None:
    def param(t: Tensor | None, dim: int, idx: Tensor | None) -> None:
        if t is None or idx is None:
            return
        t.data = t.data.index_select(dim, idx).contiguous()

    if isinstance(m, _BN):
        for t in (m.weight, m.bias, m.running_mean, m.running_var):
            param(t, 0, r)
        m.num_features = m.running_mean.numel() if m.running_mean is not None else m.weight.numel()
        return
    param(m.weight, 0, r)
    param(m.bias, 0, r)
    if isinstance(m, nn.Linear):
        param(m.weight, 1, c)
        m.out_features, m.in_features = m.weight.shape
        return
    if _is_depthwise(m):  # one filter per channel: rows only, and its groups follow
        m.out_channels = m.in_channels = m.groups = m.weight.shape[0]
        return
    param(m.weight, 1, c)
    m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
