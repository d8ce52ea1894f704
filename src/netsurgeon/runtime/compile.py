"""Turn a compressed model into its fastest runnable form, chosen by measuring on the user's batch size.

``compile_runtime(model, batch)`` traces the model (torch.fx), finds every maximal run of Linear layers joined
by ReLUs (each intermediate result used only by the next layer), and for each run times the candidate forms
on a random input of that batch size, interleaved, median of ``repeats``:

- ``fused``: one compiled call for the whole run (float32 values, or k-means codes + codebooks), numba;
- ``csr``: torch's CSR matmul per layer;
- ``int8``: int8 x int8 -> int32 per layer (for weights stored as int8);
- ``dense``: plain ``nn.Linear`` layers with float32 weights (the baseline: never slower than dense).

A binary layer whose input is binarized too (BNN, XNOR-Net; ``quantization/binary.py``) is timed on its own
against its dense form (a run of binary-weight layers with real inputs gets ``lut``: the weights as bits,
the product by table lookup): ``xnor`` packs the input's signs and multiplies by XNOR + popcount (bitops.py). A binary
convolution needs its input size, taken from one probe run at the model's recorded input shape.

A Conv2d (groups 1) is timed against ``columns``: im2col over the columns of its lowered weight that are not
all zero + one GEMM (:class:`ColumnConv2d`); SSL's shape-wise groups and pruning that empties whole (input
channel, kernel position) pairs shrink its work; at batch 1 it can beat the direct convolution even dense.
Scattered zeros do not speed convolutions up on this CPU (docs/runtime.md); removing whole channels does.
A MaxPool2d whose window is its stride is timed against ``pool``, the maximum of its strided views
(:class:`StridedMaxPool2d`): this torch build's NCHW max-pooling is several times slower than the arithmetic it
does, dense model or not.

For the whole model: ``fold`` folds every eval-mode BatchNorm into the Conv or Linear layer that alone feeds it
(one pass over the activations less; no timing needed). ``layout``, for a model with convolutions and a
recorded input shape, first times the model in its own memory order against channels-last order
(:class:`ChannelsLast`), before the column and pooling swaps, which are then timed in the order chosen; last, the
finished model against itself on cache-sized slices of the batch (:class:`BatchChunks`). A candidate whose output
differs from the model's is dropped, and a finished channels-last model that differs is compiled again without
``layout``. ``calls``: the finished graph calls the functions of its plain torch layers directly (no
``nn.Module.__call__`` per layer; a ReLU on a fresh tensor nothing else reads runs in place). ``pack``, at a
batch of 2 or more: the convolutional part of the model runs on G samples at once laid side by side along the
channel axis, each convolution grouped G times over copies of its weights (:func:`_packed`): a layer left with 8
channels by pruning then fills oneDNN's 16-channel blocks (8 -> 8 channels over 28x28, batch 256: 1.9 vs 2.4 ms).
Timed against the finished model; the fastest of G = 1, 2, 4 is kept. These steps apply
to a dense model's runtime form as to a compressed one, so a ratio between two runtime forms credits only the
compression.

The fastest wins, so no run is slower than dense up to timing noise. A model fx cannot trace keeps its
structure; each Linear layer is then a run of its own.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..stats import time_interleaved
from . import bitops, kernels
from .modules import (
    BatchChunks,
    BinaryChain,
    ChannelsLast,
    ColumnConv2d,
    CSRLinear,
    FusedLinearChain,
    Int8Chain,
    SignLutLinear,
    StridedMaxPool2d,
    XnorConv2d,
    XnorLinear,
    _Xnor,
    resident_bytes,
)

__all__ = ["compile_runtime", "RuntimePlan", "RunChoice", "linear_form"]

KINDS = ("fused", "csr", "int8", "xnor", "lut", "columns", "pool", "fold", "layout", "calls", "pack", "dense")
_PACKS = (2, 4)  # samples per packed group the ``pack`` step tries
PACK_STEP = "(whole model) samples packed into channels"  # the plan's label of the ``pack`` step
_CHUNKS = (16, 32, 64)  # slice sizes the ``layout`` step tries at larger batches


@dataclass
class RunChoice:
    """One run of Linear layers: the candidates' median latency (ms) and the form kept."""

    layers: list[str]
    form: str
    weights: str  # float / shared / int8 / binary; none for a layer without weights (pooling)
    density: float
    latency_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class RuntimePlan:
    batch: int
    threads: int
    runs: list[RunChoice]
    traced: bool
    resident_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"runtime plan for batch {self.batch}, {self.threads} threads"
                 + ("" if self.traced else " (model not traceable by torch.fx: layers replaced one by one)")]
        for r in self.runs:
            cands = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(r.latency_ms.items(), key=lambda kv: kv[1]))
            held = "" if r.weights == "none" else f" ({r.weights}, {100 * r.density:.1f}% nonzero)"
            lines.append(f"  {'+'.join(r.layers)}{held}: {r.form}"
                         + (f"  [{cands}]" if cands else ""))
        return "\n".join(lines)


