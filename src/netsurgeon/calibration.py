"""Calibration capture for post-training methods (SparseGPT, OBC, GPTQ, Wanda): run the model block by block on
calibration samples, give each layer's input statistics to a method, and let the next block see the *compressed*
earlier blocks, with bounded memory.

The scheme is SparseGPT's and GPTQ's (Frantar & Alistarh 2023, arXiv:2301.00774, Sec. 4 "Setup"; Frantar et al.
2023, arXiv:2210.17323, Sec. 5): the inputs of the first block are captured once, each block's layers get their
Hessians H = 2XXᵀ from those inputs, the block is compressed, and the calibration inputs are run through the
compressed block to become the next block's inputs. Only one block's activations and the largest layer's
Hessians live at once. Here:

* **Blocks.** The children of the model's container (``nn.ModuleList`` or plain ``nn.Sequential``) with the most
  children holding layers (a transformer's layer list; the model itself when it is a ``Sequential``) form the
  *trunk*. Whether a ``ModuleList`` really is chained (block b+1 receives block b's output and the same other
  arguments) is checked on one batch; a chained trunk runs from cached inputs. Every other layer belongs to a
  unit named by its top-level child (or, beside the trunk, the child that diverges from the trunk's path); such a
  unit, and a trunk that is not chained, is fed by running the whole model again and stopping after the unit,
  which is always correct and costs a partial forward pass per unit.
* **Layers.** ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (W as (out, in·k), X the unfolded patches; one Hessian
  per convolution group), Hugging Face's ``Conv1D`` (a transposed Linear) and ``nn.MultiheadAttention``: its
  packed ``in_proj_weight`` and ``out_proj`` are used functionally, so no hook on ``out_proj`` ever fires. During
  calibration the attention module runs through :func:`_mha_forward`, which feeds query/key/value to the in_proj
  Hessians, runs the module's own forward with an identity output projection (giving the heads' concatenated
  output exactly) and applies the real ``out_proj`` to it. Anything else that owns parameters (embeddings, bare
  parameters, LSTMs) is skipped and listed; norms are left alone.
* **Within a block** every layer sees the block's inputs with the block still dense (SparseGPT's default; GPTQ's
  ``--true-sequential`` is not implemented): a block's layers are captured in passes whose Hessians together fit
  the largest layer's, and their new weights are written only when the whole block is done.

The layer discovery is one small function, :func:`discover_layers`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split, batches
from .masks import attach_masks, get_masks, is_hf_conv1d, note_skipped, original, weight_matrix
from .registry import MethodConfig, option
from .stats import HessianAccumulator

__all__ = ["Target", "discover_layers", "layer_targets", "CalibratedConfig", "draw_samples", "target_weight",
           "target_keep", "write_target", "attach_target_masks", "CalibrationResult", "compress_sequentially"]

log = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
# compress(layer, targets, statistics) -> the new weight matrix of each target (None: leave it)
Compress = Callable[[str, list["Target"], list[HessianAccumulator]], list[Tensor | None]]


def discover_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers a calibrated method can compress, ``{name: module}`` in module order, and the parameter holders
    it cannot, ``{name: reason}``. Norm layers are neither (left alone, as every method here does)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    mha_out = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention)}
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        if "parametrizations." in f".{name}." or name in mha_out:
            continue  # a mask or codebook of a layer; an attention output projection belongs to its attention
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)) or is_hf_conv1d(m):
            tied = [owners[id(original(model, t.tensor))] for t in layer_targets(name, m)]
            tied = [o for o in tied if len(o) > 1]
            if tied:
                skipped[name or "(model)"] = f"its weight is shared by {', '.join(tied[0])} (tied)"
            else:
                layers[name] = m
        elif not isinstance(m, _NORMS) and any(True for _ in m.parameters(recurse=False)):
            own = ", ".join(n for n, _ in m.named_parameters(recurse=False))
            skipped[name or "(model)"] = f"{type(m).__name__} ({own}) is not supported"
    return layers, skipped


@dataclass(frozen=True)
class Target:
    """One weight matrix W (rows, columns) compressed on its own Hessian: rows ``rows`` of the parameter
    ``tensor`` seen as (out, in·k) (Linear, Conv, attention) or transposed (``kind="transposed"``: HF Conv1D).
    ``source`` names the input that feeds its Hessian: "input", or "query"/"key"/"value"/"heads" in attention."""

    layer: str
    tensor: str
    rows: tuple[int, int]
    columns: int
    kind: str = "linear"
    source: str = "input"
    group: int = 0
    part: bool = False  # the tensor has other targets too (attention in_proj parts, convolution groups)

    @property
    def name(self) -> str:
        return f"{self.tensor}[{self.rows[0]}:{self.rows[1]}]" if self.part else self.tensor


def layer_targets(name: str, m: nn.Module, attention: str = "self") -> list[Target]:
    """The targets of one layer. ``attention`` (nn.MultiheadAttention only): "self" when query, key and value are
    one tensor (one Hessian for all of in_proj), "kv" when only key is value, "cross" otherwise."""
    pre = f"{name}." if name else ""
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        heads = Target(name, f"{pre}out_proj.weight", (0, e), e, source="heads")
        if not m._qkv_same_embed_dim:
            return [Target(name, f"{pre}q_proj_weight", (0, e), e, source="query"),
                    Target(name, f"{pre}k_proj_weight", (0, e), m.kdim, source="key"),
                    Target(name, f"{pre}v_proj_weight", (0, e), m.vdim, source="value"), heads]
        w = f"{pre}in_proj_weight"
        parts = {"self": [((0, 3 * e), "query")], "kv": [((0, e), "query"), ((e, 3 * e), "key")],
                 "cross": [((0, e), "query"), ((e, 2 * e), "key"), ((2 * e, 3 * e), "value")]}[attention]
        return [*(Target(name, w, rows, e, source=src, part=len(parts) > 1) for rows, src in parts), heads]
    if is_hf_conv1d(m):
        return [Target(name, f"{pre}weight", (0, m.weight.shape[1]), m.weight.shape[0], kind="transposed")]
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        out, cols = m.weight.shape[0], m.weight[0].numel()
        per = out // m.groups
        return [Target(name, f"{pre}weight", (g * per, (g + 1) * per), cols, kind="conv", group=g, part=m.groups > 1)
                for g in range(m.groups)]
    return [Target(name, f"{pre}weight", (0, m.weight.shape[0]), m.weight.shape[1])]


def _module_tensor(model: nn.Module, fqn: str) -> Tensor:
    mod, _, attr = fqn.rpartition(".")
    return getattr(model.get_submodule(mod) if mod else model, attr)


@torch.no_grad()
def target_weight(model: nn.Module, t: Target) -> Tensor:
    """The target's current (masked) weights as a float32 (rows, columns) copy."""
    w = weight_matrix(_module_tensor(model, t.tensor), t.kind)
    return w[t.rows[0]:t.rows[1]].detach().to(torch.float32).clone()


