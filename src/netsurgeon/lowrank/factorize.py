"""Model-level low-rank factorization: choose a rank per layer (one energy threshold, or one global weight budget
over Linear and Conv2d layers alike), replace each layer that gets smaller by its factor ``nn.Sequential``
(:mod:`.svd` for Linear, :mod:`.conv` for Conv2d), optionally train each replacement to reproduce the original
layer's outputs on the data (the "data reconstruction" of Jaderberg et al. 2014, Sec. 2.3, and Zhang et al. 2015's
layer-wise fitting), then fine-tune the whole model.

The ``.nsz`` architecture record lists ``factorized: {layer: rank}`` for Linear layers and
``{layer: {"kind": kind, "rank": rank}}`` for convolutions, so a file rebuilds the smaller model without pickle,
on netsurgeon's models and on the user's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..changes.factorized import factor_structure, record_factorized
from ..masks import prunable_layers
from .conv import CONV_KINDS, conv_cost, conv_rank_at, conv_spectra, factorizable_conv, factorize_conv
from .svd import choose_ranks, energy_rank, factorize_linear

__all__ = ["lowrank_factorize", "factorize_layers", "factor_structure", "match_outputs", "candidate_layers"]


def candidate_layers(model: nn.Module, owner: str, conv: str,
                     layers: list[str] | None) -> dict[str, tuple[nn.Module, str]]:
    """{name: (layer, kind)} of the layers to consider: Linear ("linear") and, unless ``conv`` is "none", every
    Conv2d that fits (others are skipped, or named in an error when the user listed them)."""
    chosen = {}
    held = _read_by_parent(model)
    for name, m in prunable_layers(model, owner).items():
        if layers is not None and name not in layers:
            continue
        if name in held:  # replacing it by factors would break its parent's forward
            if layers is not None:
                raise ValueError(f"{owner}: layer {name!r} cannot be factorized: {held[name]}.")
            continue
        if parametrize.is_parametrized(m):
            raise ValueError(f"{owner}: layer {name!r} holds a parametrization (masks or codes); factorize a float "
                             "model.")
        if isinstance(m, nn.Linear) and conv != "separable":
            chosen[name] = (m, "linear")
        elif conv != "none" and isinstance(m, nn.Conv2d):
            why = factorizable_conv(m)
            if why is None:
                chosen[name] = (m, conv)
            elif layers is not None:
                raise ValueError(f"{owner}: layer {name!r} cannot be factorized by {conv!r}: it is {why}.")
    if layers is not None and set(layers) - set(chosen):
        raise ValueError(f"{owner}: no factorizable layer named {sorted(set(layers) - set(chosen))[:5]}.")
    if not chosen:
        what = "Linear" if conv == "none" else "Conv2d" if conv == "separable" else "Linear or Conv2d"
        raise ValueError(f"{owner}: the model has no {what} layer to factorize.")
    return chosen


def _read_by_parent(model: nn.Module) -> dict[str, str]:
    """Layers whose parent reads their weights itself instead of only calling them: torch's
    ``nn.TransformerEncoderLayer``/``DecoderLayer`` check ``linear1.weight``... for their fused fast path in every
    forward, so a layer replaced by a factor pair would break it. {layer: why}."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            for child in ("linear1", "linear2"):
                out[f"{name}.{child}" if name else child] = (f"its parent {type(m).__name__} reads its weight in "
                                                             "every forward (torch's fused fast path)")
    for name in _weights_read_outside(model):
        out.setdefault(name, "code outside the layer reads its weight in the forward (e.g. Hugging Face ViT reads "
                             "its patch projection's weight.dtype)")
    return out


def _weights_read_outside(model: nn.Module) -> set[str]:
    """Linear/Conv2d layers whose ``weight`` is read, during one forward on an input the model takes (from its
    architecture record), by code other than the layer's own forward. Found by a probe class swapped in for the
    forward: parameters are reached through ``nn.Module.__getattr__``, so every read is seen. Empty when the
    record gives no input shape or the forward fails."""
    from ..changes import arch_of
    from ..stats import example_input

    shape = (arch_of(model) or {}).get("input_shape")
    if not shape:
        return set()
    inside: list[nn.Module] = []
    found: set[str] = set()
    swapped: dict[nn.Module, type] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    def probe_class(cls: type) -> type:
        def __getattr__(self: nn.Module, attr: str) -> Any:  # noqa: N807
            if attr == "weight" and (not inside or inside[-1] is not self):
                found.add(names[self])
            return cls.__getattr__(self, attr)

        def forward(self: nn.Module, *a: Any, **k: Any) -> Any:
            inside.append(self)
            try:
                return cls.forward(self, *a, **k)
            finally:
                inside.pop()

        return type(cls.__name__, (cls,), {"__getattr__": __getattr__, "forward": forward})

    was = model.training
    try:
        for m in names:
            swapped[m] = type(m)
            m.__class__ = probe_class(type(m))
        model.eval()
        with torch.no_grad():
            model(example_input(model, tuple(shape)))
    except Exception:  # a model this input does not fit: nothing learned, nothing refused
        return set()
    finally:
        for m, cls in swapped.items():
            m.__class__ = cls
        model.train(was)
    return found


def _weights(m: nn.Module) -> int:
    return m.weight.numel()