def linear_form(m: nn.Linear) -> tuple[str, dict[str, torch.Tensor]]:
    """How a Linear layer's weight is held: ``("shared", {book, index})``, ``("int8", {q, scale})``,
    ``("binary", {q: ±1 int8 signs, scale})`` or ``("float", {weight})`` (pruning masks already applied)."""
    if parametrize.is_parametrized(m, "weight"):
        for p in m.parametrizations["weight"]:
            if type(p).__name__ == "SharedWeights":
                return "shared", {"book": p.codebook.detach(), "index": p.index}
            if type(p).__name__ == "Int8Weights":
                return "int8", {"q": p.q, "scale": p.scale}
            if type(p).__name__ == "BinaryWeights":
                return "binary", {"q": p.signs, "scale": p.scale}
    return "float", {"weight": m.weight.detach()}


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


def _time(cands: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each candidate, interleaved (the first warm-up call compiles numba kernels). Three rounds
    first: a candidate over twice the fastest's time there keeps that figure and is not timed further."""
    fns = {k: (lambda m=m: m(x)) for k, m in cands.items()}
    t = time_interleaved(fns, min(3, repeats), warmup=3)
    close = {k: f for k, f in fns.items() if t[k] <= 2 * min(t.values())}
    if len(close) > 1 and repeats > 3:
        t.update(time_interleaved(close, repeats, warmup=0))
    return {k: 1e3 * v for k, v in t.items()}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Linear, _Xnor, SignLutLinear, BinaryChain)) or super().is_leaf_module(m, qualname)


def _binary_parts(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    if parametrize.is_parametrized(m, "weight"):
        for p in m.parametrizations["weight"]:
            if type(p).__name__ == "BinaryWeights":
                return p.signs, p.scale
    return None


def _input_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The input shape of each layer in ``names`` on one probe run at the model's recorded input shape."""
    from ..models import arch_of

    shape = (arch_of(model) or {}).get("input_shape")
    if not shape:
        return {}
    seen: dict[str, tuple[int, ...]] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, tuple(args[0].shape))) for n in names]
    try:
        with torch.no_grad():
            model(torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)))
    except Exception:  # noqa: BLE001 - a model that does not run on its recorded shape keeps its convolutions
        return {}
    finally:
        for h in handles:
            h.remove()
    return seen


def _binary_chains(gm: fx.GraphModule) -> list[list[tuple[fx.Node, fx.Node | None, fx.Node | None]]]:
    """Runs of BNN units [(binary Linear, BatchNorm1d or None, HardTanh or None), ...]: each unit's output (after
    its BatchNorm and sign-keeping activation) is used only by the next unit's Linear, which binarizes its input
    by sign. The last unit's activation stays outside the run."""
    from ..quantization.binary import binary_inputs_of

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
    from ..quantization.binary import binary_inputs_of

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
    from ..quantization.binary import binary_inputs_of

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


def _column_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, float]]:
    """Each Conv2d (groups 1, zero padding): its :class:`ColumnConv2d` form, weight form and density. Every
    such convolution is a candidate, zero columns or not, so a dense model's runtime form gets the kernel too
    and a ratio against it credits only the skipped columns."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str) and not m._forward_hooks and not m._forward_pre_hooks:
            out[n] = (ColumnConv2d(m), linear_form(m)[0], float((m.weight != 0).float().mean()))
    return out


def _pool_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, float]]:
    """Each MaxPool2d whose window equals its stride: its :class:`StridedMaxPool2d` form."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.MaxPool2d) and not m._forward_hooks and not m._forward_pre_hooks:
            try:
                out[n] = (StridedMaxPool2d(m), "none", 1.0)
            except ValueError:  # padding, overlapping windows, ceil mode: stays as it is
                continue
    return out