@torch.no_grad()
def target_keep(model: nn.Module, t: Target) -> Tensor | None:
    """The target's current mask as bool (rows, columns), or None when the tensor is not masked."""
    m = get_masks(model).get(t.tensor)
    return None if m is None else weight_matrix(m.mask, t.kind)[t.rows[0]:t.rows[1]] != 0


@torch.no_grad()
def write_target(model: nn.Module, t: Target, w: Tensor) -> None:
    """Write new (rows, columns) weights into the target's rows of the parameter (the original, if masked)."""
    p = original(model, t.tensor)
    weight_matrix(p.data, t.kind)[t.rows[0]:t.rows[1]] = w.to(p.dtype)


@torch.no_grad()
def attach_target_masks(model: nn.Module, keeps: dict[Target, Tensor]) -> None:
    """Attach (or tighten) masks from per-target keep matrices; pruned weights become exact zeros. In place.

    Calls ``masks.attach_masks`` with explicit tensor names (it does not check the model's other layers)."""
    names = sorted({t.tensor for t in keeps})
    found = attach_masks(model, names)
    for t, keep in keeps.items():
        m = weight_matrix(found[t.tensor].mask, t.kind)
        m[t.rows[0]:t.rows[1]] *= keep.to(m.dtype)
    for n in names:
        original(model, n).data.mul_(found[n].mask)


