"""Turn a compressed model into its fastest runnable form, chosen by measuring on the user's batch size.

``compile_runtime(model, batch)`` traces the model (torch.fx) and runs its passes in order, each a module of
``passes/`` whose docstring says what it does and how it is timed:

0. ``attention``: each ``nn.MultiheadAttention`` as four Linear projections around SDPA, so the projections'
   stored forms reach the kernels of step 5;
1. ``binary``: BNN runs as one :class:`BinaryChain`, binary-input layers as XNOR + popcount (``xnor``);
2. ``fold``: eval-mode BatchNorm folded into the Conv or Linear layer that alone feeds it (again after 5);
3. ``layout``: the whole model in its own memory order against channels-last;
4. ``convs``, ``columns``, ``pool``: each convolution against the kernels its storage form offers (a direct
   sparse convolution), then against im2col over its kept columns, and each max-pooling against its faster form,
   in the memory order chosen;
5. ``linear``: each run of Linear layers joined by ReLUs in its fastest form (``fused``, ``csr``, ``int8``,
   ``lut``, ``dense``);
6. ``pack``: the finished graph on G samples laid side by side along the channel axis, built here, timed in 8;
7. ``calls``: plain torch layers called as functions, ReLUs and sums on fresh tensors in place;
8. the finished model, channels-last if chosen, against its packed forms (``pack``), then on slices of the
   batch (``layout``); a channels-last result that differs from the model's output is compiled again
   without ``layout``.

Every step times candidates on a random input of that batch size, interleaved (``passes/timing.py``), and
keeps the fastest, so no run is slower than dense up to timing noise. These steps apply to a dense model's
runtime form as to a compressed one, so a ratio between two runtime forms credits only the compression.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..kernels import bitops
from ..kernels.modules import ChannelsLast, resident_bytes
from .passes.attention import rebuild_attention
from .passes.binary import _binary_chains as _binary_chains
from .passes.binary import _fuse_binary_chains, _swap_binary
from .passes.binary import chain_modules as chain_modules
from .passes.calls import _add_into as _add_into
from .passes.calls import _direct_calls
from .passes.convs import _swap_layers
from .passes.fold import _fold_batchnorm
from .passes.graph import _finish_graph, _materialize_all, _trace
from .passes.graph import _Tracer as _Tracer
from .passes.layout import _CHUNKS, _channels_last_pays, _choose_chunks, _slack, _whole_input
from .passes.linear import _swap_runs
from .passes.pack import PACK_STEP as PACK_STEP
from .passes.pack import _choose_pack, _pack_candidates
from .passes.pack import _pack_batch as _pack_batch
from .passes.pack import _packed as _packed
from .passes.pack import _unpack_batch as _unpack_batch
from .passes.timing import _same
from .plan import RunChoice, RuntimePlan
from .weights import linear_form

__all__ = ["compile_runtime", "RuntimePlan", "RunChoice", "linear_form"]

STEPS = ("attention", "xnor", "columns", "pool", "fold", "layout", "calls", "pack", "dense")  # the passes' own
KINDS = ("fused", "csr", "int8", "lut", *STEPS)  # with the built-in forms' kernels (forms/ declare theirs)


def _refuse_tracing(module: nn.Module, args: tuple) -> None:
    """The runtime form calls compiled kernels a tracer cannot see: ``torch.onnx.export`` of it wrote a graph with
    no input and one constant. Refuse, and name the way that works."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        raise RuntimeError("the runtime form of a .nsz file runs compiled kernels that cannot be traced or exported; "
                           "export the file itself: netsurgeon export FILE.nsz -o FILE.onnx (or "
                           "netsurgeon.export_onnx)")


def _checked(forms: tuple[str, ...] | None) -> tuple[str, ...]:
    """The step and candidate names to use: ``forms``, or every known one (the passes' own and every storage
    form's kernels); an unknown name is a ValueError listing the known ones."""
    from ..forms import forms as storage_forms

    names = dict.fromkeys(KINDS)
    for f in storage_forms().values():
        names.update(dict.fromkeys(f.runtime_names))
    bad = [f for f in forms or () if f not in names]
    if bad:
        raise ValueError(f"compile_runtime: unknown runtime form {bad[0]!r}; choose from {', '.join(names)}.")
    return tuple(names) if forms is None else forms


def compile_runtime(model: nn.Module, batch: int = 1, *, threads: int | None = None, repeats: int = 30,
                    forms: tuple[str, ...] | None = None) -> tuple[nn.Module, RuntimePlan]:
    """The runtime form of ``model`` for inputs of ``batch`` samples, and the plan that says what was chosen.

    ``model`` may hold pruned float weights, k-means-shared or int8 weights (as ``load_compressed(...,
    keep_codecs=True)`` rebuilds them); it is not modified. ``forms`` limits the candidates and steps to those
    named (default: all; ``dense`` is always one). Timing uses ``threads`` torch (and numba) threads (default:
    the current setting).
    """
    if batch < 1:
        raise ValueError(f"compile_runtime: batch must be >= 1; got {batch!r}.")
    forms = _checked(forms)
    given, model = model, copy.deepcopy(model).eval()
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        plan = RuntimePlan(batch, torch.get_num_threads(), [], False)
        if "attention" in forms:
            rebuild_attention(model, plan)
        gm, plan.traced = _trace(model)
        traced = plan.traced
        if "xnor" in forms and bitops.available():
            fused = _fuse_binary_chains(gm, batch, repeats, plan) if traced else set()  # type: ignore[arg-type]
            _swap_binary(gm, batch, repeats, plan, model, fused)
        x_whole, ref = _whole_input(gm, model, batch) if "layout" in forms else (None, None)
        if traced and "fold" in forms:
            _fold_batchnorm(gm, plan, convs_too=True)  # type: ignore[arg-type]
        last = x_whole is not None and _channels_last_pays(gm, x_whole, ref, repeats, plan, fold="fold" in forms)
        _swap_layers(gm, forms, batch, repeats, plan, model, last)
        _swap_runs(gm, traced, batch, repeats, plan, forms)
        _materialize_all(gm)  # what stays: plain weights (masks/codebooks applied once, here)
        if traced and "fold" in forms:
            _fold_batchnorm(gm, plan)  # type: ignore[arg-type]
        whole = traced and x_whole is not None and "pack" in forms
        packs = _pack_candidates(gm, batch, last, "calls" in forms) if whole else {}  # type: ignore[arg-type]
        direct = _direct_calls(gm) if traced and "calls" in forms else 0  # type: ignore[arg-type]
        if direct:
            plan.runs.append(RunChoice(["(whole model) direct calls"], "calls", "float", 1.0))
        gm = _finish_graph(gm, model, plan, traced, direct)
        slack = _slack(gm, x_whole, ref)
        if last:
            gm = ChannelsLast(gm)
        gm = _choose_pack(gm, packs, last, x_whole, ref, repeats, plan, slack)
        if x_whole is not None and batch > min(_CHUNKS):
            gm = _choose_chunks(gm.eval(), x_whole, ref, repeats, plan, slack)
        if last and not _same(gm, x_whole, ref, slack):  # a swapped layer that mishandles channels-last input:
            return compile_runtime(given, batch, threads=threads, repeats=repeats,  # without the layout steps
                                   forms=tuple(f for f in forms if f != "layout"))
        plan.resident_bytes = resident_bytes(gm)
        gm.register_forward_pre_hook(_refuse_tracing)
        return gm.eval(), plan
    finally:
        torch.set_num_threads(old)
