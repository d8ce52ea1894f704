"""Attention head pruning (Michel, Levy, Neubig 2019, "Are Sixteen Heads Really Better than One?", NeurIPS 2019,
arXiv:1905.10650): remove whole heads, so the attention layers get smaller projections.

Sec. 2 of the paper writes multi-head attention as a sum over heads, each head's output multiplied by a mask
variable ξ_h ∈ {0, 1}: MHAtt(x, q) = Σ_h ξ_h · Att_h(x, q). Sec. 4.1 scores a head by the expected sensitivity of
the loss to its mask, I_h = E_x |∂L(x)/∂ξ_h|, which by the chain rule is E_x |Att_h(x)ᵀ ∂L(x)/∂Att_h(x)|, a
first-order Taylor estimate of the loss change when the head goes (Molchanov et al. 2017); the scores are then
normalized per layer by their ℓ2 norm and heads are pruned globally, least important first. (Section numbers
from the paper as recalled; the PDF was not at hand to check them, so no equation numbers are given.) Here a gate
ξ of ones per head and per calibration sample multiplies each head's output before the output projection; one
backward pass gives ∂L_x/∂ξ_h for every sample x, and I_h is the mean of their absolute values over the samples
(the authors' released code, as recalled and not checked here, takes |·| of each batch's summed gradient).

``importance="l1"`` is a data-free baseline (not from the paper): the l1 norm of all weights of the head (its
query, key and value rows and its columns of the output projection).

The removal (``changes/heads.py``) slices the projections: the pruned model computes exactly what the model with
those heads' gates at 0 computes (tested), with fewer parameters and FLOPs. The paper prunes without retraining;
follow this stage with ``finetune`` to recover.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import CalibratedConfig, _no_attention_fast_path, undo_hooks
from ..changes.heads import AttentionSite, attention_sites, head_blocks, record_heads, shrink_heads
from ..data import Split
from ..data.core import batches
from ..devices import model_device
from ..plan import oneshot_then_finetuned
from ..registry import StageContext, option, register
from ..train import flat_predictions

log = logging.getLogger(__name__)

__all__ = ["HeadsConfig", "find_attention", "head_gates", "l1_importance", "taylor_importance", "select_heads",
           "prune_heads"]


def find_attention(model: nn.Module, owner: str = "heads") -> list[AttentionSite]:
    """The attention layers of ``model`` whose heads can be removed; a one-line ValueError when there is none
    (head pruning applies to attention only) or when the weights are parametrized (masks, codebooks)."""
    from torch.nn.utils import parametrize

    sites, skipped = attention_sites(model)
    if not sites:
        why = f" (found but not supported: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
        raise ValueError(f"{owner}: the model has no attention layer (nn.MultiheadAttention or a Hugging Face "
                         f"GPT-2/BERT/ViT-style attention){why}; head pruning applies to attention only.")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(f"{owner}: the model holds masks or codebooks (parametrized weights); remove heads first, "
                         "then prune or share weights.")
    for name, why in skipped.items():
        log.info("%s: attention layer %s left as it is: %s", owner, name, why)
    return sites


def _gated(x: Tensor, g: Tensor, batch_dim: int | None) -> Tensor:
    """``x`` (..., heads·d) with head h scaled by g[h] (g: (heads,)) or, per sample, g[b, h] (g: (B, heads))."""
    hx = x.unflatten(-1, (g.shape[-1], -1))  # (..., heads, d)
    if g.dim() == 1 or batch_dim is None:  # one gate for all; an unbatched input is one sample (row 0)
        return (hx * (g if g.dim() == 1 else g[0])[:, None]).flatten(-2)
    if hx.shape[batch_dim] != g.shape[0]:
        raise ValueError(f"heads: an attention layer saw {hx.shape[batch_dim]} sequences for a batch of {g.shape[0]} "
                         "samples; per-sample head gates need one sequence per sample (use importance=l1).")
    shape = [1] * hx.dim()
    shape[batch_dim], shape[-2] = g.shape[0], g.shape[1]
    return (hx * g.view(shape)).flatten(-2)


def _mha_forward(mha: nn.MultiheadAttention, gate: Tensor) -> Any:
    """nn.MultiheadAttention's forward with its heads' output gated before ``out_proj`` (which the module applies
    functionally: it runs with an exact identity projection, then the gate and the real one are applied)."""
    cls_forward, real = type(mha).forward, mha.out_proj
    w = real.weight
    ident = nn.Linear(mha.embed_dim, mha.embed_dim, bias=real.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        ident.weight.copy_(torch.eye(mha.embed_dim, dtype=w.dtype, device=w.device))
        if ident.bias is not None:
            ident.bias.zero_()

    def forward(query: Tensor, *args: Any, **kwargs: Any) -> Any:
        mha.out_proj = ident
        try:
            heads, weights = cls_forward(mha, query, *args, **kwargs)
        finally:
            mha.out_proj = real
        batch_dim = None if query.dim() == 2 else 0 if mha.batch_first else 1
        return F.linear(_gated(heads, gate, batch_dim), real.weight, real.bias), weights

    return forward


def _out_projection(site: AttentionSite) -> tuple[nn.Module, int | None]:
    """The module whose input is the concatenated heads of a non-``mha`` site, and that input's batch axis."""
    m = site.module
    if site.kind == "head":
        return m.out_proj, 0 if m.batch_first else 1
    return {"gpt2": lambda: m.c_proj, "qkvo": lambda: m.o_proj, "bert": lambda: m.output.dense}[site.kind](), 0