@dataclass(frozen=True)
class CalibratedConfig(MethodConfig):
    """The calibration draw, declared once for every method that draws one from the training split: the
    calibrated post-training methods (SparseGPT, OBC, Wanda, GPTQ; 128 samples as SparseGPT's Sec. 4 "Setup",
    arXiv:2301.00774) and the structured methods' taylor importance (heads, ffn_neurons; Michel et al. 2019,
    arXiv:1905.10650, Sec. 4.1). Drawn without replacement (seeded) from a Split, or the first ones of a loader."""

    samples: int = option(128, "calibration samples drawn from the training split", low=1)
    batch_size: int = option(16, "calibration samples per forward (and backward) pass", low=1)
    seed: int = option(0, "seed of the calibration draw", low=0)


def draw_samples(data: Split | Any, n: int, seed: int, owner: str) -> Tensor:
    """``n`` calibration inputs from a training split: drawn without replacement (seeded) from a Split, or the
    first ``n`` of a DataLoader's batches. Fewer when the data hold fewer (logged)."""
    if isinstance(data, Split):
        if len(data) == 0:
            raise ValueError(f"{owner}: the training split is empty; calibration needs samples.")
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed), device="cpu")[:n]
        out = data.x[idx.sort().values]
    else:
        xs, have = [], 0
        for x, _ in batches(data):
            xs.append(x[: n - have])
            have += len(xs[-1])
            if have >= n:
                break
        if not xs:
            raise ValueError(f"{owner}: the training loader yielded no batch; calibration needs samples.")
        out = torch.cat(xs)
    if len(out) < n:
        log.info("%s: the training data hold %d samples; calibrating on all of them (asked for %d)", owner,
                 len(out), n)
    return out


