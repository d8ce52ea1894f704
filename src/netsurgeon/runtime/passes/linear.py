"""Pass ``linear``: every maximal run of Linear layers joined by ReLUs (each intermediate result used only by
the next layer), each timed in its candidate forms on a random input of the batch size, interleaved, median of
``repeats``:

- whatever the weights' storage form offers (``Form.linear_candidates``, ``forms/``): ``fused`` (one compiled call
  for the whole run, float32 values or k-means codes + codebooks, numba) and ``csr`` (torch's CSR matmul per
  layer) for pruned float and k-means weights, ``int8`` (int8 x int8 -> int32) for int8 weights, ``lut`` (the
  weights as bits, the product by table lookup) for binary weights with real inputs, and every other registered
  form's own; for plain float weights every plain form proposes its kernels;
- ``dense``: plain ``nn.Linear`` layers with float32 weights (the baseline: never slower than dense).

The fastest replaces the run. A model fx cannot trace keeps its structure; each Linear layer is then a run of
its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...forms import Form, chain, layer_form, linear_candidates
from ..plan import RunChoice, RuntimePlan
from .attention import attention_owned
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
        owned = attention_owned(gm)  # an nn.MultiheadAttention left as it is reads its out_proj's weight
        runs = [[(name, None)] for name, m in gm.named_modules() if isinstance(m, nn.Linear) and name not in owned]
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
    (None: the run stays dense). ``forms``: the candidate names allowed."""
    mods = [gm.get_submodule(n) for n in names]
    held = [layer_form(m) for m in mods]
    kinds = {h[0] for h in held}
    form = kinds.pop() if len(kinds) == 1 else "mixed"
    nz = sum(int((m.weight != 0).sum()) for m in mods)
    density = nz / sum(m.weight.numel() for m in mods)
    choice = RunChoice(names, "dense", form, density)
    owner = _run_form([h[1] for h in held])
    if form == "mixed" or owner is False:  # a run mixing storage forms: each layer on its own
        return choice, None
    offered = linear_candidates(owner, mods, relus, names, density)  # type: ignore[arg-type]
    cands = {"dense": chain([_dense_linear(m) for m in mods], relus),
             **{f: c for f, c in offered.items() if f in forms}}
    if len(cands) > 1:
        x = torch.randn(batch, mods[0].in_features, generator=torch.Generator().manual_seed(0))
        choice.latency_ms = _time(cands, x, repeats)
        choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
    return choice, None if choice.form == "dense" else _unwrapped(cands[choice.form])


def _run_form(held: list) -> Form | None | bool:
    """The form whose candidates serve a run of layers held in ``held`` (forms, None for plain float): their only
    one; for a run mixing a form with forms that are its ``alternative_to`` (``grouped`` and ``grouped_nm``
    layers), that form, whose candidates take both; False for a run of unrelated forms."""
    kinds = set(held)
    if len(kinds) == 1:
        return held[0]
    base = [f for f in kinds if f is not None and all(g is f or (g is not None and f.codec in g.alternative_to)
                                                    for g in kinds)]
    return base[0] if base else False


def _unwrapped(fast: nn.Module) -> nn.Module:
    """A one-layer chain (``nn.Sequential`` of one kernel module, no ReLU) as that module: at batch 1 the
    Sequential's own call cost ~3 us of a GPT-2 FFN layer's ~30."""
    return fast[0] if type(fast) is nn.Sequential and len(fast) == 1 else fast


def _dense_linear(m: nn.Linear) -> nn.Linear:
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        out.weight.copy_(m.weight.detach())
        if m.bias is not None:
            out.bias.copy_(m.bias.detach())
    return out.eval()


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
