"""The torch.fx machinery the passes share: tracing (Linear and the runtime's own layers stay leaves), making
parametrized weights plain, replacing a run of nodes by one module, and tidying the finished graph."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.utils import parametrize

from ...kernels.modules import BinaryChain, FusedLinearChain, Int8Chain, SignLutLinear, _Xnor
from ..plan import RuntimePlan


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Linear, _Xnor, SignLutLinear, BinaryChain)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> tuple[nn.Module, bool]:
    """``model`` as a GraphModule and True, or ``model`` itself and False if fx cannot trace it."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model)), True
    except Exception:  # noqa: BLE001 - any model fx cannot trace keeps its own forward
        return model, False


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each submodule (a layer called twice is shared: it keeps its own call)."""
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    return calls


def _materialize(m: nn.Module) -> None:
    """Turn ``m``'s parametrized tensors into plain parameters holding their current values.

    Not ``parametrize.remove_parametrizations``: that edits the parametrized *class*, which a deep copy shares
    with the original model, so the caller's model would lose its weights.
    """
    values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
    del m._modules["parametrizations"]
    m.__class__ = m.__class__.__bases__[0]  # parametrize made the class ParametrizedX(X)
    for name, v in values.items():
        m._parameters[name] = nn.Parameter(v, requires_grad=False)


def _materialize_all(net: nn.Module) -> None:
    """Make every parametrized tensor of ``net`` plain, in place: masks and codebooks applied once, here."""
    for m in list(net.modules()):
        if parametrize.is_parametrized(m):
            _materialize(m)


def _replace_run(gm: fx.GraphModule, run: list[tuple[fx.Node, fx.Node | None]], fast: nn.Module,
                 name: str) -> None:
    _replace_nodes(gm, [n for pair in run for n in pair if n is not None], run[-1][1] or run[-1][0], fast, name)


def _replace_nodes(gm: fx.GraphModule, nodes: list[fx.Node], last: fx.Node, fast: nn.Module, name: str) -> None:
    """Replace ``nodes`` (in graph order; ``last`` gives the output) by one call of ``fast``; a chain module
    absorbs an ``nn.Flatten`` feeding it alone (one module call less at batch 1)."""
    gm.add_submodule(name, fast)
    first = nodes[0]
    args, flatten = first.args, None
    src = args[0] if len(args) == 1 and not first.kwargs else None
    if isinstance(fast, (FusedLinearChain, Int8Chain, BinaryChain)) and isinstance(src, fx.Node) \
            and src.op == "call_module" and len(src.users) == 1:
        mod = gm.get_submodule(str(src.target))
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            fast.flatten, flatten, args = True, src, src.args
    with gm.graph.inserting_before(first):
        new = gm.graph.call_module(name, args=args, kwargs=first.kwargs)
    last.replace_all_uses_with(new)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    if flatten is not None:
        gm.graph.erase_node(flatten)


def _sole_module(gm: fx.GraphModule) -> nn.Module:
    """The one module a graph ``input -> module -> output`` calls, else the graph: at batch 1 the graph's own
    call costs ~4 us, as much as a fused LeNet-300-100 computes."""
    nodes = list(gm.graph.nodes)
    if len(nodes) == 3 and [n.op for n in nodes] == ["placeholder", "call_module", "output"] \
            and nodes[1].args == (nodes[0],) and not nodes[1].kwargs and nodes[2].args == (nodes[1],):
        return gm.get_submodule(str(nodes[1].target))
    return gm


def _finish_graph(gm: nn.Module, model: nn.Module, plan: RuntimePlan, traced: bool, direct: int) -> nn.Module:
    """The traced graph ``gm`` checked, recompiled and stripped of unused layers (:func:`_sole_module`); the
    model itself where no pass replaced anything (a GraphModule's own call costs ~4 us at batch 1)."""
    if not traced:
        return gm
    if not direct and all(r.form == "dense" for r in plan.runs):
        return model
    gm.graph.lint()  # type: ignore[union-attr]
    gm.recompile()  # type: ignore[operator]
    gm.delete_all_unused_submodules()  # type: ignore[operator]
    return _sole_module(gm)  # type: ignore[arg-type]
