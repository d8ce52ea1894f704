"""FFN-neuron pruning: remove hidden neurons of feed-forward blocks (two Linear layers with an elementwise
activation between them), so both layers physically shrink.

A feed-forward block computes ``W2 · act(W1 · x + b1) + b2``; hidden neuron j is row j of ``W1`` and ``b1`` and
column j of ``W2``. Removing it from both is exact: the shrunk block computes what the block computes with neuron j's
activation set to 0 (tested). The d-wide input and output of the block (a transformer's residual stream) are never
touched: only the hidden axis between the two layers shrinks, so nothing else in the model has to follow.

Blocks are found by their structure (duck typing; nothing imports ``transformers``):

- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: ``linear1`` -> activation -> dropout ->
  ``linear2`` (the activation must be elementwise: relu, gelu or a known activation module);
- a Linear followed, inside one ``nn.Sequential``, by elementwise modules only (activations, dropout, identity) and
  another Linear: the zoo's ``gpt`` / ``gpt2_decoder`` (``mlp.fc1``/``mlp.fc2``), ``gpt2_ffn``, any MLP;
- Hugging Face GPT-2's MLP (``c_fc``/``c_proj``, ``Conv1D``: weights stored (in, out)), BERT's and ViT's layers
  (``intermediate.dense``/``output.dense``), modules with ``fc1``/``fc2`` and an ``activation_fn``/``act`` (CLIP,
  OPT, BART, Whisper), ConvNeXt's ``pwconv1``/``pwconv2`` (Linear layers on (B, H, W, C); its layer scale multiplies
  the block's output channels, which do not change), and gated MLPs (``gate_proj``, ``up_proj`` -> ``down_proj``,
  as LLaMA: the neuron is a row of both ``gate_proj`` and ``up_proj``).

Importance (``taylor``, needs data): Michel, Levy, Neubig 2019 (arXiv:1905.10650, Sec. 4.1 as recalled)'s head
importance applied to neurons: a gate ξ_j of ones multiplies neuron j's activation (at the input of the second
layer), one per calibration sample, and I_j = E_x |∂L(x)/∂ξ_j| = E_x |Σ_t a_{x,t,j} ∂L(x)/∂a_{x,t,j}| (t: the token
positions). This is Molchanov et al. 2017's first-order Taylor criterion Θ_TE (ICLR 2017, arXiv:1611.06440; the
product of activation and gradient, averaged over positions, in absolute value: our sum differs from their mean by
the constant number of positions, which does not change a ranking within a model of one sequence length), taken per
sample before the expectation as Michel et al. do. ``l1`` (no data): Li et al. 2017 (Sec. 3.1)'s filter score
applied to a neuron: Σ|w| over its row of the first layer (of both first layers in a gated block), without the bias
and without the second layer's column, as ``l1_filters`` scores filters. (Equation numbers of these papers are not
given: they were not verified against the PDFs here.)

Selection: ``scope="global"`` ranks every neuron of every block together, each block's scores first divided by
their ℓ2 norm (``normalize``, as Michel et al. Sec. 4.1 do for heads); ``scope="layer"`` removes ``fraction`` from
each block. Every block keeps at least ``min_neurons`` (and a multiple of ``round_to``). The pruned model is recorded
with the ``resized`` architecture change, so a ``.nsz`` file rebuilds the smaller layers without pickle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import CalibratedConfig, _no_attention_fast_path
from ..changes.resized import is_conv1d, layer_sizes, record_resized, resized_record
from ..masks import note_skipped
from ..plan import oneshot_then_finetuned
from ..registry import StageContext, option, register
from .heads import gate_importance, select_heads

log = logging.getLogger(__name__)

__all__ = ["FfnSite", "ffn_sites", "find_ffn", "neuron_gates", "l1_importance", "taylor_importance",
           "select_neurons", "prune_ffn", "FfnConfig"]

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.gelu, F.silu, F.relu6, F.elu, F.leaky_relu, F.mish, F.hardswish, torch.relu,
                          torch.tanh, torch.sigmoid, F.tanh, F.sigmoid}


@dataclass
class FfnSite:
    """One feed-forward block. ``name``: its first layer (whose rows are the neurons; the key of per-layer options
    and reports). ``producers``: the layers whose outputs are the neurons (two in a gated block), ``consumer``: the
    layer that reads them; all as module names. ``batch_dim``: where the batch is in the consumer's input when it
    has three or more axes (a sequence-first torch transformer: 1)."""

    name: str
    producers: list[str]
    consumer: str
    hidden: int
    batch_dim: int = 0
    kind: str = ""


def _elementwise(f: Any) -> bool:
    if isinstance(f, _ELEMENTWISE):
        return True
    if isinstance(f, nn.Module):  # Hugging Face's activations (GELUActivation, NewGELUActivation, ...)
        return type(f).__module__.startswith("transformers.activations") and "GLU" not in type(f).__name__
    return f in _ELEMENTWISE_FUNCTIONS


def _rows(m: nn.Module) -> int:
    """The output width of a Linear or a Conv1D (None if ``m`` is neither)."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if is_conv1d(m):
        return int(m.weight.shape[1])
    return -1


