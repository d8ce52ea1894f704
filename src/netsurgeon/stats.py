"""What a user judges a compressed model by: nonzero parameters, FLOPs and measured latency."""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data import Split, batches
from .masks import SUPPORTED_LAYERS, original, prunable_layers
from .progress import Progress

__all__ = ["cpu_name", "count_nonzero", "LayerFlops", "layer_flops", "total_flops", "Latency", "measure_latency",
           "num_threads", "collect_gradients"]


@torch.no_grad()
def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), for the machine line of every measurement."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """Return ``(nonzero, total)`` over every parameter of ``model`` as the forward pass sees it.

    Masked tensors are counted through their mask (the effective weight), not the hidden original.
    """
    layers = [m for m in model.modules() if isinstance(m, SUPPORTED_LAYERS)]
    covered = {id(p) for m in layers for p in m.parameters()}  # includes masked originals
    tensors = [t for m in layers for t in (m.weight, m.bias) if t is not None]
    tensors += [p for p in model.parameters() if id(p) not in covered]  # e.g. norms: counted as they are
    return sum(int((t != 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one layer for one input sample (a multiply-add counts 2). ``effective`` skips zero weights."""

    name: str
    dense: int
    effective: int


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[LayerFlops]:
    """Dense and effective FLOPs of every Linear/Conv2d layer for one sample of shape ``input_shape`` (zeros of
    ``dtype``: int64 for a language model's token ids).

    Dense: 2·(out elements)·(fan-in). Effective: 2·(output positions)·(nonzero weights), i.e. what a
    kernel that skips pruned weights would do. Bias additions and activations are not counted.
    """
    layers = prunable_layers(model)
    out_numel: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out_numel.__setitem__(n, o[0].numel()))
             for n, m in layers.items()]
    try:
        was_training = model.training
        model.eval()
        model(torch.zeros(1, *input_shape, dtype=dtype))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n, m in layers.items():
        w = m.weight
        positions = out_numel[n] // w.shape[0]  # output pixels per output channel (1 for Linear)
        dense = 2 * positions * w.numel()
        rows.append(LayerFlops(n, dense, 2 * positions * int((w != 0).sum())))
    return rows


def kept_columns(weight: Tensor) -> Tensor:
    """Which columns of a convolution weight lowered to (out, in x kernel) hold a nonzero: a bool vector over
    the shape-wise groups of structured sparsity learning; the others are the patch rows an im2col convolution
    can skip."""
    w = weight.detach()
    return w.reshape(w.shape[0], -1).abs().sum(0) != 0


def zero_columns(weight: Tensor) -> int:
    """How many columns of a convolution weight lowered to (out, in x kernel) are all zero (:func:`kept_columns`)."""
    return int((~kept_columns(weight)).sum())


def total_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(dense, effective)`` FLOPs per sample summed over layers."""
    rows = layer_flops(model, input_shape)
    return sum(r.dense for r in rows), sum(r.effective for r in rows)


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Fix ``torch.set_num_threads`` inside the block and restore it after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_ALLOCATOR = "default"


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse (``mallopt``: no mmap'd chunks, no trimming) for the rest
    of the process, and say what the allocator does now.

    By default a freed block over glibc's (moving) mmap threshold goes back to the OS and the next tensor of that
    size faults every page in again: a dense small ResNet at batch 256 paid ~15,000 page faults per forward pass
    (66 ms; 42-46 ms without them), and whether it paid depended on what the process had allocated before. Timings
    of large batches are then neither fair nor repeatable, so the benchmarks and ``netsurgeon bench-latency`` call
    this first; a serving process can too (the cost: it keeps its peak memory). Not glibc: nothing changes."""
    global _ALLOCATOR
    if _ALLOCATOR != "default" or not sys.platform.startswith("linux"):
        return _ALLOCATOR
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        if libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1:
            _ALLOCATOR = "glibc malloc keeping freed memory (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2^31-1)"
    except (OSError, AttributeError):  # not glibc (musl, another libc): its own behaviour stays
        pass
    return _ALLOCATOR


