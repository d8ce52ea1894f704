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
from .masks import original
from .progress import Progress

__all__ = ["chance_accuracy", "dense_bytes", "size_words", "example_input", "cpu_name", "count_nonzero", "LayerFlops",
           "layer_flops", "total_flops", "Latency", "measure_latency", "num_threads", "collect_gradients",
           "saved_activation_bytes", "HessianAccumulator"]


@torch.no_grad()
def size_words(ratio: float) -> str:
    """A file size ratio (dense bytes / file bytes) as words a user reads one way: "3.94x smaller", or for a file
    bigger than the dense model "1.48x larger" (never "0.68x smaller")."""
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / max(ratio, 1e-12):.2f}x larger"


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

    Masked and otherwise parametrized tensors (codebooks, gates, hashed buckets) are counted as the effective
    tensor the forward pass uses, not the hidden original; everything else (norms, bare parameters) as it is.
    """
    from .masks import effective_state_dict

    eff = effective_state_dict(model)
    names = set()
    for name, _ in model.named_parameters():
        mod, sep, rest = name.rpartition("parametrizations.")
        names.add(f"{mod}{rest.split('.')[0]}" if sep else name)
    tensors = [eff[n] for n in names if n in eff]
    return sum(int((t != 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


def example_input(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1,
                  generator: torch.Generator | None = None) -> Tensor:
    """A batch the model accepts: token ids (int64, below every embedding's size) for a model whose architecture
    record says ``input_dtype: int64`` or whose first layer is an ``nn.Embedding``, random floats otherwise; drawn
    on the CPU (the same batch whatever the device, from a CPU ``generator``) and moved to the model's device."""
    from .changes import arch_of
    from .devices import model_device

    emb = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    tokens = (arch_of(model) or {}).get("input_dtype") == "int64" or (emb and first is emb[0])
    if tokens:
        high = min(m.num_embeddings for m in emb) if emb else 2
        x = torch.randint(0, high, (batch, *input_shape), generator=generator, device="cpu")
    else:
        x = torch.randn(batch, *input_shape, generator=generator, device="cpu")
    return x.to(model_device(model))


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one layer for one input sample (a multiply-add counts 2). ``effective`` skips zero weights."""

    name: str
    dense: int
    effective: int


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...], example: Tensor | None = None) -> list[LayerFlops]:
    """Dense and effective FLOPs of every weight site but embeddings (Linear, Conv, attention projections, Hugging
    Face Conv1D) for one sample of shape ``input_shape``.

    Dense: 2·(output positions)·(weights). Effective: 2·(output positions)·(nonzero weights), i.e. what a kernel
    that skips pruned weights would do. Bias additions, activations and the attention score products (which have
    no weights) are not counted; an embedding is a lookup (0 FLOPs). ``example``: a batch the model takes (its
    first row is run); default: ``example_input`` (noise, or token ids for a model that starts with an embedding).
    """
    from .masks import weight_sites

    sites = weight_sites(model, ("linear", "conv", "attention", "transposed"))
    positions: dict[str, int] = {}

    def record(name: str, module: nn.Module, out: Any) -> None:
        o = out[0] if isinstance(out, tuple) else out
        rows = module.nf if getattr(module, "nf", None) else (module.out_features if isinstance(module, nn.Linear)
                                                                else o.shape[1] if o.dim() > 2 else o.shape[-1])
        positions[name] = max(1, o[0].numel() // max(1, rows))

    def record_attention(name: str, module: nn.MultiheadAttention, args: tuple[Any, ...], out: Any) -> None:
        q = args[0]
        tokens = q.shape[1] if module.batch_first or q.dim() == 2 else q.shape[0]
        positions[name] = positions[f"{name}.out_proj"] = int(tokens if q.dim() == 3 else q.shape[0])

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: record_attention(n, mod, a, o)))
        elif any(s.module == name for s in sites):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: record(n, mod, o)))
    try:
        was_training = model.training
        model.eval()
        model(example[:1] if example is not None else example_input(model, input_shape))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for site in sites:
        w = getattr(model.get_submodule(site.module), site.attr)
        n = positions.get(site.module, 0)  # a layer the forward pass never ran costs nothing
        rows.append(LayerFlops(site.fqn.removesuffix(".weight"), 2 * n * w.numel(), 2 * n * int((w != 0).sum())))
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
        idx = torch.randint(len(data), (num_grads, batch_size), generator=g, device="cpu")  # CPU draws: any device
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
        if sample_labels:  # classes on dim 1: (B, C) logits, or a language model's (B, V, T) (next_token_logits)
            with torch.no_grad():
                p = logits.softmax(1).movedim(1, -1)
                # the CPU generator draws on the CPU (the same labels on any device), moved beside the logits
                yb = torch.multinomial(p.reshape(-1, p.shape[-1]).cpu(), 1, generator=g).view(p.shape[:-1]).to(p.device)
        yield i, logits, yb


def saved_activation_bytes(model: nn.Module, data: Split | Any, batch_size: int = 1) -> int:
    """Bytes autograd keeps for the backward of one mini-batch's cross-entropy, as :func:`gradient_rows` builds it,
    and the output the caller holds meanwhile: one forward pass (eval mode, no backward) of the first
    ``batch_size`` samples, each saved tensor's storage counted once, the parameters, buffers and input batch
    (resident anyway) left out. That is the activations of every layer, the masked weights a forward
    materializes and, for a language model, its (B, T, V) logits and their log-softmax; a shorter first batch of
    a loader is scaled up to ``batch_size``. 0 for empty data."""
    import torch.nn.functional as F

    xb = yb = None
    for xb, yb in batches(data, batch_size):
        xb, yb = xb[:batch_size], yb[:batch_size]
        break
    if yb is None or len(yb) == 0:
        return 0
    known = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), xb, yb)}
    held: list[Tensor] = []  # alive to the end, as the graph would keep them (and their addresses unique)

    def pack(t: Tensor) -> None:  # the graph keeps nothing: a saved output there would cycle to its own node
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            known.add(ptr)
            held.append(t)

    def unpack(_: None) -> Tensor:
        raise RuntimeError("saved_activation_bytes: the probe's graph is not for backward.")

    was = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = model(xb)
            if isinstance(out, Tensor):
                pack(out)  # the caller holds the output (logits) through the backward too
            F.cross_entropy(out, yb)
    finally:
        model.train(was)
    total = sum(t.untyped_storage().nbytes() for t in held)
    held.clear()
    return total * batch_size // len(yb)


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
    out = torch.empty(num_grads, sum(p.numel() for p in params), device=params[0].device if params else "cpu")
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
            yield i, torch.cat([torch.zeros(p.numel(), device=p.device) if gr is None else gr.flatten()
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
    Layers whose forward never ran are left out of the result. A Linear applied to a sequence, (B, T, in),
    counts each of its B·T positions as a sample (K-FAC-expand, the form for weight sharing over a sequence:
    Eschenhagen et al. 2023, arXiv 2311.00636). Returns float64 ``{layer: (A, G)}``."""
    import torch.nn.functional as F

    mods = {name: model.get_submodule(name) for name in layers}
    for name, m in mods.items():
        if not isinstance(m, nn.Linear):
            raise ValueError(f"kfac: K-FAC is implemented for Linear layers only; {name!r} is "
                             f"{type(m).__name__} (use woodfisher for convolutions).")
    acts: dict[str, Tensor] = {}
    sums = {n: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device),
                torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=m.weight.device)]
            for n, m in mods.items()}
    def hook(name: str):
        def keep(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            acts[name] = inp[0].detach()
            if out.requires_grad:  # the gradient of the summed loss at this output: each sample's g_n
                out.register_hook(add_output_grad)

        def add_output_grad(go: Tensor) -> None:
            go = go.detach().double().reshape(-1, go.shape[-1])
            sums[name][1].add_(go.T @ go)
        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in mods.items()]
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    count, ran = 0, set()
    bar = Progress("K-FAC factors", num_grads, enabled=progress)
    try:
        for i, logits, yb in _labelled_outputs(model, data, num_grads, batch_size, g, sample_labels):
            bar.update(i)
            F.cross_entropy(logits, yb, reduction="sum").backward()  # per-sample losses: g_n at each output
            for name in list(acts):
                ran.add(name)
                a = acts.pop(name).double()
                a = a.reshape(-1, a.shape[-1])
                sums[name][0].add_(a.T @ a)
            count += yb.numel()  # samples, or every position of a token model's sequences (each one a sample)
        bar.update(num_grads)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        bar.close()
        model.train(was)
    # a Linear whose forward never runs (nn.MultiheadAttention reads its out_proj's weight itself) has no factors
    return {n: (a / count, gg / count) for n, (a, gg) in sums.items() if n in ran}