def _cols(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    if is_conv1d(m):
        return int(m.weight.shape[0])
    return -2


def _pair(prefix: str, m: nn.Module, first: list[str], second: str) -> tuple[list[str], str] | str | None:
    """The names of ``m``'s submodules ``first`` (producers) and ``second`` (consumer) when they are Linear/Conv1D
    layers of one hidden width; a reason when they are there but do not fit; None when they are not there."""
    try:
        mods = [m.get_submodule(n) for n in [*first, second]]
    except AttributeError:
        return None
    odd = [(n, x) for n, x in zip([*first, second], mods, strict=True) if _rows(x) < 0]
    if odd:  # e.g. a layer a low-rank stage replaced by its factors
        return f"{odd[0][0]} is a {type(odd[0][1]).__name__}, not a Linear layer"
    widths = {_rows(x) for x in mods[:-1]}
    if len(widths) != 1 or _cols(mods[-1]) not in widths:
        return f"{', '.join(first)} give {sorted(widths)} features but {second} reads {_cols(mods[-1])}"
    return [f"{prefix}{n}" for n in first], f"{prefix}{second}"


def _site(name: str, m: nn.Module) -> list[FfnSite] | str | None:
    """The feed-forward blocks of module ``m`` itself (not of its children), a reason it has one that cannot shrink,
    or None."""
    pre = f"{name}." if name else ""
    found: tuple[list[str], str] | str | None = None
    kind, batch_dim = "", 0
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        if not _elementwise(getattr(m, "activation", None)):
            return f"its activation {getattr(m, 'activation', None)!r} is not a known elementwise function"
        found, kind = _pair(pre, m, ["linear1"], "linear2"), "torch"
        batch_dim = 0 if getattr(m.self_attn, "batch_first", False) else 1
    elif isinstance(m, nn.Sequential):
        out, children = [], list(m.named_children())
        for i, (n, c) in enumerate(children):
            if not isinstance(c, nn.Linear):
                continue
            j = i + 1
            while j < len(children) and _elementwise(children[j][1]):
                j += 1
            if j < len(children) and j > i + 1 and isinstance(children[j][1], nn.Linear) \
                    and children[j][1].in_features == c.out_features:
                out.append(FfnSite(f"{pre}{n}", [f"{pre}{n}"], f"{pre}{children[j][0]}", c.out_features,
                                   kind="sequential"))
        return out or None
    elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
        if not _elementwise(getattr(m, "act_fn", None)):
            return "a gated MLP whose act_fn is not a known elementwise activation"
        found, kind = _pair(pre, m, ["gate_proj", "up_proj"], "down_proj"), "gated"
    elif hasattr(m, "pwconv1") and hasattr(m, "pwconv2") and hasattr(m, "act"):  # ConvNeXt: Linear on (B, H, W, C)
        if getattr(m, "grn", None) is not None:
            return "a global response normalization (ConvNeXt V2's grn) between pwconv1 and pwconv2 mixes the neurons"
        found, kind = _pair(pre, m, ["pwconv1"], "pwconv2"), "convnext"
    elif hasattr(m, "c_fc") and hasattr(m, "c_proj") and hasattr(m, "act"):
        found, kind = _pair(pre, m, ["c_fc"], "c_proj"), "gpt2"
    elif hasattr(getattr(m, "intermediate", None), "dense") and hasattr(getattr(m, "output", None), "dense") \
            and hasattr(m.intermediate, "intermediate_act_fn"):
        found, kind = _pair(pre, m, ["intermediate.dense"], "output.dense"), "bert"
    elif hasattr(m, "fc1") and hasattr(m, "fc2") and any(hasattr(m, a) for a in ("activation_fn", "act", "act_fn")):
        norm = getattr(m, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            return "a normalization between fc1 and fc2 mixes the hidden neurons"
        found, kind = _pair(pre, m, ["fc1"], "fc2"), "fc"
    if found is None or isinstance(found, str):
        return found
    producers, consumer = found
    return [FfnSite(producers[0], producers, consumer, _rows(m.get_submodule(producers[0][len(pre):])), batch_dim,
                    kind)]


def ffn_sites(model: nn.Module) -> tuple[list[FfnSite], dict[str, str]]:
    """The feed-forward blocks of ``model`` whose hidden neurons can be removed, and those found that cannot
    ({module name: why})."""
    sites, skipped, seen = [], {}, set()
    for name, m in model.named_modules():
        if "parametrizations." in f".{name}.":
            continue
        s = _site(name, m)
        if isinstance(s, str):
            skipped[name or "(the model)"] = s
        elif s:
            for site in s:
                if site.name not in seen and site.consumer not in seen:
                    seen.add(site.name)
                    sites.append(site)
    return sites, skipped


def find_ffn(model: nn.Module, owner: str = "ffn_neurons") -> list[FfnSite]:
    """The removable feed-forward blocks; a one-line ValueError when there is none or the weights are
    parametrized (masks, codebooks). Blocks found but not supported are logged."""
    from torch.nn.utils import parametrize

    sites, skipped = ffn_sites(model)
    if not sites:
        why = f" (found but not supported: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
        raise ValueError(f"{owner}: the model has no feed-forward block (two Linear layers with an elementwise "
                         f"activation between them, in an nn.Sequential, a torch or Hugging Face transformer "
                         f"layer){why}; hidden neurons are removed from such blocks only.")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(f"{owner}: the model holds masks or codebooks (parametrized weights); remove neurons "
                         "first, then prune or share weights.")
    for name, why in skipped.items():
        log.info("%s: feed-forward block %s left as it is: %s", owner, name, why)
    note_skipped(model, skipped)  # the stage record (and compare's row) lists them
    return sites


def _gate(x: Tensor, g: Tensor, batch_dim: int) -> Tensor:
    """``x`` (..., hidden) with neuron j scaled by g[j] (g: (hidden,)) or, per sample, g[b, j] (g: (B, hidden))."""
    if g.dim() == 1:
        return x * g
    bd = 0 if x.dim() <= 2 else batch_dim
    if x.dim() == 1 or x.shape[bd] != g.shape[0]:
        raise ValueError(f"ffn_neurons: a feed-forward block saw an input of shape {tuple(x.shape)} for a batch of "
                         f"{g.shape[0]} samples; per-sample neuron gates need the batch on axis {bd} (use "
                         "importance=l1).")
    shape = [1] * x.dim()
    shape[bd], shape[-1] = g.shape[0], g.shape[1]
    return x * g.view(shape)


@contextmanager
def neuron_gates(model: nn.Module, gates: dict[str, Tensor]) -> Iterator[None]:
    """While inside, each block named in ``gates`` scales hidden neuron j by ``gates[name][j]`` (or sample b's by
    ``[b, j]`` for a (B, hidden) gate) where the second layer reads it: ξ_j. Gates of 0/1 give the neuron-masked
    model; torch's fused transformer path is off meanwhile. Hooks are removed on exit."""
    sites = {s.name: s for s in ffn_sites(model)[0]}
    handles = []
    try:
        with _no_attention_fast_path():
            for name, g in gates.items():
                site = sites.get(name)
                if site is None:
                    raise ValueError(f"neuron_gates: {name!r} is not a feed-forward block; choose from "
                                     f"{sorted(sites)}.")
                if g.shape[-1] != site.hidden:
                    raise ValueError(f"neuron_gates: {name!r} has {site.hidden} neurons; got a gate of shape "
                                     f"{tuple(g.shape)}.")

                def pre(mod: nn.Module, args: tuple[Any, ...], g: Tensor = g, bd: int = site.batch_dim) -> Any:
                    return (_gate(args[0], g, bd), *args[1:])

                handles.append(model.get_submodule(site.consumer).register_forward_pre_hook(pre))
            yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def l1_importance(model: nn.Module, site: FfnSite) -> Tensor:
    """Σ|w| over each neuron's row of the first layer(s) (Li et al. 2017's filter score), no bias. -> (hidden,)."""
    s = torch.zeros(site.hidden, device="cpu")  # summed on the host
    for p in site.producers:
        m = model.get_submodule(p)
        w = m.weight.detach().abs().float()
        s += (w.sum(0) if is_conv1d(m) else w.sum(1)).cpu()
    return s


def taylor_importance(model: nn.Module, sites: list[FfnSite], data: Any, *, samples: int = 128,
                      batch_size: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """I_j = E_x |∂L(x)/∂ξ_j| over ``samples`` training samples, per block (hidden,): Michel et al. 2019's importance
    with one gate per neuron (Molchanov et al. 2017's |activation × gradient| summed over positions, per sample).
    L(x) is sample x's cross-entropy (a language model's: the mean over its tokens); eval mode, no weight gradient."""
    return gate_importance(model, {s.name: s.hidden for s in sites}, neuron_gates, data, samples=samples,
                           batch_size=batch_size, seed=seed, owner="ffn_neurons")


def select_neurons(scores: dict[str, Tensor], fraction: float | Mapping[str, float], *, scope: str = "global",
                   normalize: bool = True, min_neurons: int = 1, round_to: int = 1) -> dict[str, list[int]]:
    """The neurons each block keeps (sorted indices) when ``fraction`` of the lowest-scoring ones go: of all blocks
    at once (``scope="global"``, each block's scores divided by their ℓ2 norm when ``normalize``) or of each block
    (``scope="layer"``); a mapping {block: fraction} removes that fraction from each block named and leaves the
    others. Every block keeps at least ``min_neurons`` and a multiple of ``round_to`` (the best-scoring of those
    dropped come back)."""
    if isinstance(fraction, Mapping):
        unknown = sorted(set(fraction) - set(scores))
        if unknown:
            raise ValueError(f"ffn_neurons: {unknown[0]!r} is not a feed-forward block whose neurons can be removed; "
                             f"choose from {sorted(scores)} (each named by its first layer).")
        keep = {k: list(range(len(v))) for k, v in scores.items()}
        for k, f in fraction.items():
            keep.update(select_heads({k: scores[k]}, f, scope="layer", normalize=False, min_heads=min_neurons))
    else:
        keep = select_heads(scores, fraction, scope=scope, normalize=normalize, min_heads=min_neurons)
    for k, kept in keep.items():
        size = len(scores[k])
        want = min(size, -(-len(kept) // round_to) * round_to)
        if want > len(kept):
            back = [int(i) for i in torch.sort(scores[k], descending=True, stable=True).indices if int(i) not in kept]
            keep[k] = sorted(kept + back[:want - len(kept)])
    return keep


@torch.no_grad()
def _slice(m: nn.Module, idx: Tensor, role: str) -> None:
    """Keep neurons ``idx`` of a producer's outputs (``role="out"``) or a consumer's inputs (``"in"``), in place."""
    def take(t: Tensor, dim: int) -> None:
        t.data = t.data.index_select(dim, idx.to(t.device)).contiguous()

    conv1d = is_conv1d(m)
    if role == "out":
        take(m.weight, 1 if conv1d else 0)
        if getattr(m, "bias", None) is not None:
            take(m.bias, 0)
    else:
        take(m.weight, 0 if conv1d else 1)
    if conv1d:
        m.nf = int(m.weight.shape[1])
        if hasattr(m, "nx"):
            m.nx = int(m.weight.shape[0])
    else:
        m.out_features, m.in_features = m.weight.shape


def prune_ffn(model: nn.Module, keep: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """Keep only neurons ``keep[block]`` (sorted indices among the block's current neurons) of each feed-forward block
    named, in place, and record the new layer sizes (``resized``) so a ``.nsz`` file rebuilds the smaller model.
    Returns per shrunk block its neurons before and after. Refuses (one line) a block that would keep no neuron."""
    sites = {s.name: s for s in find_ffn(model)}
    unknown = sorted(set(keep) - set(sites))
    if unknown:
        raise ValueError(f"ffn_neurons: {unknown[0]!r} is not a feed-forward block whose neurons can be removed; "
                         f"choose from {sorted(sites)} (each named by its first layer).")
    chosen = {}
    for name, k in keep.items():
        site = sites[name]
        k = list(k)
        if not k:
            raise ValueError(f"ffn_neurons: block {name!r} would keep none of its {site.hidden} neurons; every block "
                             "must keep at least one (removing a whole feed-forward block is not neuron pruning).")
        if sorted(set(k)) != k or k[0] < 0 or k[-1] >= site.hidden:
            raise ValueError(f"ffn_neurons: neurons to keep in {name!r} must be sorted, distinct indices in "
                             f"[0, {site.hidden}); got {k[:8]}{'...' if len(k) > 8 else ''}.")
        if len(k) < site.hidden:
            chosen[name] = k
    before = layer_sizes(model)
    out = {}
    for name, k in chosen.items():
        site, idx = sites[name], torch.tensor(chosen[name], dtype=torch.long, device="cpu")
        for p in site.producers:
            _slice(model.get_submodule(p), idx, "out")
        _slice(model.get_submodule(site.consumer), idx, "in")
        out[name] = {"before": site.hidden, "after": len(k)}
    if out:
        record_resized(model, resized_record(model, before))
    return out


@dataclass(frozen=True)
class FfnConfig(CalibratedConfig):
    owner: ClassVar[str] = "ffn_neurons"
    fraction: float | dict[str, float] = option(
        0.5, "fraction of the hidden neurons of feed-forward blocks removed: a number, or {block: fraction} for the "
             "blocks named (by their first layer; the others untouched)", low=0, high=1, high_open=True)
    importance: str = option("taylor", "neuron score: taylor (E|dL/dgate|, Michel et al. 2019 / Molchanov et al. "
                                       "2017, needs data) or l1 (l1 norm of the neuron's first-layer row, Li et al. "
                                       "2017, no data)", choices=("taylor", "l1"))
    scope: str = option("global", "rank all neurons together (global) or remove the fraction from each block (layer)",
                        choices=("global", "layer"))
    normalize: bool = option(True, "divide each block's scores by their l2 norm before a global ranking")
    min_neurons: int = option(1, "never keep fewer neurons than this in a block", low=1)
    round_to: int = option(1, "keep a multiple of this many neurons per block (aligned sizes)", low=1)


@register("ffn_neurons", family="structured", kind="oneshot", config=FfnConfig,
          needs_data=lambda cfg: cfg.importance == "taylor",
          compare=oneshot_then_finetuned("ffn_neurons", fraction=0.5), quick={"fraction": 0.5, "samples": 16},
          citation="Michel, Levy, Neubig 2019 (NeurIPS), arXiv:1905.10650, Sec. 4.1 (importance, per neuron); "
                   "Molchanov, Tyree, Karras, Aila, Kautz 2017 (ICLR), arXiv:1611.06440 (Taylor criterion); "
                   "Li et al. 2017 (ICLR), Sec. 3.1 (l1)",
          summary="remove hidden neurons of feed-forward blocks (transformer MLPs, Linear-act-Linear); both layers "
                  "get smaller")
def _run_ffn(model: nn.Module, cfg: FfnConfig, ctx: StageContext) -> dict[str, Any]:
    sites = find_ffn(model)  # refuses a model without a feed-forward block before any work
    if cfg.importance == "taylor":
        data = ctx.require_data("ffn_neurons")
        scores = taylor_importance(model, sites, getattr(data, "train", data), samples=cfg.samples,
                                   batch_size=cfg.batch_size, seed=cfg.seed)
    else:
        scores = {s.name: l1_importance(model, s) for s in sites}
    keep = select_neurons(scores, cfg.fraction, scope=cfg.scope, normalize=cfg.normalize,
                          min_neurons=cfg.min_neurons, round_to=cfg.round_to)
    layers = prune_ffn(model, keep)
    before = sum(s.hidden for s in sites)
    after = before - sum(v["before"] - v["after"] for v in layers.values())
    log.info("ffn_neurons: %d of %d hidden neurons kept in %d feed-forward blocks", after, before, len(sites))
    return {"neurons_before": before, "neurons_after": after, "layers": layers,
            "blocks": {s.name: {"first": s.producers, "second": s.consumer, "kind": s.kind} for s in sites}}
