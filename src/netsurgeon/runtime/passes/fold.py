"""Pass ``fold``: every eval-mode BatchNorm folded into the Conv or Linear layer that alone feeds it (one pass
over the activations less; no timing needed). It runs twice: before the per-layer swaps (convolutions) and
after the runs of Linear layers are chosen (what is left)."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..plan import RunChoice, RuntimePlan
from .graph import _call_counts, _materialize


def _fold_batchnorm(gm: fx.GraphModule, plan: RuntimePlan | None, convs_too: bool = False) -> None:
    """Fold each BatchNorm (running statistics) into the Conv or Linear layer whose output only it reads, in
    place: ``W·γ/σ`` and ``(b - μ)·γ/σ + β`` (``torch.nn.utils.fusion``); zero weights stay zero, and the graph is
    recompiled. Layers with parametrized weights are skipped, except convolutions when ``convs_too`` (their
    weights are made plain first, as the finished runtime form holds them anyway): the first pass runs before the
    per-layer swaps, so a convolution swapped for its column form carries its BatchNorm; the last pass, on plain
    weights, takes what is left (a pruned or shared Linear layer, whose stored form its run needed)."""
    pairs = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))
    calls = _call_counts(gm.graph)
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1 \
                or calls[str(src.target)] != 1 or calls[str(node.target)] != 1:
            continue
        layer, bn = gm.get_submodule(str(src.target)), gm.get_submodule(str(node.target))
        held = parametrize.is_parametrized(layer)
        kind = type(layer).__bases__[0] if held else type(layer)  # parametrize made the class ParametrizedX(X)
        if not any(kind is a and type(bn) is b for a, b in pairs) or bn.running_mean is None \
                or any(h for m in (layer, bn) for h in (m._forward_hooks, m._forward_pre_hooks)) \
                or (held and not (convs_too and kind is not nn.Linear)):
            continue
        if held:
            _materialize(layer)
        fused = fuse_linear_bn_eval(layer, bn) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, bn)
        gm.set_submodule(str(src.target), fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        if plan is not None:
            plan.runs.append(RunChoice([str(src.target), str(node.target)], "fold", "float",
                                       float((layer.weight != 0).float().mean())))
    gm.recompile()
