"""Pass ``linear``: every maximal run of Linear layers joined by ReLUs (each intermediate result used only by
the next layer), each timed in its candidate forms on a random input of the batch size, interleaved, median of
``repeats``:

- ``fused``: one compiled call for the whole run (float32 values, or k-means codes + codebooks), numba;
- ``csr``: torch's CSR matmul per layer;
- ``int8``: int8 x int8 -> int32 per layer (for weights stored as int8);
- ``lut``: binary weights with real inputs (BinaryConnect, a BNN's first layer): the weights as bits, the
  product by table lookup;
- ``dense``: plain ``nn.Linear`` layers with float32 weights (the baseline: never slower than dense).

The fastest replaces the run. A model fx cannot trace keeps its structure; each Linear layer is then a run of
its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import kernels
from ..modules import CSRLinear, FusedLinearChain, Int8Chain, SignLutLinear
from ..plan import RunChoice, RuntimePlan
from ..weights import linear_form
from .binary import _binary_parts
from .graph import _replace_run
from .timing import _time


def _swap_runs(gm: nn.Module, traced: bool, batch: int, repeats: int, plan: RuntimePlan,
               forms: tuple[str, ...]) -> None:
    """Replace each run of Linear layers (:func:`_runs`; one layer per run if ``gm`` is not traced) by its
    fastest form among ``forms`` at ``batch``, in place."""
    if traced:
        gm.graph.lint()  # type: ignore[union-attr]
        runs = _runs(gm)  # type: ignore[arg-type]
    else:
        runs = [[(name, None)] for name, m in gm.named_modules() if isinstance(m, nn.Linear)]
    for k, run in enumerate(runs):
        names = [str(n.target) if traced else n for n, _ in run]
        choice, fast = _choose_run(gm, names, [r is not None for _, r in run], batch, repeats, forms)
        plan.runs.append(choice)
        if fast is None:
            continue
        if traced:
            _replace_run(gm, run, fast, f"runtime_{k}")  # type: ignore[arg-type]
        else:  # one layer per run: swap the module in place
            gm.set_submodule(names[0], fast)


def _choose_run(gm: nn.Module, names: list[str], relus: list[bool], batch: int, repeats: int,
                forms: tuple[str, ...]) -> tuple[RunChoice, nn.Module | None]:
    """The timed choice for the run of layers ``names`` (``relus``: a ReLU follows each), and its fast form
    (None: the run stays dense)."""
    mods = [gm.get_submodule(n) for n in names]
    kinds = {linear_form(m)[0] for m in mods}
    form = kinds.pop() if len(kinds) == 1 else "mixed"
    nz = sum(int((m.weight != 0).sum()) for m in mods)
    density = nz / sum(m.weight.numel() for m in mods)
    choice = RunChoice(names, "dense", form, density)
    if form == "mixed":  # a run mixing storage forms: each layer on its own
        return choice, None
    cands = {f: c for f, c in _candidates(mods, relus, names, form, density).items() if f in forms or f == "dense"}
    if len(cands) > 1:
        x = torch.randn(batch, mods[0].in_features, generator=torch.Generator().manual_seed(0))
        choice.latency_ms = _time(cands, x, repeats)
        choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
    return choice, None if choice.form == "dense" else cands[choice.form]


def _layer_spec(m: nn.Linear, relu: bool) -> dict[str, Any]:
    form, parts = linear_form(m)
    bias = None if m.bias is None else m.bias.detach().float().numpy()
    spec: dict[str, Any] = {"n_in": m.in_features, "n_out": m.out_features, "bias": bias, "relu": relu}
    if form == "shared":
        idx = parts["index"]
        rows, cols = torch.nonzero(idx, as_tuple=True)
        spec.update(rows=rows.numpy(), cols=cols.numpy(), codes=(idx[rows, cols] - 1).to(torch.uint8).numpy(),
                    book=parts["book"].float().numpy())
    else:
        w = m.weight.detach().float()
        rows, cols = torch.nonzero(w, as_tuple=True)
        spec.update(rows=rows.numpy(), cols=cols.numpy(), values=w[rows, cols].numpy())
    return spec


def _dense_linear(m: nn.Linear) -> nn.Linear:
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        out.weight.copy_(m.weight.detach())
        if m.bias is not None:
            out.bias.copy_(m.bias.detach())
    return out.eval()


def _candidates(mods: list[nn.Linear], relus: list[bool], names: list[str], form: str,
                density: float) -> dict[str, nn.Module]:
    def seq(layers: list[nn.Module]) -> nn.Module:
        out: list[nn.Module] = []
        for layer, r in zip(layers, relus, strict=True):
            out += [layer] + ([nn.ReLU()] if r else [])
        return nn.Sequential(*out).eval()

    cands: dict[str, nn.Module] = {"dense": seq([_dense_linear(m) for m in mods])}
    if form == "binary":  # ±1 weights, real inputs (BinaryConnect, a BNN's first layer): table lookup
        if kernels.available():
            cands["lut"] = seq([SignLutLinear(m, *_binary_parts(m)) for m in mods])  # type: ignore[misc]
        return cands
    if form == "int8":
        cands["int8"] = Int8Chain([{**linear_form(m)[1], "bias": m.bias, "relu": r}
                                   for m, r in zip(mods, relus, strict=True)], names)
        return cands
    if density <= 0.5 or form == "shared":
        if kernels.available():
            cands["fused"] = FusedLinearChain([_layer_spec(m, r) for m, r in zip(mods, relus, strict=True)], names)
        if density <= 0.5:
            cands["csr"] = seq([CSRLinear(m.weight.detach(), m.bias) for m in mods])
    return cands


def _is_relu(node: fx.Node, gm: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def _runs(gm: fx.GraphModule) -> list[list[tuple[fx.Node, fx.Node | None]]]:
    """Maximal runs [(linear node, relu node or None), ...] in graph order."""
    def linear(n: fx.Node) -> bool:  # a layer with hooks (e.g. a binarized input) keeps its own call
        if n.op != "call_module":
            return False
        m = gm.get_submodule(str(n.target))
        return isinstance(m, nn.Linear) and not m._forward_hooks and not m._forward_pre_hooks

    seen: set[fx.Node] = set()
    runs = []
    for node in gm.graph.nodes:
        if not linear(node) or node in seen:
            continue
        run, cur = [], node
        while True:
            seen.add(cur)
            nxt = list(cur.users)
            relu = nxt[0] if len(nxt) == 1 and _is_relu(nxt[0], gm) else None
            run.append((cur, relu))
            tail = relu or cur
            users = list(tail.users)
            if len(users) == 1 and linear(users[0]) and users[0].args == (tail,) and not users[0].kwargs:
                cur = users[0]
                continue
            break
        runs.append(run)
    return runs
