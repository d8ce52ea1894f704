"""Timing candidates against each other, what every timed pass shares: :func:`_time` (interleaved medians),
:func:`_swap_timed` (one layer against its fast form, kept in place if faster), :func:`_pick_whole` (whole-model
forms, checked against the model's output first), and the probe run that gives each layer its input size."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...kernels.modules import ColumnConv2d
from ...stats import example_input, time_interleaved
from ..plan import RunChoice, RuntimePlan
from .graph import _materialize


def _time(cands: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each candidate, interleaved (the first warm-up call compiles numba kernels). Three rounds
    first: a candidate over twice the fastest's time there keeps that figure and is not timed further."""
    fns = {k: (lambda m=m: m(x)) for k, m in cands.items()}
    t = time_interleaved(fns, min(3, repeats), warmup=3)
    close = {k: f for k, f in fns.items() if t[k] <= 2 * min(t.values())}
    if len(close) > 1 and repeats > 3:
        t.update(time_interleaved(close, repeats, warmup=0))
    return {k: 1e3 * v for k, v in t.items()}


def _input_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The input shape of each layer in ``names`` on one probe run at the model's recorded input shape."""
    from ...models import arch_of

    shape = (arch_of(model) or {}).get("input_shape")
    if not shape:
        return {}
    seen: dict[str, tuple[int, ...]] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, tuple(args[0].shape))) for n in names]
    try:
        with torch.no_grad():
            model(example_input(model, tuple(shape), 1, torch.Generator().manual_seed(0)))
    except Exception:  # noqa: BLE001 - a model that does not run on its recorded shape keeps its convolutions
        return {}
    finally:
        for h in handles:
            h.remove()
    return seen


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
