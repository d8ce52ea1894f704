"""Summaries, tables and plots of a (compressed) model. No compression math lives here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ._validation import atomic_save
from .data import Dataset
from .masks import sparsity_report
from .runtime import compile_runtime
from .stats import count_nonzero, dense_bytes, example_input, layer_flops, measure_latency, size_words
from .train import evaluate

__all__ = ["summarize", "summary_table", "layers_table", "file_table", "print_table", "plot_kept", "methods_table",
           "method_table"]


def summarize(model: nn.Module, input_shape: tuple[int, ...], *, data: Dataset | None = None,
              file_path: str | os.PathLike[str] | None = None, batches: Sequence[int] = (1, 256),
              threads: int | None = None, repeats: int = 50, reference: nn.Module | None = None) -> dict[str, Any]:
    """The numbers a user judges a compressed model by, as a JSON-ready dict.

    ``latency[b]`` holds one measurement: the runtime form (``runtime.compile_runtime`` at batch ``b``: each
    run of Linear layers on the kernel that times fastest) against ``reference``, the original dense model
    (default: the same architecture run densely, which costs what any dense weights cost), timed interleaved
    in this process with the same threads; ``speedup = dense_ms / runtime_ms`` of exactly those two medians.
    """
    from .architecture import original_model
    from .changes import arch_of

    nz, total = count_nonzero(model)
    one = _example_input(data, input_shape, 1, model)  # one sample the model takes (token ids where the data has them)
    flops = layer_flops(model, input_shape, one)
    out: dict[str, Any] = {
        "params": total, "nonzero": nz, "compression_nonzero": total / max(nz, 1),
        "dense_bytes": dense_bytes(model),
        "flops_dense": sum(r.dense for r in flops), "flops_effective": sum(r.effective for r in flops),
    }
    # arch_of: recorded by a model already built in this process, so its factory is trusted
    orig = original_model(arch_of(model), trust_code=True, device="cpu")
    if orig is not None:  # structured pruning: counts against the architecture before its layers shrank
        n0 = sum(p.numel() for p in orig.parameters())
        out.update(params_original=n0, compression_nonzero=n0 / max(nz, 1), dense_bytes=dense_bytes(orig),
                   flops_dense=sum(r.dense for r in layer_flops(orig, input_shape, one)))
        reference = reference if reference is not None else orig.eval()  # latency: against it, too
    if file_path is not None:
        out["file_bytes"] = os.path.getsize(file_path)
        out["compression_bytes"] = out["dense_bytes"] / out["file_bytes"]
    if data is not None:
        ev = evaluate(model, data.test)
        metric = getattr(data, "metric", "accuracy")
        out.update(metric=metric, test_accuracy=ev.accuracy, test_error_pct=100 * (1 - ev.accuracy), test_loss=ev.loss)
        if metric == "perplexity":
            out["test_perplexity"] = ev.perplexity
    lat = {}
    for b in batches:
        fast, plan = compile_runtime(model, b, threads=threads, repeats=repeats)  # the same timing budget
        x = _example_input(data, input_shape, b, model)
        r = measure_latency(fast, reference if reference is not None else model, x, threads=threads, repeats=repeats)
        lat[str(b)] = {"runtime_ms": 1e3 * r.model_s, "dense_ms": 1e3 * r.reference_s, "speedup": r.speedup,
                       "threads": r.threads, "forms": {"+".join(c.layers): c.form for c in plan.runs}}
    out["latency"] = lat
    return out


def _example_input(data: Any, input_shape: tuple[int, ...], batch: int, model: nn.Module) -> torch.Tensor:
    """``batch`` inputs to time with: for integer inputs (token ids), the test split's first rows repeated to fill
    the batch; else what ``stats.example_input`` gives the model (seeded noise, or token ids it takes)."""
    if data is not None:
        from .data import sample_batch

        x = sample_batch(data, 1)[0]
        if not x.is_floating_point():
            rows = data.test.x if hasattr(data.test, "x") else x
            return rows[torch.arange(batch) % len(rows)].clone()
    return example_input(model, input_shape, batch, torch.Generator().manual_seed(0))


def summary_table(rows: dict[str, dict[str, Any]], title: str = "") -> Table:
    """Columns = named summaries (e.g. before / after), rows = metrics."""
    t = Table(title=title or None)
    t.add_column("metric")
    for name in rows:
        t.add_column(name, justify="right")

    def fmt(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if key.endswith("_pct"):
            return f"{v:.2f}%"
        if "compression" in key or "speedup" in key:
            return f"{v:.2f}x"
        if isinstance(v, float):
            return f"{v:.4f}"
        return f"{v:,}"

    keys = ["test_perplexity", "test_error_pct", "params_original", "params", "nonzero", "compression_nonzero",
            "file_bytes", "compression_bytes",
            "flops_dense", "flops_effective"]
    for k in keys:
        if any(k in r for r in rows.values()):
            t.add_row(k, *[fmt(k, r.get(k)) for r in rows.values()])
    batches = sorted({b for r in rows.values() for b in r.get("latency", {})}, key=int)
    for b in batches:  # both times and the ratio come from one interleaved measurement per column
        t.add_row(f"batch {b}: runtime / dense ms", *[
            f"{r['latency'][b]['runtime_ms']:.3f} / {r['latency'][b]['dense_ms']:.3f}" if b in r.get("latency", {})
            else "-" for r in rows.values()])
        t.add_row(f"batch {b}: speedup vs dense", *[
            f"{r['latency'][b]['speedup']:.2f}x" if b in r.get("latency", {}) else "-" for r in rows.values()])
    return t


def layers_table(model: nn.Module, title: str = "") -> Table:
    """Per-tensor shape, nonzeros and kept % of a model in memory."""
    t = Table(title=title or None)
    for c in ("tensor", "shape", "nonzero", "kept %"):
        t.add_column(c, justify="left" if c == "tensor" else "right")
    for r in sparsity_report(model):
        t.add_row(r.name, "x".join(map(str, r.shape)), f"{r.nonzero:,}/{r.numel:,}", f"{100 * r.kept:.2f}")
    return t


def file_table(info: Any) -> Table:
    """Per-tensor table of a ``.nsz`` file (a :class:`netsurgeon.nsz.CompressedFile`)."""
    t = Table(title=f"{info.path}: {info.file_bytes:,} bytes, {size_words(info.compression)} than the model as "
                    f"dense float32 ({info.dense_bytes:,} bytes)",
              caption="codec shared/K+H: K shared values, Huffman-coded; bits: index / weight bits; entries: stored "
                      "values incl. fillers; pre-Huffman, bytes, dense: bytes before Huffman, in the file, as dense "
                      "float32")
    for c in ("tensor", "shape", "codec", "kept %", "bits", "entries", "pre-Huffman", "bytes", "dense"):
        t.add_column(c, justify="left" if c in ("tensor", "codec") else "right", no_wrap=True)
    from .forms import forms

    known = forms()
    for r in info.records:  # in the file's order, which is the model's state_dict order
        vbits = r.code_bits or {"float32": 32, "float16": 16, "int64": 64}.get(r.value_dtype, 0)
        codec = known[r.codec].describe(r)
        t.add_row(r.name, "x".join(map(str, r.shape)), codec, f"{100 * r.kept:.2f}",
                  f"{r.index_bits or '-'} / {vbits}", f"{r.entries:,}", f"{r.bytes_fixed or r.bytes:,}",
                  f"{r.bytes:,}", f"{4 * r.numel:,}")
    return t


def print_table(table: Table) -> None:
    """Print a table to stdout: the terminal's width on a terminal, 100 columns otherwise (files, pipes)."""
    import sys

    Console(width=None if sys.stdout.isatty() else 100).print(table)