@torch.no_grad()
def factorize_layers(model: nn.Module, plan: dict[str, tuple[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Replace each layer in ``plan`` ({name: (kind, rank)}, kind "linear" or a conv kind) by its factors, in
    place, and record them on the model; returns {name: weights after} of the replaced layers."""
    done, record = {}, {}
    for name, (kind, rank) in plan.items():
        layer = model.get_submodule(name)
        new = factorize_linear(layer, rank) if kind == "linear" else factorize_conv(layer, kind, rank, seed=seed)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        record[name] = rank if kind == "linear" else {"kind": kind, "rank": rank}
        done[name] = sum(m.weight.numel() for m in new)
    if record:
        record_factorized(model, record)
    return done


@torch.no_grad()
def lowrank_factorize(model: nn.Module, *, energy: float | None = None, params: float | None = None,
                      conv: str = "spatial", layers: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Factorize the Linear layers of ``model`` and, by ``conv`` ("none", "spatial", "cp", "tucker",
    "separable"), its Conv2d layers, in place, at ranks from one ``energy`` threshold or a global ``params``
    budget (the fraction of the considered layers' weights to keep). A layer is replaced only where that saves
    weights. Returns {layer: {kind, rank, weights_before, weights_after, energy_kept}}; ``energy_kept`` (the
    fraction of Σσ² kept) is None for cp, whose rank comes from the Tucker ranks."""
    owner = "lowrank"
    if conv not in ("none", *CONV_KINDS):
        raise ValueError(f"{owner}: conv must be one of none, {', '.join(CONV_KINDS)}; got {conv!r}.")
    check_finite_model(owner, model)
    chosen = candidate_layers(model, owner, conv, layers)
    spectra = {n: [torch.linalg.svdvals(m.weight.detach().double())] if k == "linear" else conv_spectra(m, k)
               for n, (m, k) in chosen.items()}
    rank_at = {n: (lambda e, s=spectra[n]: energy_rank(s[0], e)) if k == "linear" else
               (lambda e, s=spectra[n], k=k: conv_rank_at(k, s, e, energy_rank)) for n, (_, k) in chosen.items()}
    cost = {n: (lambda r, m=m: r * (m.in_features + m.out_features)) if k == "linear" else
            (lambda r, m=m, k=k: conv_cost(m, k, r)) for n, (m, k) in chosen.items()}
    full = {n: _weights(m) for n, (m, _) in chosen.items()}
    ranks = choose_ranks(rank_at, cost, full, energy=energy, params=params)
    report, plan = {}, {}
    for name, (_, kind) in chosen.items():
        r, after = ranks[name], cost[name](ranks[name])
        factor = after < full[name]
        kept = None
        if kind in ("linear", "spatial", "separable"):
            s2 = spectra[name][0].pow(2)
            kept = float(s2[:r].sum() / s2.sum()) if factor and float(s2.sum()) > 0 else 1.0
        report[name] = {"kind": kind, "rank": r if factor else None, "weights_before": full[name],
                        "weights_after": after if factor else full[name], "energy_kept": kept if factor else 1.0}
        if factor:
            plan[name] = (kind, r)
    factorize_layers(model, plan, seed=seed)
    return report


def match_outputs(model: nn.Module, originals: dict[str, nn.Module], data: Any, *, steps: int, lr: float = 1e-3,
                  batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Train each factorized layer of ``model`` (``originals``: {name: the layer it replaced}) to reproduce the
    original layer's output on the inputs that reach it, with Adam for ``steps`` mini-batches of the training
    split; every other weight is frozen and each layer's input is detached, so each layer fits on its own.
    Returns {layer: relative output error after} (‖f(x) − g(x)‖ / ‖g(x)‖ on the last batch)."""
    from ..data import Split, as_data, batches

    train_split = as_data(data).train
    factors = {n: model.get_submodule(n) for n in originals}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for f in factors.values() for p in f.parameters()]
    for p in params:
        p.requires_grad_(True)
    losses: dict[str, torch.Tensor] = {}

    def detach(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (inp[0].detach(), *inp[1:])  # the loss of this layer reaches this layer only

    def fit(name: str) -> Any:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            with torch.no_grad():
                target = originals[name](inp[0])
            losses[name] = F.mse_loss(out, target, reduction="sum") / target.pow(2).sum().clamp_min(1e-12)
        return hook

    hooks = [h for n, f in factors.items() for h in (f.register_forward_pre_hook(detach),
                                                       f.register_forward_hook(fit(n)))]
    was = model.training
    model.eval()  # the statistics of BatchNorm and the dropout masks are not what is being fitted
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    stream: Any = iter(())
    try:
        for _ in range(steps):
            if isinstance(train_split, Split):  # random mini-batches of an in-memory split
                batch = (train_split.x[torch.randint(len(train_split), (batch_size,), generator=g, device="cpu")],)
            else:  # a loader, cycled
                batch = next(stream, None)
                if batch is None:
                    stream = batches(train_split, batch_size)
                    batch = next(stream)
            with torch.enable_grad():
                losses.clear()
                model(batch[0])
                total = sum(losses.values())
                opt.zero_grad(set_to_none=True)
                total.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was)
    return {n: float(v.detach().sqrt()) for n, v in losses.items()}