@dataclass(frozen=True)
class Latency:
    """Median latency of a model and of its reference, measured interleaved in the same process."""

    model_s: float
    reference_s: float
    batch: int
    threads: int

    @property
    def speedup(self) -> float:
        """reference / model: > 1 means the model runs faster than the reference."""
        return self.reference_s / self.model_s


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds of each zero-argument callable, run in turn ``repeats`` times under inference mode
    (machine drift spreads over all of them). The order rotates every round, so no candidate always runs
    right after the same other one (measured: a dense model timed just after a large CSR candidate ran 1.2x
    slower, from a cold cache)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    with torch.inference_mode():  # as a deployed model runs: no autograd bookkeeping
        for f in fns.values():
            for _ in range(warmup):
                f()
        for r in range(repeats):
            for k, f in items[r % len(items):] + items[:r % len(items)]:
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_latency(model: nn.Module, reference: nn.Module, x: Tensor, *, warmup: int = 10,
                    repeats: int = 50, threads: int | None = None) -> Latency:
    """Time ``model(x)`` against ``reference(x)``: warm-up, then alternate runs, report medians.

    Alternating the two models spreads any drift of the machine's speed over both.
    """
    t = time_models({"model": model, "reference": reference}, x, repeats=repeats, warmup=warmup, threads=threads)
    with num_threads(threads):
        return Latency(t["model"], t["reference"], int(x.shape[0]), torch.get_num_threads())


def time_models(models: dict[str, nn.Module], x: Tensor, *, repeats: int = 50, warmup: int = 10,
                threads: int | None = None) -> dict[str, float]:
    """Median seconds of each model on ``x`` (eval mode), all timed interleaved in one loop with ``threads``
    torch threads (:func:`time_interleaved`), freed memory kept for reuse first (:func:`keep_freed_memory`)."""
    keep_freed_memory()
    for m in models.values():
        m.eval()
    with num_threads(threads):
        return time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, warmup)


