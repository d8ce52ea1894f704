"""``netsurgeon bench-latency``: how fast a ``.nsz`` file runs, every way it can run, in one process.

For each batch size, these are timed interleaved (same process, same threads, median of ``repeats``):

- ``dense``: the same architecture as a plain float32 ``nn.Module`` (the reference of every ratio); for a
  structured-pruned file, the architecture before its layers shrank (random weights: latency does not depend
  on the values of dense weights);
- ``runtime``: ``compile_runtime`` at that batch (the form netsurgeon runs);
- ``dense_runtime``: ``compile_runtime`` of the dense model with random nonzero weights: what the runtime's
  kernels give a model with nothing compressed (max-pooling, for LeNet-5). ``runtime_over_dense_runtime``
  (the ratio of the two columns) credits the compression alone;
- ``torch_csr``: every Linear layer with nonzeros on torch's CSR kernel (the plain torch sparse route);
- ``ort_dense`` / ``ort_export``: onnxruntime on ``torch.onnx.export``'s dense file and on the compact file of
  ``netsurgeon export`` (when onnx/onnxruntime are installed).

Each candidate is timed in its own pass, interleaved with the dense model alone; its ratio is against that
pass's dense median (``dense_ms_per_pass``), and both medians are printed beside the ratio. Timed beside other
candidates, the dense model itself ran up to 1.2x slower (a large CSR matrix evicting its weights; torch slowed
between onnxruntime calls), which would flatter every column.

Next to each measured speedup: the FLOP-ratio bound (dense FLOPs / FLOPs of the nonzero weights), and the
resident bytes of the runtime module's weights next to the file's bytes.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .kernels.modules import CSRLinear, resident_bytes
from .runtime import compile_runtime
from .stats import example_input, num_threads, time_interleaved, total_flops

__all__ = ["latency_report", "csr_form", "dense_weights", "report_lines", "ort_session"]


def csr_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear layers all run torch's CSR matmul."""
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, attr, CSRLinear(m.weight.detach(), m.bias))
    return out


@torch.no_grad()
def dense_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose every parameter is random and nonzero: the same architecture as an uncompressed
    model (a file's own weights carry its zeros, which the runtime would exploit)."""
    out = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    for p in out.parameters():
        p.copy_((torch.rand(p.shape, generator=g) + 0.5) * 0.05)
    return out


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # onnxruntime's workers busy-wait after each run by default: timed interleaved, they would steal the cores
    # from the next candidate (measured: dense torch 0.68 ms -> 2.6-4.8 ms at batch 256)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_report(path: str | os.PathLike[str], batches: Sequence[int] = (1, 256), *, threads: int = 2,
                   repeats: int = 100, trust_code: bool = False, onnx: bool = True) -> dict[str, Any]:
    """The numbers of ``netsurgeon bench-latency`` as a JSON-ready dict (see the module doc). Freed memory is
    kept for reuse from here on in this process (:func:`netsurgeon.stats.keep_freed_memory`), as every benchmark
    does, so no model pays page faults by allocation history."""
    from .architecture import original_model
    from .changes import arch_of
    from .modelfile import load_compressed
    from .stats import keep_freed_memory

    allocator = keep_freed_memory()
    path = Path(path)
    dense = load_compressed(path, trust_code=trust_code)
    shape = tuple((arch_of(dense) or {}).get("input_shape") or ())
    original = original_model(arch_of(dense), trust_code=trust_code, device="cpu")
    if original is not None:  # structured pruning: the reference is the architecture before layers shrank
        dense = original.eval()
    if not shape:
        raise ValueError(f"bench-latency: {str(path)!r} records no input shape.")
    stored = load_compressed(path, trust_code=trust_code, keep_codecs=True)
    flops_dense, flops_eff = total_flops(dense, shape)[0], total_flops(stored, shape)[1]
    out: dict[str, Any] = {
        "file": str(path), "file_bytes": path.stat().st_size, "threads": threads, "allocator": allocator,
        "input_shape": list(shape),
        "dense_weight_bytes": resident_bytes(dense), "structured": original is not None,
        "flops_dense": flops_dense, "flops_effective": flops_eff,
        "flop_ratio_bound": flops_dense / max(flops_eff, 1), "batches": {}}
    onnx_ok = False
    if onnx:
        try:
            from .export import dense_onnx, export_onnx, require_onnx

            require_onnx("bench-latency's onnxruntime columns")
            onnx_ok = True
        except ImportError as e:
            out["onnx_skipped"] = str(e)
    with tempfile.TemporaryDirectory() as tmp, num_threads(threads):
        sessions = {}
        if onnx_ok:
            ex = export_onnx(path, Path(tmp) / "compact.onnx", trust_code=trust_code)
            dense_file = Path(tmp) / "dense.onnx"
            dense_onnx(dense, shape, dense_file, 17)
            sessions = {"ort_dense": ort_session(dense_file, threads),
                        "ort_export": ort_session(ex.path, threads)}
            out.update(onnx_bytes=ex.file_bytes, onnx_dense_bytes=dense_file.stat().st_size,
                       onnx_max_abs_logit_diff=ex.max_abs_logit_diff)
        csr = csr_form(load_compressed(path, trust_code=trust_code))  # the file's own weights, on torch CSR
        filled = dense_weights(dense)  # no zero to exploit: the runtime can only choose what any model gets
        for b in batches:
            runtime, plan = compile_runtime(stored, b, threads=threads)
            dense_runtime = compile_runtime(filled, b, threads=threads)[0]
            x = example_input(dense, shape, b, torch.Generator().manual_seed(0))
            xn = x.numpy()
            cands: dict[str, Callable[[], Any]] = {"runtime": lambda x=x, r=runtime: r(x),
                                                   "dense_runtime": lambda x=x, r=dense_runtime: r(x),
                                                   "torch_csr": lambda x=x: csr(x)}
            for k, s in sessions.items():
                cands[k] = lambda s=s, xn=xn: s.run(None, {"input": xn})
            # one pass per candidate, each against the dense model alone: timed beside a third candidate, the
            # dense model ran up to 1.2x slower (a large CSR matrix evicting its weights), and between
            # onnxruntime calls torch itself slows down (34 -> 46 us for dense LeNet-300-100 at batch 1)
            row: dict[str, Any] = {"ms": {}, "speedup": {}, "dense_ms_per_pass": {}, "plan": plan.to_dict(),
                                   "runtime_resident_bytes": plan.resident_bytes}
            for k, f in cands.items():
                t = time_interleaved({"dense": lambda x=x: dense(x), k: f}, repeats)
                row["ms"][k], row["speedup"][k] = 1e3 * t[k], t["dense"] / t[k]
                row["dense_ms_per_pass"][k] = 1e3 * t["dense"]
            # the compression's own share: the two runtime forms timed against each other in one pass
            t = time_interleaved({"runtime": cands["runtime"], "dense_runtime": cands["dense_runtime"]}, repeats)
            row["runtime_over_dense_runtime"] = t["dense_runtime"] / t["runtime"]
            row["runtime_vs_dense_runtime_ms"] = {"runtime": 1e3 * t["runtime"],
                                                  "dense_runtime": 1e3 * t["dense_runtime"]}
            out["batches"][str(b)] = row
    return out