def _swap_timed(model: nn.Module, form: str, cands: dict[str, tuple[nn.Module, str, float]], batch: int,
                repeats: int, plan: RuntimePlan, probe: nn.Module, last: bool = False) -> None:
    """Time each module in ``cands`` (name -> (fast form, weights, density)) against itself on an input of its
    size at ``batch`` and keep the faster, in place. ``probe``: the model whose recorded input shape gives the
    input sizes (a module it does not reach keeps its form). ``last``: the model will run in channels-last
    order, so both are timed on such an input (and a :class:`ColumnConv2d` hands its output back in it)."""
    shapes = _input_shapes(probe, list(cands)) if cands else {}
    gen = torch.Generator().manual_seed(0)
    order = torch.channels_last if last else torch.contiguous_format
    for name, (fast, weights, density) in cands.items():
        if name not in shapes:
            continue
        dense = copy.deepcopy(model.get_submodule(name))
        if parametrize.is_parametrized(dense):
            _materialize(dense)
        if isinstance(fast, ColumnConv2d):
            fast.channels_last = last
        x = torch.randn(batch, *shapes[name][1:], generator=gen)
        if x.dim() == 4:
            x, dense = x.contiguous(memory_format=order), dense.to(memory_format=order)
        choice = RunChoice([name], "dense", weights, density, _time({"dense": dense.eval(), form: fast}, x, repeats))
        choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
        plan.runs.append(choice)
        if choice.form == form:
            model.set_submodule(name, fast)


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


