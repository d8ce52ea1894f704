"""Pass ``xnor``: binary layers whose input is binarized too (BNN, XNOR-Net; ``quantization/binary.py``).

A run of such Linear layers (each one's output, after its BatchNorm and sign-keeping activation, read only by the
next, which binarizes it) is timed as one :class:`BinaryChain` against its modules; each other binary-input
layer is timed on its own against its dense form: ``xnor`` packs the input's signs and multiplies by XNOR +
popcount (bitops.py). A binary convolution needs its input size, taken from one probe run at the model's
recorded input shape. (A run of binary-weight layers with real inputs gets ``lut`` in the ``linear`` pass.)
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ...forms.binary import binary_parts
from ...kernels.modules import BinaryChain, XnorConv2d, XnorLinear
from ..plan import RunChoice, RuntimePlan
from .graph import _materialize, _replace_nodes
from .timing import _input_shapes, _time


def _binary_parts(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    return binary_parts(m)


def _binary_chains(gm: fx.GraphModule) -> list[list[tuple[fx.Node, fx.Node | None, fx.Node | None]]]:
    """Runs of BNN units [(binary Linear, BatchNorm1d or None, HardTanh or None), ...]: each unit's output (after
    its BatchNorm and sign-keeping activation) is used only by the next unit's Linear, which binarizes its input
    by sign. The last unit's activation stays outside the run."""
    from ...changes.binary_inputs import binary_inputs_of

    hooks = binary_inputs_of(gm)

    def mod(n: fx.Node) -> nn.Module | None:
        return gm.get_submodule(str(n.target)) if n.op == "call_module" else None

    def binary_linear(n: fx.Node | None) -> bool:
        m = None if n is None else mod(n)
        return isinstance(m, nn.Linear) and _binary_parts(m) is not None and hooks.get(str(n.target)) in (None, "sign")

    def sole(n: fx.Node) -> fx.Node | None:
        users = list(n.users)
        return users[0] if len(users) == 1 and users[0].args == (n,) and not users[0].kwargs else None

    chains, seen = [], set()
    for node in gm.graph.nodes:
        if node in seen or not binary_linear(node):
            continue
        chain, cur = [], node
        while True:
            seen.add(cur)
            bn = act = None
            nxt = sole(cur)
            if nxt is not None and isinstance(mod(nxt), nn.BatchNorm1d):
                bn, nxt = nxt, sole(nxt)
            m = None if nxt is None else mod(nxt)
            if isinstance(m, nn.Hardtanh) and m.min_val < 0 < m.max_val:
                act, nxt = nxt, sole(nxt)  # type: ignore[arg-type]
            if binary_linear(nxt) and hooks.get(str(nxt.target)) == "sign":  # type: ignore[union-attr]
                chain.append((cur, bn, act))
                cur = nxt  # type: ignore[assignment]
                continue
            chain.append((cur, bn, None))
            break
        if len(chain) >= 2:
            chains.append(chain)
    return chains


def chain_modules(gm: fx.GraphModule, chain: list[tuple[fx.Node, fx.Node | None, fx.Node | None]]
                  ) -> tuple[BinaryChain, list[nn.Module]]:
    """The :class:`BinaryChain` of one run of :func:`_binary_chains`, and the run's own modules as plain copies
    (what it replaces, in order)."""
    from ...changes.binary_inputs import binary_inputs_of

    hooks = binary_inputs_of(gm)
    units, parts = [], []
    for i, (lin, bn, act) in enumerate(chain):
        m = gm.get_submodule(str(lin.target))
        signs, scale = _binary_parts(m)  # type: ignore[misc]
        units.append({"signs": signs, "scale": scale, "bias": m.bias, "real_input": i == 0 and str(lin.target)
                      not in hooks, "bn": None if bn is None else gm.get_submodule(str(bn.target))})
        dense = copy.deepcopy(m)
        _materialize(dense)
        parts += [dense] + [copy.deepcopy(gm.get_submodule(str(n.target))) for n in (bn, act) if n is not None]
    return BinaryChain(units, [str(lin.target) for lin, _, _ in chain]), parts


def _fuse_binary_chains(gm: fx.GraphModule, batch: int, repeats: int, plan: RuntimePlan) -> set[str]:
    """Time each BNN run (:func:`_binary_chains`) as one :class:`BinaryChain` against its modules; keep the
    faster. Returns the names of the Linear layers that were fused."""
    fused = set()
    for k, chain in enumerate(_binary_chains(gm)):
        names = [str(lin.target) for lin, _, _ in chain]
        fast, parts = chain_modules(gm, chain)
        x = torch.randn(batch, fast.n_in, generator=torch.Generator().manual_seed(0))
        choice = RunChoice(names, "dense", "binary", 1.0, _time({"dense": nn.Sequential(*parts).eval(),
                                                                 "xnor chain": fast}, x, repeats))
        choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
        plan.runs.append(choice)
        if choice.form == "dense":
            continue
        nodes = [n for unit in chain for n in unit if n is not None]
        _replace_nodes(gm, nodes, chain[-1][1] or chain[-1][0], fast, f"binary_chain_{k}")
        fused.update(names)
    return fused


def _swap_binary(model: nn.Module, batch: int, repeats: int, plan: RuntimePlan, probe: nn.Module,
                 skip: set[str]) -> None:
    """Time each binary-input layer (not in ``skip``) against its XNOR form and keep the faster, in place.
    ``probe``: the model whose recorded input shape gives the convolutions' input sizes."""
    from ...changes.binary_inputs import binary_inputs_of

    layers = {n: mode for n, mode in binary_inputs_of(model).items()
              if n not in skip and _binary_parts(model.get_submodule(n))}
    convs = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)]
    shapes = _input_shapes(probe, convs) if convs else {}
    gen = torch.Generator().manual_seed(0)
    for name, mode in layers.items():
        m = model.get_submodule(name)
        signs, scale = _binary_parts(m)  # type: ignore[misc]
        try:
            if isinstance(m, nn.Linear):
                fast: nn.Module = XnorLinear(m, signs, scale, mode)
                x = torch.randn(batch, m.in_features, generator=gen)
            elif isinstance(m, nn.Conv2d) and name in shapes:
                fast = XnorConv2d(m, signs, scale, mode)
                x = torch.randn(batch, *shapes[name][1:], generator=gen)
            else:
                continue
        except ValueError:  # padding, groups: the XNOR form does not apply; the layer stays dense
            continue
        dense = copy.deepcopy(m)
        _materialize(dense)
        choice = RunChoice([name], "dense", "binary", 1.0, _time({"dense": dense, "xnor": fast}, x, repeats))
        choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
        plan.runs.append(choice)
        if choice.form == "xnor":
            model.set_submodule(name, fast)