def _gradient_batches(data: Any, num_grads: int, batch_size: int,
                      g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """``num_grads`` mini-batches of ``batch_size`` samples: drawn at random (with replacement) from a
    Split, or taken in order from a DataLoader's batches, cycling through it if it is too short."""
    if isinstance(data, Split):
        if len(data) == 0:
            raise ValueError("collect_gradients: the data split is empty.")
        idx = torch.randint(len(data), (num_grads, batch_size), generator=g)
        for i in range(num_grads):
            yield data.x[idx[i]], data.y[idx[i]]
        return
    done, xs, ys, have = 0, [], [], 0
    while done < num_grads:
        seen = False
        for x, y in batches(data):
            seen = True
            xs.append(x)
            ys.append(y)
            have += len(y)
            while have >= batch_size and done < num_grads:
                xa, ya = torch.cat(xs), torch.cat(ys)
                yield xa[:batch_size], ya[:batch_size]
                xs, ys, have, done = [xa[batch_size:]], [ya[batch_size:]], have - batch_size, done + 1
            if done >= num_grads:
                return
        if not seen:
            raise ValueError("collect_gradients: the data loader yielded no batch.")


def _labelled_outputs(model: nn.Module, data: Any, num_grads: int, batch_size: int, g: torch.Generator,
                      sample_labels: bool, every: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(i, logits, labels) for the ``num_grads`` seeded mini-batches; with ``sample_labels`` the labels are drawn
    from the model's own predictive distribution (true Fisher) instead of the data's (empirical Fisher).
    ``every=(r, k)``: only the batches i with i % k == r are evaluated (the same draws are made for all)."""
    for i, (xb, yb) in enumerate(_gradient_batches(data, num_grads, batch_size, g)):
        if i % every[1] != every[0]:
            continue
        logits = model(xb)
        if sample_labels:
            with torch.no_grad():
                yb = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
        yield i, logits, yb


def collect_gradients(model: nn.Module, data: Split | Any, tensors: list[str], num_grads: int,
                      batch_size: int = 1, seed: int = 0, sample_labels: bool = False,
                      progress: bool = False) -> Tensor:
    """Gradients of the cross-entropy w.r.t. ``tensors`` on ``num_grads`` mini-batches of ``batch_size``.

    ``data`` is a Split (mini-batches drawn at random, seeded) or any iterable of ``(x, y)`` batches such as
    the user's DataLoader (taken in order). Row i is the gradient of the mean loss over mini-batch i, i.e.
    the average of ``batch_size`` per-sample gradients (WoodFisher's ``--fisher-mini-bsz``). Masked tensors
    are differentiated through their original, so pruned entries get zero gradient. With ``sample_labels``
    the labels are drawn from the model's own predictive distribution: the outer products then estimate the
    true Fisher, which equals the Gauss-Newton matrix for softmax cross-entropy (used for OBD), instead of
    the empirical Fisher. The model is evaluated in eval mode (BatchNorm uses its running statistics).

    Shapes: -> (num_grads, total numel of ``tensors``).
    """
    params = [original(model, t) for t in tensors]
    out = torch.empty(num_grads, sum(p.numel() for p in params))
    for i, row in gradient_rows(model, data, tensors, num_grads, batch_size, seed, sample_labels, progress):
        out[i] = row
    return out


def gradient_rows(model: nn.Module, data: Split | Any, tensors: list[str], num_grads: int, batch_size: int = 1,
                  seed: int = 0, sample_labels: bool = False, progress: bool = False,
                  every: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, Tensor]]:
    """The rows of :func:`collect_gradients` one at a time, as ``(i, row)``, so a caller can hold a few.

    ``every=(r, k)`` yields only rows i with i % k == r (rank r's share of k ranks; the same rows a single
    process computes: every draw is made, only the other rows' forward and backward passes are skipped)."""
    import torch.nn.functional as F

    r, k = every
    if k > 1 and sample_labels:
        raise ValueError("gradient_rows: every= shares rows between ranks; sampled labels draw from the "
                         "generator per row and would differ.")
    g = torch.Generator().manual_seed(seed)
    params = [original(model, t) for t in tensors]
    was = model.training
    model.eval()
    bar = Progress("gradients", num_grads, enabled=progress)
    try:
        for i, logits, yb in _labelled_outputs(model, data, num_grads, batch_size, g, sample_labels, every):
            bar.update(i)
            grads = torch.autograd.grad(F.cross_entropy(logits, yb), params, allow_unused=True)
            yield i, torch.cat([torch.zeros(p.numel()) if gr is None else gr.flatten()
                                for p, gr in zip(params, grads, strict=True)])
        bar.update(num_grads)
    finally:
        bar.close()
        model.train(was)


def kfac_factors(model: nn.Module, data: Split | Any, layers: list[str], num_grads: int, batch_size: int = 1,
                 seed: int = 0, sample_labels: bool = False,
                 progress: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC's Kronecker factors (Martens & Grosse 2015, Sec. 3) of each Linear layer in ``layers``:
    ``A = E[a aᵀ]`` over the layer's inputs and ``G = E[g gᵀ]`` over the gradients of each sample's loss at the
    layer's outputs, from the same ``num_grads`` x ``batch_size`` samples :func:`collect_gradients` draws with
    ``seed`` (per-sample statistics: the mini-batch is only how they are computed). ``sample_labels`` draws the
    labels from the model's predictions (true Fisher, as K-FAC proper) instead of the data's (empirical Fisher).
    Returns float64 ``{layer: (A, G)}``."""
    import torch.nn.functional as F

    mods = {name: model.get_submodule(name) for name in layers}
    for name, m in mods.items():
        if not isinstance(m, nn.Linear):
            raise ValueError(f"kfac: K-FAC is implemented for Linear layers only; {name!r} is "
                             f"{type(m).__name__} (use woodfisher for convolutions).")
    acts: dict[str, Tensor] = {}
    sums = {n: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64),
                torch.zeros(m.out_features, m.out_features, dtype=torch.float64)] for n, m in mods.items()}
    def hook(name: str):
        def keep(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            acts[name] = inp[0].detach()
            if out.requires_grad:  # the gradient of the summed loss at this output: each sample's g_n
                out.register_hook(add_output_grad)

        def add_output_grad(go: Tensor) -> None:
            go = go.detach().double()
            sums[name][1].add_(go.T @ go)
        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in mods.items()]
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    count = 0
    bar = Progress("K-FAC factors", num_grads, enabled=progress)
    try:
        for i, logits, yb in _labelled_outputs(model, data, num_grads, batch_size, g, sample_labels):
            bar.update(i)
            F.cross_entropy(logits, yb, reduction="sum").backward()  # per-sample losses: g_n at each output
            for name in mods:
                a = acts[name].double()
                sums[name][0].add_(a.T @ a)
            count += len(yb)
        bar.update(num_grads)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        bar.close()
        model.train(was)
    return {n: (a / count, gg / count) for n, (a, gg) in sums.items()}