def chance_accuracy(data: Any) -> float | None:
    """The test accuracy of always predicting the most frequent class of ``data.test`` (None when its labels are
    not class indices): a compressed model at this accuracy has collapsed to a constant."""
    y = getattr(getattr(data, "test", None), "y", None)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.numel() == 0 or y.is_floating_point():
        return None
    return float(torch.bincount(y).max()) / y.numel()


def dense_bytes(model: nn.Module) -> int:
    """The bytes ``model`` takes as dense float32: 4 x every element of its state dict (parameters and buffers;
    a tensor two layers share counts once).
    "File x smaller" is always this, for the model before compression (the architecture before structured pruning
    or factorization), divided by the compressed file's bytes on disk."""
    from .masks import effective_state_dict

    seen, total = set(), 0
    for t in effective_state_dict(model).values():
        key = (t.data_ptr(), tuple(t.shape)) if t.device.type != "meta" else (id(t),)
        if key not in seen or not t.numel():  # a weight two layers share (tied) counts once
            seen.add(key)
            total += t.numel()
    return 4 * total


class HessianAccumulator:
    """The layer-wise Hessian H = (2/N) Σ x xᵀ of ||W X − Ŵ X||², as a running average over N input vectors.

    SparseGPT and GPTQ both minimise a layer's output change on calibration inputs X (columns: token or patch
    vectors); its Hessian in each output row of W is the same matrix 2·X·Xᵀ (SparseGPT, Frantar & Alistarh 2023,
    arXiv:2301.00774, Sec. 3; GPTQ, Frantar et al. 2023, arXiv:2210.17323, Sec. 3). Their ``add_batch`` keeps it
    as a running average; this is that one accumulator, shared by SparseGPT, OBC, GPTQ and Wanda::

        H <- H · N/(N + b) + (2/(N + b)) · X_bᵀ X_b        (X_b: the batch's b input vectors as rows)

    N counts input *vectors* (tokens, or conv patches), not sequences as the official code does: a constant factor
    that changes neither a mask nor an update (damping is relative to mean(diag H)), and that keeps batches of
    different sequence lengths weighted per token.

    ``diagonal_only`` keeps just diag(H) = (2/N) Σ x_j² (Wanda needs ||X_j||₂ only): memory O(d) instead of O(d²).

    State dtype: float32 by default, as the official code. Each update is one matmul whose relative rounding
    (~1e-7·√b) is far below the 1% damping every solver adds before inverting, and float64 would double the
    largest allocation of the whole run (a d x d matrix per layer). Pass ``dtype=torch.float64`` for exact tests
    or badly scaled inputs.

    Shapes: ``add_batch(x)`` takes x (..., d); ``hessian`` is (d, d) (or (d,) when ``diagonal_only``).
    """

    def __init__(self, columns: int, *, dtype: torch.dtype = torch.float32, diagonal_only: bool = False,
                 device: torch.device | str | None = None) -> None:
        if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
            raise ValueError(f"HessianAccumulator: columns must be a positive integer; got {columns!r}.")
        self.columns, self.diagonal_only = columns, diagonal_only
        shape = (columns,) if diagonal_only else (columns, columns)
        self.hessian = torch.zeros(shape, dtype=dtype, device=device)
        self.count = 0  # input vectors seen (N)

    @staticmethod
    def nbytes(columns: int, dtype: torch.dtype = torch.float32, diagonal_only: bool = False) -> int:
        """Bytes of the state for ``columns`` inputs (for memory estimates before a run)."""
        return (columns if diagonal_only else columns * columns) * dtype.itemsize

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Fold one batch of input vectors into the running average. x: (..., d), any float dtype."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"HessianAccumulator: inputs have {x.shape[-1]} features; expected {self.columns}.")
        x = x.detach().reshape(-1, self.columns).to(self.hessian.dtype)
        b = x.shape[0]
        if b == 0:
            return
        self.hessian.mul_(self.count / (self.count + b))
        self.count += b
        if self.diagonal_only:
            self.hessian.add_(x.square().sum(0), alpha=2.0 / self.count)
        else:
            self.hessian.addmm_(x.T, x, alpha=2.0 / self.count)