@contextmanager
def head_gates(model: nn.Module, gates: dict[str, Tensor]) -> Iterator[None]:
    """While inside, each attention layer named in ``gates`` scales head h's output by ``gates[name][h]`` (or, for a
    (B, heads) gate, sample b's by ``[b, h]``) before its output projection: ξ_h of Michel et al. Sec. 2. Gates of
    0/1 give the head-masked model; torch's fused attention path is off meanwhile. Hooks are removed on exit."""
    handles, patched = [], []
    sites = {s.name: s for s in attention_sites(model)[0]}
    try:
        with _no_attention_fast_path():
            for name, g in gates.items():
                site = sites.get(name)
                if site is None:
                    raise ValueError(f"head_gates: {name!r} is not an attention layer whose heads can be gated.")
                if g.shape[-1] != site.num_heads:
                    raise ValueError(f"head_gates: {name!r} has {site.num_heads} heads; got a gate of shape "
                                     f"{tuple(g.shape)}.")
                if site.kind == "mha":
                    site.module.forward = _mha_forward(site.module, g)  # type: ignore[method-assign]
                    patched.append(site.module)
                    continue
                proj, bdim = _out_projection(site)

                def pre(mod: nn.Module, args: tuple[Any, ...], g: Tensor = g, bdim: int | None = bdim) -> Any:
                    x = args[0]
                    return (_gated(x, g, bdim if x.dim() == 3 else None), *args[1:])

                handles.append(proj.register_forward_pre_hook(pre))
            yield
    finally:
        undo_hooks(handles, patched)


@torch.no_grad()
def l1_importance(site: AttentionSite) -> Tensor:
    """Σ|w| over every weight of each head (query, key, value rows; output projection columns). -> (heads,)."""
    s = torch.zeros(site.num_heads, device="cpu")  # summed on the host
    for b in head_blocks(site):
        if not b.weight:
            continue
        owner = site.module.get_submodule(b.owner) if b.owner else site.module
        t = getattr(owner, b.attr).detach().abs().float()
        width = site.num_heads * site.head_dim
        for off in b.offsets:
            part = t.narrow(b.axis, off, width).movedim(b.axis, 0)  # (heads·d, ...)
            s += part.reshape(site.num_heads, -1).sum(1).cpu()
    return s