def plot_kept(series: dict[str, dict[str, float]], path: str | os.PathLike[str], title: str) -> None:
    """Bar chart of kept % per layer, one bar group per named series (e.g. ours vs paper). Atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(layers) + 2), 3.5))
    width = 0.8 / len(series)
    for i, (name, kept) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [kept.get(layer, 0.0) for layer in layers], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
    ax.set_ylabel("weights kept (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def methods_table(methods: dict[str, Any]) -> Table:
    """One row per registered method: name, kind, what it does, paper."""
    t = Table(title="compression methods (netsurgeon methods NAME for options)")
    for col in ("method", "kind", "what it does", "paper"):
        t.add_column(col, overflow="fold")
    order = {"training": 1, "oneshot": 0, "quantizer": 2, "codec": 3}
    for m in sorted(methods.values(), key=lambda m: (order.get(m.kind, 9), m.name)):
        t.add_row(m.name, m.kind, m.summary, m.citation)
    return t


def method_table(method: Any) -> Table:
    """The options of one method: key, type and range, default, help."""
    t = Table(title=f"options of {method.name} (--set key=value)")
    for col in ("key", "type / range", "default", "help"):
        t.add_column(col, overflow="fold")
    for row in method.config.describe():
        t.add_row(row["key"], row["type"], repr(row["default"]), row["help"])
    return t