# -- capture ---------------------------------------------------------------------------------------------------
def _patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """A convolution's input as unfolded patches (N·L, C·k), features ordered as ``weight.reshape(out, -1)``."""
    one_d = isinstance(conv, nn.Conv1d)
    if x.dim() == (2 if one_d else 3):
        x = x.unsqueeze(0)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if one_d:  # (N, C, L) -> (N, C, 1, L): a 1 x k convolution
        x = x.unsqueeze(2)
        k, d, s = (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
    else:
        k, d, s = conv.kernel_size, conv.dilation, conv.stride
    cols = F.unfold(x, k, dilation=d, stride=s)                                  # (N, C·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _mha_forward(mha: nn.MultiheadAttention, stats: dict[str, list[HessianAccumulator]]) -> Callable[..., Any]:
    """A forward for ``mha`` that feeds query/key/value to the in_proj statistics and the heads' output (the input
    of ``out_proj``, which the module applies functionally) to ``stats["heads"]``; same outputs as the module."""
    cls_forward = type(mha).forward
    ident = None

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal ident
        for i, src in enumerate(("query", "key", "value")):
            for acc in stats.get(src, ()):
                acc.add_batch(args[i] if len(args) > i else kwargs[src])
        if not stats.get("heads"):
            return cls_forward(mha, *args, **kwargs)
        real = mha.out_proj
        if ident is None:  # x·I + 0 is exact: the module's own forward then returns the heads' output unchanged
            w = real.weight
            ident = nn.Linear(mha.embed_dim, mha.embed_dim, bias=real.bias is not None, device=w.device, dtype=w.dtype)
            ident.weight.data.copy_(torch.eye(mha.embed_dim, dtype=w.dtype, device=w.device))
            if ident.bias is not None:
                ident.bias.data.zero_()
        mha.out_proj = ident
        try:
            heads, weights = cls_forward(mha, *args, **kwargs)
        finally:
            mha.out_proj = real
        for acc in stats["heads"]:
            acc.add_batch(heads)
        return real(heads), weights

    return forward


@contextmanager
def _capturing(layers: dict[str, nn.Module], targets: dict[str, list[Target]],
               accs: dict[Target, HessianAccumulator]) -> Iterator[None]:
    """Hooks (and attention forwards) that feed ``accs`` while the block runs; always removed."""
    handles, patched = [], []

    def feed(ts: list[Target], patches: bool) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
            x = _patches(mod, inp[0]) if patches else inp[0]
            for t in ts:
                lo = t.group * t.columns
                accs[t].add_batch(x[:, lo:lo + t.columns] if patches else x)
        return hook

    try:
        for name, m in layers.items():
            if isinstance(m, nn.MultiheadAttention):
                by_src: dict[str, list[HessianAccumulator]] = {}
                for t in targets[name]:
                    by_src.setdefault(t.source, []).append(accs[t])
                m.forward = _mha_forward(m, by_src)  # type: ignore[method-assign]  # instance attribute, removed below
                patched.append(m)
            else:
                handles.append(m.register_forward_pre_hook(feed(targets[name], isinstance(m, (nn.Conv1d, nn.Conv2d)))))
        yield
    finally:
        undo_hooks(handles, patched)


def undo_hooks(handles: list[Any], patched: list[nn.Module]) -> None:
    """Remove forward hooks and the instance ``forward`` a capture put on modules (their class's comes back)."""
    for h in handles:
        h.remove()
    for m in patched:
        del m.forward


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the part of the model that matters has run."""


@contextmanager
def _no_attention_fast_path() -> Iterator[None]:
    """nn.MultiheadAttention's and TransformerEncoderLayer's fused inference path bypasses the module calls that
    calibration observes; turn it off for the run (a global flag, restored)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


# -- planning: blocks, call order, chained trunk ----------------------------------------------------------------
@dataclass
class _Trunk:
    name: str
    children: list[tuple[str, nn.Module]]
    sequential: bool  # a plain nn.Sequential chains its children by definition; a ModuleList is checked


def _under(layer: str, prefix: str) -> bool:
    return prefix == "" or layer == prefix or layer.startswith(prefix + ".")


def _find_trunk(model: nn.Module, layers: dict[str, nn.Module]) -> _Trunk | None:
    """The ModuleList / plain Sequential with the most children holding layers (ties: more layer weights)."""
    best: tuple[tuple[int, int], _Trunk] | None = None
    for name, m in model.named_modules():
        seq = isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
        if "parametrizations." in f".{name}." or not (seq or isinstance(m, nn.ModuleList)):
            continue
        kids = [(f"{name}.{k}" if name else k, c) for k, c in m._modules.items() if c is not None]
        holding = [k for k, _ in kids if any(_under(n, k) for n in layers)]
        size = sum(p.numel() for n, lay in layers.items() if _under(n, name) for p in lay.parameters())
        if len(holding) >= 2 and (best is None or (len(holding), size) > best[0]):
            best = ((len(holding), size), _Trunk(name, kids, seq))
    return None if best is None else best[1]


def _unit_of(layer: str, trunk: _Trunk | None) -> str:
    """The block a layer is compressed with: the trunk child holding it, else the first module on its path that
    is not an ancestor of the trunk (its top-level child when there is no trunk)."""
    parts = layer.split(".") if layer else []
    tparts = trunk.name.split(".") if trunk is not None and trunk.name else []
    i = 0
    while i < len(parts) and i < len(tparts) and parts[i] == tparts[i]:
        i += 1
    return ".".join(parts[: i + 1])  # below the trunk (i == len(tparts)) this is the trunk child


def _same(a: Any, b: Any) -> bool:
    """Equal call arguments: tensors equal, plain values equal; any other object is refused (re-running a block
    with, say, a key/value cache object would change it)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return (a is None or isinstance(a, (bool, int, float, str))) and type(a) is type(b) and a == b


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _hidden(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


class _Trace:
    """One forward pass on a small batch: call order and counts of layers and blocks, which attention calls are
    self-attention, and whether the trunk is chained (checked, not assumed, for a ModuleList)."""

    def __init__(self, model: nn.Module, x: Tensor, names: list[str], trunk: _Trunk | None) -> None:
        self.order: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.attention: dict[str, str] = {}
        self.io: dict[int, list[Any]] = {}
        self.forward_bytes: dict[str, int] = {}  # per unit (a trunk block, or "" for the rest): see _sizer
        kids = {n: i for i, (n, _) in enumerate(trunk.children)} if trunk is not None else {}
        handles = []
        try:
            for n in dict.fromkeys([*names, *kids, *([trunk.name] if trunk is not None else [])]):
                m = model.get_submodule(n)
                handles.append(m.register_forward_pre_hook(self._pre(n, m, kids.get(n)), with_kwargs=True))
                if n in kids:
                    handles.append(m.register_forward_hook(self._post(kids[n])))
            for n, m in model.named_modules():
                if next(m.children(), None) is None or isinstance(m, nn.MultiheadAttention):
                    unit = next((k for k in kids if n == k or n.startswith(k + ".")), "")
                    handles.append(m.register_forward_hook(self._sizer(unit, m), with_kwargs=True))
            model(x)
        finally:
            for h in handles:
                h.remove()
        self.samples = len(x)
        self.chained, self.why = self._check(trunk)

    def _pre(self, name: str, m: nn.Module, index: int | None) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.order.setdefault(name, len(self.order))
            if isinstance(m, nn.MultiheadAttention) and name not in self.attention:
                q, k, v = (args[i] if len(args) > i else kwargs.get(s) for i, s in enumerate(("query", "key", "value")))
                self.attention[name] = "self" if q is k and k is v else "kv" if k is v else "cross"
            if index is not None and index not in self.io:
                self.io[index] = [args, kwargs, None]
        return hook

    def _sizer(self, unit: str, m: nn.Module) -> Callable[..., None]:
        """Adds the bytes of each output of a leaf module (and of nn.MultiheadAttention, also its attention
        scores and their softmax, B x heads x Tq x Tk float32 twice, which no module returns) to its unit: what one
        batch's forward pass through the unit allocates, an upper bound of what it holds at once."""
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            size = _nbytes(out)
            if isinstance(m, nn.MultiheadAttention):
                q, k = (args[i] if len(args) > i else kwargs.get(s) for i, s in enumerate(("query", "key")))
                if isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 3:
                    b, tq, tk = (q.shape[0], q.shape[1], k.shape[1]) if m.batch_first else \
                        (q.shape[1], q.shape[0], k.shape[0])
                    size += 2 * 4 * b * m.num_heads * tq * tk
            self.forward_bytes[unit] = self.forward_bytes.get(unit, 0) + size
        return hook

    def _post(self, index: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if self.io[index][2] is None:
                self.io[index][2] = out
        return hook

    def _check(self, trunk: _Trunk | None) -> tuple[bool, str]:
        if trunk is None:
            return False, "no container of repeated blocks"
        if self.calls.get(trunk.name, 0) != 1 and trunk.sequential:
            return False, f"{trunk.name or 'the model'} runs {self.calls.get(trunk.name, 0)} times per forward"
        for i, (n, _) in enumerate(trunk.children):
            if self.calls.get(n, 0) != 1:
                return False, f"block {n} runs {self.calls.get(n, 0)} times per forward"
            if i and self.order[n] < self.order[trunk.children[i - 1][0]]:
                return False, f"block {n} runs before {trunk.children[i - 1][0]}"
            if i and not trunk.sequential:
                (a0, k0, o0), (a1, k1, _) = self.io[i - 1], self.io[i]
                if not (a1 and isinstance(o0, (Tensor, tuple)) and _same(a1[0], _hidden(o0))):
                    return False, f"block {n} does not receive the output of {trunk.children[i - 1][0]}"
                if not (_same(a1[1:], a0[1:]) and _same(k1, k0)):
                    return False, f"block {n} is called with other arguments than {trunk.children[i - 1][0]}"
        return True, ""


@dataclass
class CalibrationResult:
    """What a calibrated run did: units in the order they were compressed, the layers compressed, the layers
    skipped (with reasons), whether the trunk ran chained from cached inputs, and the memory estimate (bytes)."""

    samples: int
    units: list[str] = field(default_factory=list)
    compressed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    chained: bool = False
    memory: dict[str, Any] = field(default_factory=dict)


def _mib(b: int) -> float:
    return b / 2**20


class _Run:
    def __init__(self, model: nn.Module, samples: Tensor, compress: Compress, *, owner: str, batch_size: int,
                 accept: Callable[[Target], str | None] | None, diagonal_only: bool, dtype: torch.dtype,
                 workspace: Callable[[Target], int] | None) -> None:
        self.model, self.compress, self.owner = model, compress, owner
        self.diagonal_only, self.dtype = diagonal_only, dtype
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.batches = list(samples.split(batch_size))
        layers, skipped = discover_layers(model)
        if not layers:
            raise ValueError(f"{owner}: the model has no layer to compress (Linear, Conv1d, Conv2d, "
                             f"nn.MultiheadAttention, transformers Conv1D); not supported: {skipped}.")
        self.result = CalibrationResult(len(samples), skipped=skipped)
        self.trunk = _find_trunk(model, layers)
        self.unit = {n: _unit_of(n, self.trunk) for n in layers}
        trace = _Trace(model, self.batches[0][:2].to(self.device), [*layers, *set(self.unit.values())], self.trunk)
        self.trace = trace
        self.layers: dict[str, nn.Module] = {}
        self.targets: dict[str, list[Target]] = {}
        for n, m in layers.items():
            if n not in trace.calls:
                skipped[n or "(model)"] = "never called in the forward pass"
                continue
            ts = layer_targets(n, m, trace.attention.get(n, "self"))
            why = next((r for r in map(accept, ts) if r), None) if accept is not None else None
            if why:
                skipped[n or "(model)"] = why
                continue
            self.layers[n], self.targets[n] = m, ts
        for n, why in skipped.items():
            log.info("%s: skipping %s: %s", owner, n, why)
        note_skipped(model, skipped)  # the stage record lists them (compare's row and page too)
        self.hbytes = {n: sum(HessianAccumulator.nbytes(t.columns, dtype, diagonal_only) for t in ts)
                       for n, ts in self.targets.items()}
        self.budget = max(self.hbytes.values(), default=0)
        self._estimate(workspace)
        trace.io.clear()

    def _estimate(self, workspace: Callable[[Target], int] | None) -> None:
        kids = {k for k, _ in self.trunk.children} if self.trunk is not None else set()
        chained = self.trace.chained and any(self.unit[n] in kids for n in self.layers)
        per_sample = max((_nbytes(v[:2]) for v in self.trace.io.values()), default=0) / max(self.trace.samples, 1)
        acts = int(per_sample * self.result.samples) if chained else 0
        work = max((workspace(t) for ts in self.targets.values() for t in ts), default=0) if workspace else 0
        largest = max(self.hbytes, key=self.hbytes.get, default="")
        # one batch through the largest unit (a re-run model passes through every unit, one at a time)
        fwd = int(max(self.trace.forward_bytes.values(), default=0) / max(self.trace.samples, 1)
                  * max((len(b) for b in self.batches), default=0))
        self.result.memory = {"activations": acts, "hessians": self.budget, "workspace": work, "forward": fwd,
                              "peak": acts + self.budget + work + fwd, "largest_layer": largest}
        cols = max((t.columns for t in self.targets.get(largest, [])), default=0)
        log.info("%s: %d calibration samples in %d batches, %d layers in %d blocks%s; peak memory estimate %.2f MiB = "
                 "%.2f MiB block inputs + %.2f MiB Hessians (largest layer %s, %d inputs, %s) + %.2f MiB solver "
                 "workspace + %.2f MiB one batch's forward pass through a block", self.owner, self.result.samples,
                 len(self.batches), len(self.layers), len(set(self.unit[n] for n in self.layers)),
                 " (chained)" if chained else "", _mib(acts + self.budget + work + fwd), _mib(acts), _mib(self.budget),
                 largest or "-", cols, str(self.dtype).removeprefix("torch."), _mib(work), _mib(fwd))

    # -- feeding a block ------------------------------------------------------------------------------------------
    def _rerun(self, unit: str) -> Callable[[], None]:
        """Feed ``unit`` by running the whole model on every batch, stopping once the unit has run."""
        mod, need = self.model.get_submodule(unit), self.trace.calls[unit]
        count = 0

        def stop(m: nn.Module, i: Any, o: Any) -> None:
            nonlocal count
            count += 1
            if count >= need:
                raise _Stop

        def feed() -> None:
            nonlocal count
            h = mod.register_forward_hook(stop)
            try:
                for x in self.batches:
                    count = 0
                    try:
                        self.model(x.to(self.device))
                    except _Stop:
                        pass
            finally:
                h.remove()
        return feed

    def _inputs_of(self, block: nn.Module) -> list[list[Any]]:
        """The (args, kwargs) ``block`` receives on every batch, from the model as it is now."""
        cache: list[list[Any]] = []

        def grab(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cache.append([args, kwargs])
            raise _Stop

        h = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for x in self.batches:
                try:
                    self.model(x.to(self.device))
                except _Stop:
                    pass
        finally:
            h.remove()
        return cache

    def _compress_unit(self, unit: str, feed: Callable[[], None]) -> None:
        names = [n for n in self.layers if self.unit[n] == unit]
        passes: list[list[str]] = []
        size = 0
        for n in names:  # passes whose Hessians together fit the largest layer's: that is the peak
            if not passes or size + self.hbytes[n] > self.budget:
                passes.append([])
                size = 0
            passes[-1].append(n)
            size += self.hbytes[n]
        pending: list[tuple[Target, Tensor]] = []
        for group in passes:
            accs = {t: HessianAccumulator(t.columns, dtype=self.dtype, diagonal_only=self.diagonal_only,
                                          device=self.device) for n in group for t in self.targets[n]}
            with _capturing({n: self.layers[n] for n in group}, self.targets, accs):
                feed()
            for n in group:
                ts = self.targets[n]
                new = self.compress(n, ts, [accs[t] for t in ts])
                pending += [(t, w) for t, w in zip(ts, new, strict=True) if w is not None]
            del accs
        for t, w in pending:  # written when the whole block is done: every layer saw the dense block
            write_target(self.model, t, w)
        self.result.units.append(unit)
        self.result.compressed += names

    def _chain(self, kids: list[tuple[str, nn.Module]]) -> None:
        """The trunk from cached inputs: compress a block, run the inputs through it, go on with its outputs."""
        todo = [i for i, (k, _) in enumerate(kids) if any(self.unit[n] == k for n in self.layers)]
        cache = self._inputs_of(kids[todo[0]][1])
        for i in range(todo[0], todo[-1] + 1):
            name, block = kids[i]
            if i in todo:
                def feed(block: nn.Module = block) -> None:
                    for args, kwargs in cache:
                        block(*args, **kwargs)
                self._compress_unit(name, feed)
            if i < todo[-1]:
                for item in cache:
                    args, kwargs = item
                    item[0] = (_hidden(block(*args, **kwargs)), *args[1:])

    def run(self) -> CalibrationResult:
        units = sorted(set(self.unit[n] for n in self.layers), key=lambda u: self.trace.order.get(u, math.inf))
        children = self.trunk.children if self.trunk is not None else []
        kids = {k for k, _ in children}
        if self.trunk is not None and not self.trace.chained:
            log.info("%s: the blocks of %s are not chained (%s); each block is fed by re-running the model",
                     self.owner, self.trunk.name or "the model", self.trace.why)
        for u in units:
            if u in kids and self.trace.chained:
                if not self.result.chained:
                    self.result.chained = True
                    self._chain(children)
            else:
                self._compress_unit(u, self._rerun(u))
        return self.result


@torch.no_grad()
def compress_sequentially(model: nn.Module, samples: Tensor, compress: Compress, *, owner: str,
                          batch_size: int = 16, accept: Callable[[Target], str | None] | None = None,
                          diagonal_only: bool = False, dtype: torch.dtype = torch.float32,
                          workspace: Callable[[Target], int] | None = None) -> CalibrationResult:
    """Compress ``model`` in place, block by block, on calibration ``samples`` (N, ...) (see the module docstring).

    For each block, every supported layer's targets get a :class:`~netsurgeon.stats.HessianAccumulator` fed with
    their inputs (``diagonal_only``: diag(H) only), then ``compress(layer, targets, stats)`` returns the new weight
    matrix of each target (or None to leave it), written before the next block is fed. ``accept(target)`` returns
    a reason to skip a layer (or None). ``workspace(target)`` is the solver's memory for that target, for the
    estimate logged before any work. The model runs in eval mode, without autograd and with the fused attention
    path off; its training mode is restored.

    Raises:
        ValueError: the model has no supported layer at all.
    """
    was = model.training
    model.eval()
    try:
        with _no_attention_fast_path():
            return _Run(model, samples, compress, owner=owner, batch_size=batch_size, accept=accept,
                        diagonal_only=diagonal_only, dtype=dtype, workspace=workspace).run()
    finally:
        model.train(was)