def _calibration(data: Any, samples: int, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``samples`` labelled samples in batches: drawn without replacement (seeded) from a Split, or the first ones
    of a loader's batches."""
    if isinstance(data, Split):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data), generator=g, device="cpu")[:samples].sort().values
        for i in range(0, len(idx), batch_size):
            yield data.x[idx[i:i + batch_size]], data.y[idx[i:i + batch_size]]
        return
    have = 0
    for x, y in batches(data):
        take = min(len(x), samples - have)
        for i in range(0, take, batch_size):
            yield x[i:min(i + batch_size, take)], y[i:min(i + batch_size, take)]
        have += take
        if have >= samples:
            return


def taylor_importance(model: nn.Module, sites: list[AttentionSite], data: Any, *, samples: int = 128,
                      batch_size: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """I_h = E_x |∂L(x)/∂ξ_h| (Michel et al. 2019, Sec. 4.1) over ``samples`` training samples: per layer, (heads,).
    L(x) is the cross-entropy of sample x (a language model's: the mean over its tokens). The model runs in eval
    mode (no dropout); its weights get no gradient."""
    return gate_importance(model, {s.name: s.num_heads for s in sites}, head_gates, data, samples=samples,
                           batch_size=batch_size, seed=seed, owner="heads")


def gate_importance(model: nn.Module, widths: dict[str, int], gated: Callable[[nn.Module, dict[str, Tensor]], Any],
                    data: Any, *, samples: int, batch_size: int, seed: int, owner: str) -> dict[str, Tensor]:
    """E_x |∂L(x)/∂ξ| for gates ξ of ones, ``widths[name]`` per site, that the context manager ``gated(model,
    gates)`` multiplies into the model's forward (heads' outputs, FFN neurons' activations): per site, (width,).
    One gate per sample, so each sample's |gradient| counts on its own (Michel et al. 2019, Sec. 4.1)."""
    total = {name: torch.zeros(w, device="cpu") for name, w in widths.items()}  # summed on the host
    n = 0
    was = model.training
    dev = model_device(model)  # the gates multiply activations: beside them
    model.eval()
    try:
        for x, y in _calibration(data, samples, batch_size, seed):
            gates = {name: torch.ones(len(x), w, requires_grad=True, device=dev) for name, w in widths.items()}
            with gated(model, gates):
                out = model(x)
            logits, t = flat_predictions(out, y)
            per_sample = F.cross_entropy(logits.float(), t, reduction="none").reshape(len(x), -1).mean(1)
            grads = torch.autograd.grad(per_sample.sum(), list(gates.values()), allow_unused=True)
            for name, g in zip(gates, grads, strict=True):
                if g is not None:
                    total[name] += g.detach().abs().sum(0).cpu()
            n += len(x)
    finally:
        model.train(was)
    if n == 0:
        raise ValueError(f"{owner}: the training data gave no sample; taylor importance needs calibration samples.")
    return {k: v / n for k, v in total.items()}


def select_heads(scores: dict[str, Tensor], fraction: float, *, scope: str = "global", normalize: bool = True,
                 min_heads: int = 1) -> dict[str, list[int]]:
    """The heads each layer keeps (sorted indices) when ``fraction`` of the heads with the lowest scores go: of all
    heads at once (``scope="global"``, scores first divided by their layer's ℓ2 norm when ``normalize``, as Michel
    et al. Sec. 4.1 do) or of each layer (``scope="layer"``). Every layer keeps at least ``min_heads``. Ties: the
    earlier layer and head go first."""
    if scope not in ("global", "layer"):
        raise ValueError(f"heads: scope must be 'global' or 'layer'; got {scope!r}.")
    s = {k: (v / v.norm().clamp_min(1e-30) if normalize else v).double() for k, v in scores.items()}
    drop: dict[str, set[int]] = {k: set() for k in s}
    if scope == "layer":
        for k, v in s.items():
            n = min(int(round(fraction * len(v))), max(len(v) - min_heads, 0))
            drop[k] = set(torch.sort(v, stable=True).indices[:n].tolist())
    else:
        order = sorted((float(v[h]), i, h, k) for i, (k, v) in enumerate(s.items()) for h in range(len(v)))
        budget = int(round(fraction * len(order)))
        for _, _, h, k in order:
            if budget == 0:
                break
            if len(s[k]) - len(drop[k]) > min_heads:
                drop[k].add(h)
                budget -= 1
    return {k: [h for h in range(len(v)) if h not in drop[k]] for k, v in s.items()}


def prune_heads(model: nn.Module, keep: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Remove every head not in ``keep[layer]`` (indices among the layer's current heads), in place, and record the
    change so a ``.nsz`` file rebuilds the smaller model. Returns per shrunk layer its heads before and after and
    the kept ones as indices of the layer as built."""
    sites = {s.name: s for s in find_attention(model)}
    unknown = sorted(set(keep) - set(sites))
    if unknown:
        raise ValueError(f"heads: {unknown[0]!r} is not an attention layer whose heads can be removed; choose from "
                         f"{sorted(sites)}.")
    out, record = {}, {}
    for name, k in keep.items():
        site = sites[name]
        if list(k) == list(range(site.num_heads)):
            continue
        new = shrink_heads(model, site, list(k))
        out[name] = {"before": site.num_heads, "after": new.num_heads, "kept": new.original}
        record[name] = new.original
    if record:
        record_heads(model, record)
    return out


@dataclass(frozen=True)
class HeadsConfig(CalibratedConfig):
    owner: ClassVar[str] = "heads"
    fraction: float = option(0.5, "fraction of the attention heads removed (every layer keeps at least one)", low=0,
                             high=1, high_open=True)
    importance: str = option("taylor", "head score: taylor (Michel et al. 2019: E|dL/dgate|, needs data) or l1 (the "
                                       "l1 norm of the head's weights, no data)", choices=("taylor", "l1"))
    scope: str = option("global", "rank all heads together (global, as the paper) or remove the fraction from each "
                                  "layer (layer)", choices=("global", "layer"))
    normalize: bool = option(True, "divide each layer's scores by their l2 norm before a global ranking (Sec. 4.1)")


@register("heads", family="structured", kind="oneshot", config=HeadsConfig,
          needs_data=lambda cfg: cfg.importance == "taylor",
          compare=oneshot_then_finetuned("heads", fraction=0.5), quick={"fraction": 0.5, "samples": 16},
          citation="Michel, Levy, Neubig 2019 (NeurIPS), Are Sixteen Heads Really Better than One?, "
                   "arXiv:1905.10650, Sec. 2 (head masks) and Sec. 4.1 (importance I_h)",
          summary="remove whole attention heads with the lowest importance; attention layers get smaller projections")
def _run_heads(model: nn.Module, cfg: HeadsConfig, ctx: StageContext) -> dict[str, Any]:
    sites = find_attention(model)  # refuses a model without attention before any work
    if cfg.importance == "taylor":
        data = ctx.require_data("heads")
        scores = taylor_importance(model, sites, getattr(data, "train", data), samples=cfg.samples,
                                   batch_size=cfg.batch_size, seed=cfg.seed)
    else:
        scores = {s.name: l1_importance(s) for s in sites}
    keep = select_heads(scores, cfg.fraction, scope=cfg.scope, normalize=cfg.normalize)
    layers = prune_heads(model, keep)
    before = sum(s.num_heads for s in sites)
    after = before - sum(v["before"] - v["after"] for v in layers.values())
    log.info("heads: %d of %d attention heads kept in %d layers", after, before, len(sites))
    return {"heads_before": before, "heads_after": after, "layers": layers,
            "importance": {k: [round(float(x), 6) for x in v] for k, v in scores.items()}}