def report_lines(r: dict[str, Any]) -> list[str]:
    """Plain-text table of :func:`latency_report`: one line per candidate and batch, with the two medians its
    ratio comes from (the candidate's and the dense model's, timed interleaved in the same pass)."""
    lines = [f"{r['file']}: {r['file_bytes']:,} bytes on disk; dense float32 weights {r['dense_weight_bytes']:,} "
             f"bytes; {r['threads']} threads; FLOP-ratio bound {r['flop_ratio_bound']:.1f}x",
             f"allocator: {r.get('allocator', 'default')}"]
    if "onnx_bytes" in r:
        lines.append(f"ONNX: compact export {r['onnx_bytes']:,} bytes (torch.onnx.export dense: "
                     f"{r['onnx_dense_bytes']:,}); max |logit diff| vs PyTorch {r['onnx_max_abs_logit_diff']:.1e}")
    elif "onnx_skipped" in r:
        lines.append(f"(no onnxruntime columns: {r['onnx_skipped']})")
    lines.append("batch | candidate | candidate ms | dense ms (same pass) | speedup")
    for b, v in r["batches"].items():
        for c, ms in v["ms"].items():
            if c != "dense":
                lines.append(f"{b} | {c} | {ms:.4f} | {v['dense_ms_per_pass'][c]:.4f} | {v['speedup'][c]:.2f}x")
        forms = ", ".join(f"{'+'.join(x['layers'])}: {x['form']}" for x in v["plan"]["runs"])
        lines.append(f"{b} | runtime plan | resident weights {v['runtime_resident_bytes']:,} bytes | {forms}")
    lines.append("of which compression (runtime over the dense model's runtime form, which gets the same kernels for "
                 "uncompressed layers; both medians from one pass): " + ", ".join(
                     f"batch {b} {v['runtime_vs_dense_runtime_ms']['dense_runtime']:.4f} / "
                     f"{v['runtime_vs_dense_runtime_ms']['runtime']:.4f} ms = "
                     f"{v['runtime_over_dense_runtime']:.2f}x" for b, v in r["batches"].items()))
    return lines