def compile_runtime(model: nn.Module, batch: int = 1, *, threads: int | None = None, repeats: int = 30,
                    forms: tuple[str, ...] = KINDS) -> tuple[nn.Module, RuntimePlan]:
    """The runtime form of ``model`` for inputs of ``batch`` samples, and the plan that says what was chosen.

    ``model`` may hold pruned float weights, k-means-shared or int8 weights (as ``load_compressed(...,
    keep_codecs=True)`` rebuilds them); it is not modified. ``forms`` limits the candidates (``dense`` is
    always one). Timing uses ``threads`` torch (and numba) threads (default: the current setting).
    """
    if batch < 1:
        raise ValueError(f"compile_runtime: batch must be >= 1; got {batch!r}.")
    bad = [f for f in forms if f not in KINDS]
    if bad:
        raise ValueError(f"compile_runtime: unknown runtime form {bad[0]!r}; choose from {', '.join(KINDS)}.")
    given, model = model, copy.deepcopy(model).eval()
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        plan = RuntimePlan(batch, torch.get_num_threads(), [], True)
        try:
            gm: nn.Module = fx.GraphModule(model, _Tracer().trace(model))
            traced = True
        except Exception:  # noqa: BLE001 - any model fx cannot trace keeps its own forward
            gm, traced = model, False
        if "xnor" in forms and bitops.available():
            fused = _fuse_binary_chains(gm, batch, repeats, plan) if traced else set()  # type: ignore[arg-type]
            _swap_binary(gm, batch, repeats, plan, model, fused)
        x_whole, ref = _whole_input(gm, model, batch) if "layout" in forms else (None, None)
        if traced and "fold" in forms:
            _fold_batchnorm(gm, plan, convs_too=True)  # type: ignore[arg-type]
        last = x_whole is not None and _channels_last_pays(gm, x_whole, ref, repeats, plan, fold="fold" in forms)
        if "columns" in forms:
            _swap_timed(gm, "columns", _column_candidates(gm), batch, repeats, plan, model, last)
        if "pool" in forms:
            _swap_timed(gm, "pool", _pool_candidates(gm), batch, repeats, plan, model, last)
        if traced:
            gm.graph.lint()  # type: ignore[union-attr]
            runs = _runs(gm)  # type: ignore[arg-type]
        else:
            runs = [[(name, None)] for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        plan.traced = traced
        for k, run in enumerate(runs):
            names = [str(n.target) if traced else n for n, _ in run]
            mods = [gm.get_submodule(n) for n in names]
            relus = [r is not None for _, r in run]
            kinds = {linear_form(m)[0] for m in mods}
            form = kinds.pop() if len(kinds) == 1 else "mixed"
            nz = sum(int((m.weight != 0).sum()) for m in mods)
            density = nz / sum(m.weight.numel() for m in mods)
            if form == "mixed":  # a run mixing storage forms: each layer on its own
                plan.runs.append(RunChoice(names, "dense", form, density))
                continue
            cands = {f: c for f, c in _candidates(mods, relus, names, form, density).items()
                     if f in forms or f == "dense"}
            choice = RunChoice(names, "dense", form, density)
            if len(cands) > 1:
                x = torch.randn(batch, mods[0].in_features, generator=torch.Generator().manual_seed(0))
                choice.latency_ms = _time(cands, x, repeats)
                choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
            plan.runs.append(choice)
            if choice.form == "dense":
                continue
            fast = cands[choice.form]
            if traced:
                _replace_run(gm, run, fast, f"runtime_{k}")  # type: ignore[arg-type]
            else:  # one layer per run: swap the module in place
                gm.set_submodule(names[0], fast)
        for m in list(gm.modules()):  # what stays: plain weights (masks/codebooks applied once, here)
            if parametrize.is_parametrized(m):
                _materialize(m)
        if traced and "fold" in forms:
            _fold_batchnorm(gm, plan)  # type: ignore[arg-type]
        packs = {f"pack{g}": p for g in _PACKS if traced and x_whole is not None and "pack" in forms and batch >= g
                 and (p := _packed(gm, g, last)) is not None}  # type: ignore[arg-type]
        direct = _direct_calls(gm) if traced and "calls" in forms else 0  # type: ignore[arg-type]
        for p in packs.values():
            if "calls" in forms:
                _direct_calls(p)
            p.graph.lint()
            p.recompile()
            p.delete_all_unused_submodules()
        if direct:
            plan.runs.append(RunChoice(["(whole model) direct calls"], "calls", "float", 1.0))
        if traced and not direct and all(r.form == "dense" for r in plan.runs):
            gm = model  # nothing replaced: the model's own forward (a GraphModule's costs ~4 us at batch 1)
        elif traced:
            gm.graph.lint()
            gm.recompile()
            gm.delete_all_unused_submodules()  # type: ignore[operator]
            gm = _sole_module(gm)  # type: ignore[arg-type]
        slack = 0.0  # int8 kernels, say, are close to the float model, not equal to it: the memory order and
        if x_whole is not None:  # the slicing may differ from it by twice what the finished model's kernels do
            with torch.inference_mode():
                slack = 2 * float((gm.eval()(x_whole) - ref).abs().max())
        if last:
            gm = ChannelsLast(gm)
        if packs:
            cands = {"dense": gm} | {k: ChannelsLast(p) if last else p for k, p in packs.items()}
            gm = cands[_pick_whole(cands, x_whole, ref, repeats, plan, PACK_STEP, slack)]
        if x_whole is not None and batch > min(_CHUNKS):
            gm = _choose_chunks(gm.eval(), x_whole, ref, repeats, plan, slack)
        if last and not _same(gm, x_whole, ref, slack):  # a swapped layer that mishandles channels-last input:
            return compile_runtime(given, batch, threads=threads, repeats=repeats,  # without the layout steps
                                   forms=tuple(f for f in forms if f != "layout"))
        plan.resident_bytes = resident_bytes(gm)
        return gm.eval(), plan
    finally:
        torch.set_num_threads(old)


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each submodule (a layer called twice is shared: it keeps its own call)."""
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    return calls


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
    """Replace the calls of plain torch layers (Conv1d/2d, Linear, ReLU, max- and average-pooling, Flatten,
    Identity, Dropout in eval mode) by calls of their functions on the layers' own tensors, in place; a ReLU whose
    input is a fresh tensor read by nothing else runs in place (as does one built ``inplace=True``), and so do
    functional ReLUs and additions on such a tensor (:func:`_in_place`). Same arithmetic, no
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
    if t in (nn.Identity, nn.Dropout) and not m.training:
        return x
    return None


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


def _whole_input(net: nn.Module, probe: nn.Module, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A random input of ``batch`` samples at ``probe``'s recorded (C, H, W) input shape and ``net``'s output on
    it, for a model with convolutions whose output is one tensor of ``batch`` rows; else (None, None): the layout
    steps do not apply."""
    from ..models import arch_of

    shape = (arch_of(probe) or {}).get("input_shape")
    if not shape or len(shape) != 3 or not any(isinstance(m, (nn.Conv2d, XnorConv2d)) for m in net.modules()):
        return None, None
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            out = net(x)
    except Exception:  # noqa: BLE001 - a model that does not run on its recorded shape keeps its layout
        return None, None
    return (x, out) if isinstance(out, torch.Tensor) and out.shape[:1] == (batch,) else (None, None)


def _same(net: nn.Module, x: torch.Tensor, ref: torch.Tensor, slack: float = 0.0) -> bool:
    """``net(x)`` runs and equals ``ref`` up to float reassociation (BatchNorm folding, another memory order) and
    ``slack``."""
    try:
        with torch.inference_mode():
            out = net(x)
    except Exception:  # noqa: BLE001 - e.g. a user's layer that views its input as NCHW: not this form
        return False
    return out.shape == ref.shape and float((out - ref).abs().max()) <= 1e-4 * (1.0 + float(ref.abs().max())) + slack


def _pick_whole(cands: dict[str, nn.Module], x: torch.Tensor, ref: torch.Tensor, repeats: int, plan: RuntimePlan,
                label: str, slack: float = 0.0) -> str:
    """The fastest of whole-model ``cands`` on ``x`` (``dense``: the model as it is); a candidate whose output
    differs from the model's, ``ref`` (a model that mixes samples, say), is dropped. Recorded in ``plan`` under
    ``label``."""
    cands = {k: m for k, m in cands.items() if k == "dense" or _same(m, x, ref, slack)}
    one = time_interleaved({"dense": lambda: cands["dense"](x)}, 1, warmup=0)["dense"]
    rounds = max(5, min(repeats, int(1.0 / (len(cands) * max(one, 1e-6)))))  # ~1 s, or 5 rounds of a slow model
    choice = RunChoice([label], "dense", "none", 1.0, _time(cands, x, rounds))
    choice.form = min(choice.latency_ms, key=choice.latency_ms.__getitem__)
    plan.runs.append(choice)
    return choice.form


def _channels_last_pays(gm: nn.Module, x: torch.Tensor, ref: torch.Tensor, repeats: int, plan: RuntimePlan,
                        fold: bool) -> bool:
    """Whether the whole model runs faster in channels-last order, timed before the per-layer choices (which are
    then timed in the order chosen), on a copy with plain weights (and BatchNorm folded, as it will be)."""
    trial = copy.deepcopy(gm).eval()
    for m in list(trial.modules()):
        if parametrize.is_parametrized(m):
            _materialize(m)
    if fold and isinstance(trial, fx.GraphModule):
        _fold_batchnorm(trial, None)
    cands = {"dense": trial, "channels_last": ChannelsLast(copy.deepcopy(trial))}
    return _pick_whole(cands, x, ref, repeats, plan, "(whole model) memory order") == "channels_last"


def _choose_chunks(net: nn.Module, x: torch.Tensor, ref: torch.Tensor, repeats: int, plan: RuntimePlan,
                   slack: float) -> nn.Module:
    """``net`` as it is or on slices of the batch (:class:`BatchChunks`), whichever is fastest at ``x``'s batch."""
    cands: dict[str, nn.Module] = {"dense": net}
    cands.update({f"chunks{n}": BatchChunks(net, n) for n in _CHUNKS if n < x.shape[0]})
    return cands[_pick_whole(cands, x, ref, repeats, plan, "(whole model) batch slices", slack)]


def _sole_module(gm: fx.GraphModule) -> nn.Module:
    """The one module a graph ``input -> module -> output`` calls, else the graph: at batch 1 the graph's own
    call costs ~4 us, as much as a fused LeNet-300-100 computes."""
    nodes = list(gm.graph.nodes)
    if len(nodes) == 3 and [n.op for n in nodes] == ["placeholder", "call_module", "output"] \
            and nodes[1].args == (nodes[0],) and not nodes[1].kwargs and nodes[2].args == (nodes[1],):
        return gm.get_submodule(str(nodes[1].target))
    return gm


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
