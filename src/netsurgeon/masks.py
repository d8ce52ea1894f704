"""Masks as parametrizations: the mask is a buffer on the module, so ``state_dict`` carries it.

A mask value of 1 means keep, 0 means pruned. Two gradient rules:

* :class:`Mask` -- forward ``W * T``, gradient ``T * dL/d(W*T)``: pruned weights get no gradient.
* :class:`StraightThroughMask` -- forward ``W * T``, gradient ``dL/d(W*T)`` for *every* entry of W. Dynamic
  Network Surgery (Guo et al. 2016, Sec. 3.2, the weight update after Eq. (1)) needs this so that a pruned
  weight keeps evolving and can be spliced back.

Tensors are named by fully-qualified names such as ``"fc1.weight"``.

**Coverage by layer, never refusal by model.** :func:`weight_sites` finds every weight a method can work on, in any
``nn.Module``: Linear (and its subclasses, e.g. ``nn.MultiheadAttention``'s ``out_proj``), Conv1d/Conv2d (grouped
and depthwise included), ``nn.Embedding`` rows, ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (or its
separate q/k/v projections) and Hugging Face's ``Conv1D`` (a Linear stored transposed). Everything else is left as
it is and listed by :func:`skipped_layers` with the reason: normalization layers (BatchNorm, LayerNorm, GroupNorm,
RMSNorm), bare parameters (a ViT class token, a positional embedding, ConvNeXt's layer scale), and modules no method
here supports (an LSTM). A method refuses a model only when it holds nothing the method supports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "Mask", "StraightThroughMask", "SUPPORTED_LAYERS", "prunable_layers", "prunable_tensors", "WeightSite",
    "weight_sites", "skipped_layers", "SITE_KINDS", "site_kind_of", "take_skipped", "note_skipped", "sites_of",
    "tied_parameters",
    "attach_masks", "get_masks", "original", "bake", "LayerSparsity", "sparsity_report",
    "attach_masks_for_state_dict", "effective_state_dict", "layer_kind", "LAYER_KINDS", "freeze_masks", "mask_zeros",
    "parse_nm", "nm_mask", "weight_matrix",
]

# Grouped and depthwise convolutions are ordinary Conv1d/Conv2d modules with ``groups > 1``.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Layers that hold parameters but are never compressed; they are left as they are (and listed).
_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
                                       *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
# How a weight is read as a matrix (rows = outputs): the kinds of weight a method can be asked to cover.
SITE_KINDS = ("linear", "conv", "embedding", "attention", "transposed")


@dataclass(frozen=True)
class WeightSite:
    """One weight a method can compress: ``module.attr`` of ``kind`` (see :data:`SITE_KINDS`).

    ``linear``: (out, in); ``conv``: (out, in/groups, *k); ``embedding``: (tokens, dim), one row per token;
    ``attention``: ``nn.MultiheadAttention``'s packed (3·E, E) projection of queries, keys and values (or one of its
    separate q/k/v projections) and its ``out_proj`` (a Linear its parent uses as a function: forward hooks on it
    never run, so methods that hook a layer's input leave it); ``transposed``: Hugging Face's ``Conv1D``, a Linear
    stored as (in, out).
    """

    module: str
    attr: str
    kind: str

    @property
    def fqn(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr

    @property
    def layer_kind(self) -> str:
        """The per-kind option key that covers it: ``conv``, ``embedding`` or ``fc``."""
        return {"conv": "conv", "embedding": "embedding"}.get(self.kind, "fc")

    def bias(self) -> str | None:
        """The name of the bias that goes with this weight, if the module has one (checked by the caller)."""
        return {"in_proj_weight": "in_proj_bias", "weight": "bias"}.get(self.attr)


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): weight (nx, nf), forward x @ W + b; recognised without importing it, also
    once masked (a parametrized module's class is ``ParametrizedConv1D``)."""
    w = getattr(m, "weight", None)
    return parametrize.type_before_parametrizations(m).__name__ == "Conv1D" and hasattr(m, "nf") \
        and isinstance(w, torch.Tensor) and w.dim() == 2


def site_kind_of(m: nn.Module) -> list[tuple[str, str]]:
    """The (attr, kind) weight sites module ``m`` owns directly (empty when it owns none)."""
    if isinstance(m, nn.Linear):
        return [("weight", "linear")]
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return [("weight", "conv")]
    if isinstance(m, nn.Embedding):
        return [("weight", "embedding")]
    if isinstance(m, nn.MultiheadAttention):
        if m.in_proj_weight is not None or parametrize.is_parametrized(m, "in_proj_weight"):
            return [("in_proj_weight", "attention")]
        return [(a, "attention") for a in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    if is_hf_conv1d(m):
        return [("weight", "transposed")]
    return []


def _direct_params(m: nn.Module) -> list[str]:
    """Names of the parameters ``m`` owns itself (a parametrized tensor counts under its own name)."""
    names = [n for n, _ in m.named_parameters(recurse=False)]
    if parametrize.is_parametrized(m):
        names += list(m.parametrizations.keys())
    return names


def weight_sites(model: nn.Module, kinds: Iterable[str] = SITE_KINDS) -> list[WeightSite]:
    """Every weight of ``model`` of the given kinds, in module order (see the module docstring)."""
    want = set(kinds)
    tied = tied_parameters(model)
    out, attention = [], []
    for name, m in model.named_modules():
        if _is_parametrization(name, m):
            continue
        if isinstance(m, nn.MultiheadAttention):
            attention.append(name + ".")
        kinds_here = site_kind_of(m)
        if isinstance(m, nn.Linear) and any(name.startswith(a) for a in attention):
            kinds_here = [("weight", "attention")]  # out_proj: used functionally by its parent, never called
        out += [WeightSite(name, attr, kind) for attr, kind in kinds_here
                if kind in want and f"{name}.{attr}".lstrip(".") not in tied]
    return out


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{fqn: fqn of the other}`` for every parameter object two modules share (GPT-2's ``lm_head.weight`` is its
    token embedding). A method leaves tied weights as they are: a mask or codebook on one module would untie it."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {n: next(o for o in names if o != n) for names in owners.values() if len(names) > 1 for n in names}


def skipped_layers(model: nn.Module, kinds: Iterable[str] = SITE_KINDS) -> dict[str, str]:
    """``{module name: why}`` for every module that owns parameters a method covering ``kinds`` leaves as they
    are: normalization layers, bare parameters, weights of other kinds, and modules no method supports."""
    every = {}
    for site in weight_sites(model):
        every.setdefault(site.module, []).append(site)
    covered = {(s.module, s.attr) for s in weight_sites(model, kinds)}
    tied = tied_parameters(model)
    out = {}
    for name, m in model.named_modules():
        own = _direct_params(m)
        if not own or _is_parametrization(name, m):
            continue
        label = name or "(the model itself)"
        sites = every.get(name, [])
        kept = [s for s in sites if (s.module, s.attr) in covered]
        ties = [f"{a} is tied to {tied[f'{name}.{a}'.lstrip('.')]}" for a in own if f"{name}.{a}".lstrip(".") in tied]
        if ties:
            out[label] = (f"{type(m).__name__}: {', '.join(ties)}; kept as it is (compressing one of two layers "
                          "that share a weight would untie them)")
        elif isinstance(m, _NORMS) or "Norm" in type(m).__name__:
            out[label] = f"{type(m).__name__}: a normalization layer, kept as it is"
        elif sites and not kept:
            out[label] = f"{type(m).__name__}: {sites[0].kind} weights are not covered by this method, kept as they are"
        elif not sites:
            out[label] = (f"{type(m).__name__}: parameter(s) {', '.join(own)} kept as they are (no method here "
                          "compresses this kind of layer)" if type(m).__module__.startswith("torch.nn")
                          else f"{type(m).__name__}: bare parameter(s) {', '.join(own)} kept as they are")
        else:
            extra = sorted(set(own) - {s.attr for s in kept} - {"bias", "in_proj_bias"})
            if extra:
                out[label] = f"{type(m).__name__}: parameter(s) {', '.join(extra)} kept as they are"
    return out


class Mask(nn.Module):
    """Parametrization ``W -> W * mask``; the gradient of pruned entries is zero."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


class StraightThroughMask(Mask):
    """Parametrization ``W -> W * mask`` whose gradient reaches every entry of W (DNS, Sec. 3.2)."""

    def forward(self, w: Tensor) -> Tensor:
        return w + (w * self.mask - w).detach()


LAYER_KINDS = ("conv", "fc", "embedding")  # the layer types per-layer options may name instead of a layer


def layer_kind(module: nn.Module) -> str:
    """``"conv"`` for a convolution, ``"embedding"`` for an embedding, ``"fc"`` otherwise: the layer types that
    per-type options name."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    return "embedding" if isinstance(module, nn.Embedding) else "fc"


def prunable_layers(model: nn.Module, owner: str = "netsurgeon",
                    kinds: Iterable[str] = ("linear", "conv")) -> dict[str, nn.Module]:
    """``{module_name: module}`` for every layer whose ``weight`` is a site of ``kinds`` (default: Linear and
    Conv1d/Conv2d, the layers whose semantics some methods need). Other modules are left as they are; the first
    call per model and owner logs them (:func:`skipped_layers`).

    Raises:
        ValueError: the model has no such layer at all (naming the kinds and what it does hold).
    """
    kinds = tuple(kinds)
    out = {s.module: model.get_submodule(s.module) for s in weight_sites(model, kinds) if s.attr == "weight"}
    if not out:
        raise ValueError(f"{owner}: the model has no {_kinds_text(kinds)} layer to compress"
                         + _holds_text(model) + ".")
    _log_skipped(model, owner, kinds)
    return out


def sites_of(model: nn.Module, owner: str = "netsurgeon",
             kinds: Iterable[str] = SITE_KINDS) -> list[tuple[WeightSite, nn.Module]]:
    """Every weight site of ``kinds`` with its module: what an elementwise method (pruning, sharing,
    quantization) works on. The rest is left as it is (logged once and noted for the stage record).

    Raises:
        ValueError: the model holds no weight of those kinds.
    """
    kinds = tuple(kinds)
    sites = weight_sites(model, kinds)
    if not sites:
        raise ValueError(f"{owner}: the model has no {_kinds_text(kinds)} weight to compress{_holds_text(model)}.")
    _log_skipped(model, owner, kinds)
    return [(site, model.get_submodule(site.module)) for site in sites]


def _kinds_text(kinds: Iterable[str]) -> str:
    names = {"linear": "Linear", "conv": "Conv1d/Conv2d", "embedding": "Embedding", "attention": "attention",
             "transposed": "Conv1D (Hugging Face)"}
    return ", ".join(names[k] for k in kinds)


def _holds_text(model: nn.Module) -> str:
    skipped = skipped_layers(model)
    return f" (it holds: {'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])})" if skipped else ""


_LOGGED: set[tuple[int, str, tuple[str, ...]]] = set()


def _log_skipped(model: nn.Module, owner: str, kinds: tuple[str, ...]) -> None:
    """Note on the model (for the pipeline's stage record, :func:`take_skipped`) and log once per (model, owner,
    kinds) what a method leaves as it is."""
    skipped = skipped_layers(model, kinds)
    if not skipped:
        return
    note_skipped(model, skipped)
    key = (id(model), owner, kinds)
    if key not in _LOGGED:
        _LOGGED.add(key)
        import logging

        logging.getLogger(__name__).info("%s: left as they are: %s", owner,
                                         "; ".join(f"{k} ({v})" for k, v in skipped.items()))


_SKIPPED_ATTR = "_netsurgeon_skipped"


def note_skipped(model: nn.Module, skipped: dict[str, str]) -> None:
    """Note ``{layer: why}`` a method left as it is, for the pipeline's stage record (:func:`take_skipped`)."""
    notes = getattr(model, _SKIPPED_ATTR, None) or {}
    object.__setattr__(model, _SKIPPED_ATTR, {**notes, **skipped})


def take_skipped(model: nn.Module) -> dict[str, str]:
    """What methods noted as left as it is since the last call (``{layer: why}``), and forget it."""
    notes = getattr(model, _SKIPPED_ATTR, None) or {}
    object.__setattr__(model, _SKIPPED_ATTR, {})
    return dict(notes)


def _own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _is_parametrization(name: str, m: nn.Module) -> bool:
    """Masks, k-means codebooks, gates: modules that live inside a layer's ``parametrizations``."""
    return isinstance(m, (parametrize.ParametrizationList, Mask)) or "parametrizations." in f".{name}."


def prunable_tensors(model: nn.Module, include_bias: bool = False, owner: str = "netsurgeon",
                     kinds: Iterable[str] = SITE_KINDS) -> list[str]:
    """FQNs of the tensors a method covering ``kinds`` compresses: every weight site's tensor (and its bias, if
    asked and present). Every other parameter is left as it is (logged once, :func:`skipped_layers`).

    Raises:
        ValueError: the model holds no weight of those kinds.
    """
    kinds = tuple(kinds)
    names = []
    for site in weight_sites(model, kinds):
        names.append(site.fqn)
        bias = site.bias()
        if include_bias and bias is not None and getattr(model.get_submodule(site.module), bias, None) is not None:
            names.append(f"{site.module}.{bias}" if site.module else bias)
    if not names:
        raise ValueError(f"{owner}: the model has no {_kinds_text(kinds)} weight to compress{_holds_text(model)}.")
    _log_skipped(model, owner, kinds)
    return names


def _split(fqn: str) -> tuple[str, str]:
    mod, _, attr = fqn.rpartition(".")
    return mod, attr


def attach_masks(model: nn.Module, tensors: Iterable[str] | None = None, *, straight_through: bool = False,
                 include_bias: bool = False) -> dict[str, Mask]:
    """Attach an all-ones mask to each tensor (default: every prunable weight). Modifies ``model`` in place.

    A tensor that already has a mask keeps its mask values; only its gradient rule follows
    ``straight_through``. Returns ``{fqn: mask_parametrization}``.
    """
    names = list(tensors) if tensors is not None else prunable_tensors(model, include_bias)
    cls = StraightThroughMask if straight_through else Mask
    out: dict[str, Mask] = {}
    for fqn in names:
        mod_name, attr = _split(fqn)
        module = model.get_submodule(mod_name)
        if parametrize.is_parametrized(module, attr):
            p = module.parametrizations[attr][0]
            if not isinstance(p, Mask):
                raise ValueError(f"attach_masks: {fqn!r} already has a parametrization {type(p).__name__}.")
            p.__class__ = cls  # same buffers, other gradient rule
            out[fqn] = p
            continue
        t = getattr(module, attr, None)
        if not isinstance(t, nn.Parameter):
            raise ValueError(f"attach_masks: module {mod_name!r} has no parameter {attr!r}.")
        p = cls(torch.ones_like(t, dtype=t.dtype))
        parametrize.register_parametrization(module, attr, p, unsafe=True)
        out[fqn] = p
    return out


def get_masks(model: nn.Module) -> dict[str, Mask]:
    """``{fqn: mask_parametrization}`` for every masked tensor of ``model``."""
    out: dict[str, Mask] = {}
    for mod_name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                if isinstance(plist[0], Mask):
                    out[f"{mod_name}.{attr}" if mod_name else attr] = plist[0]
    return out


def original(model: nn.Module, fqn: str) -> nn.Parameter:
    """The trainable tensor behind ``fqn``: the unmasked original if masked, else the parameter itself."""
    mod_name, attr = _split(fqn)
    module = model.get_submodule(mod_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def bake(model: nn.Module) -> nn.Module:
    """Multiply masks into the weights and remove the parametrizations. Modifies ``model`` in place."""
    for fqn in get_masks(model):
        mod_name, attr = _split(fqn)
        parametrize.remove_parametrizations(model.get_submodule(mod_name), attr, leave_parametrized=True)
    return model


@torch.no_grad()
def freeze_masks(model: nn.Module) -> nn.Module:
    """Make every mask a plain :class:`Mask` (no gradient to pruned entries) and zero the hidden originals of
    pruned weights, so later training keeps them at zero. Modifies ``model`` in place and returns it."""
    for fqn, p in get_masks(model).items():
        p.__class__ = Mask
        original(model, fqn).mul_(p.mask)
    return model


@torch.no_grad()
def mask_zeros(model: nn.Module, tensors: Iterable[str] | None = None) -> dict[str, Mask]:
    """Attach (or tighten) masks so that every weight that is exactly zero now stays zero. In place."""
    masks = attach_masks(model, tensors)
    for fqn, p in masks.items():
        p.mask.mul_((original(model, fqn) != 0).to(p.mask.dtype))
    return masks


@torch.no_grad()
def effective_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict a plain (unmasked) copy of ``model`` would have: masks multiplied in, masks dropped.

    Does not copy the model: ``remove_parametrizations`` on a deep copy would delete the property from
    the parametrized class that the original shares.
    """
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key and not key.startswith("parametrizations."):
            out[key] = value
            continue
        mod_name, _, rest = key.rpartition("parametrizations.")
        attr, _, tail = rest.partition(".")
        if tail == "original":
            mod_name = mod_name.rstrip(".")
            out[f"{mod_name}.{attr}" if mod_name else attr] = getattr(
                model.get_submodule(mod_name), attr).detach().clone()
    return out


def attach_masks_for_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Attach masks to ``model`` for every ``*.parametrizations.<attr>.0.mask`` key of ``state_dict``.

    Lets a plain model receive the state of a masked one. Modifies ``model`` in place.
    """
    suffix = ".0.mask"
    names = []
    for key in state_dict:
        if key.endswith(suffix) and ".parametrizations." in key:
            mod_name, _, attr = key[: -len(suffix)].partition(".parametrizations.")
            names.append(f"{mod_name}.{attr}" if mod_name else attr)
    missing = [n for n in names if n not in get_masks(model)]
    if missing:
        attach_masks(model, missing)


@dataclass(frozen=True)
class LayerSparsity:
    """Nonzero count of one tensor; ``kept`` is the fraction of nonzero entries."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int

    @property
    def kept(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0


@torch.no_grad()
def sparsity_report(model: nn.Module, include_bias: bool = True) -> list[LayerSparsity]:
    """Per-tensor nonzero counts of the effective (masked) weights of every weight site (and their biases)."""
    rows = []
    for site in weight_sites(model):
        m = model.get_submodule(site.module)
        bias = site.bias() if include_bias else None
        for attr in (site.attr, *((bias,) if bias else ())):
            t = getattr(m, attr, None)
            if t is not None:
                name = f"{site.module}.{attr}" if site.module else attr
                rows.append(LayerSparsity(name, tuple(t.shape), t.numel(), int((t != 0).sum())))
    return rows


# -- N:M semi-structured sparsity ------------------------------------------------------------------------------
def parse_nm(owner: str, pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M): keep N of every M consecutive inputs of a row, 0 < N < M.

    N counts the weights *kept* (NVIDIA's 2:4 keeps 2 of 4). The SparseGPT and Wanda code count the weights
    *pruned* (``prunen``); the two agree for 2:4 and 4:8.
    """
    if pattern == "unstructured":
        return None
    n, sep, m = str(pattern).partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m) <= 256:
        return int(n), int(m)
    raise ValueError(f"{owner}: pattern must be 'unstructured' or 'N:M' with 0 < N < M <= 256 (e.g. '2:4'); "
                     f"got {pattern!r}.")


def weight_matrix(t: Tensor, kind: str = "linear") -> Tensor:
    """A weight-shaped tensor as the (out, in·k) matrix its rows are outputs of (a view): Hugging Face's ``Conv1D``
    (``kind="transposed"``) stores (in, out) and is transposed; a convolution's (out, in/groups, *k) is flattened."""
    return t.T if kind == "transposed" else t.reshape(t.shape[0], -1)


def nm_mask(scores: Tensor, n: int, m: int, kind: str = "linear") -> Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries along the input dimension: a 0/1 mask.

    ``scores`` has the weight's shape, read as (out, in·k) by :func:`weight_matrix` (``kind`` is the site's kind,
    :data:`SITE_KINDS`: a ``transposed`` Conv1D's (in, out) is transposed first); groups run along the flattened
    input dimension of each output (in x kernel for a convolution), as in SparseGPT's and Wanda's code. Ties go to
    the earlier position. Raises ValueError when that dimension is not a multiple of ``m``. Shapes: the weight's
    -> the weight's, dtype of ``scores``.
    """
    flat = weight_matrix(scores, kind)
    if flat.shape[1] % m:
        raise ValueError(f"nm_mask: the input dimension {flat.shape[1]} is not a multiple of M={m}.")
    groups = flat.reshape(flat.shape[0], -1, m)                                # (out, in/m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups).scatter_(-1, order[..., :n], 1.0).reshape(flat.shape)
    return keep.T.contiguous() if kind == "transposed" else keep.reshape(scores.shape)
