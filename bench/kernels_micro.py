"""Layer-level speed of the compressed-format kernels against the dense layer (issue 38).

    python bench/kernels_micro.py [--threads 2 1] [--rounds 3] [--only linear|conv] [--quick]

Rows: GPT-2-small FFN Linear layers (768 -> 3072, 3072 -> 768) at batch 1 (and 8, 64 for the small-batch
range) as unstructured 90% sparse (``SparseLinear``), 2:4 (``NMLinear``), int4 group 128 (``QuantLinear``),
int8 group 128 and int4 + 2:4 (``QuantNMLinear``); ResNet-18-shaped convolutions at 90% unstructured sparsity
(``SparseConv2d``) at batch 1 and 32. Each kernel is timed against ``F.linear`` / ``F.conv2d`` on the dense
float32 form of the same weight (masked, or dequantized) and the same input, interleaved in one process with
the same threads (``time_interleaved``: medians). Convolutions: the dense layer is timed on the NCHW input
and on the same input channels-last, and the faster of the two is the reference (oneDNN's native order).
Every row is measured in ``--rounds`` rounds (fresh interleaving each); the row keeps the median round and the
spread of the round speedups as its noise. Weights are random (seeded) with random masks: magnitude pruning
of a trained layer gives less even rows, which costs the windowed layout more padding.

Writes bench/results/kernels_micro.json: per row dense_ms, kernel_ms, speedup, bound (at batch 1 for Linear
layers the dense weight's bytes over the file form's, ``bytes_ratio_resident`` over what the kernel holds and
reads; the FLOP ratio otherwise), threads, resident and file bytes, the largest relative error against
the dense output; the machine (CPU model from /proc/cpuinfo), torch version and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import RESULTS, machine, write_result
from netsurgeon.kernels import simd
from netsurgeon.kernels.quant_linear import QuantLinear, QuantNMLinear
from netsurgeon.kernels.sparse_conv import SparseConv2d
from netsurgeon.kernels.sparse_linear import NMLinear, SparseLinear
from netsurgeon.stats import time_interleaved

FFN = [(768, 3072), (3072, 768)]
CONVS = [  # (name, in, out, size, kernel, stride)
    ("layer1 3x3", 64, 64, 56, 3, 1), ("layer2.0 3x3 s2", 64, 128, 56, 3, 2), ("layer2 3x3", 128, 128, 28, 3, 1),
    ("layer3.0 3x3 s2", 128, 256, 28, 3, 2), ("layer3 3x3", 256, 256, 14, 3, 1),
    ("layer4.0 3x3 s2", 256, 512, 14, 3, 2), ("layer4 3x3", 512, 512, 7, 3, 1),
    ("layer2.0 downsample 1x1 s2", 64, 128, 56, 1, 2), ("layer3.0 downsample 1x1 s2", 128, 256, 28, 1, 2),
    ("layer4.0 downsample 1x1 s2", 256, 512, 14, 1, 2),
]
TARGETS = {"unstructured 90%": 5.0, "2:4": 1.5, "int4 g128": 4.0, "int4 + 2:4 g128": 5.0, "conv 90%": 2.0}


def _nm_mask(out: int, n_in: int, n: int, m: int, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(out, n_in // m, m, generator=g).argsort(2)[:, :, :n]
    return torch.zeros(out, n_in // m, m).scatter_(2, keep, 1.0).reshape(out, n_in)


def linear_cases(g: torch.Generator):
    """(format, module, dense float32 weight it computes with, bias) per FFN shape."""
    for n_in, n_out in FFN:
        w = torch.randn(n_out, n_in, generator=g) * 0.02
        b = torch.randn(n_out, generator=g) * 0.02
        sparse = w * (torch.rand(n_out, n_in, generator=g) >= 0.9)
        m = SparseLinear.from_dense(sparse, b)
        yield (n_in, n_out), "unstructured 90%", m, sparse, b
        w24 = w * _nm_mask(n_out, n_in, 2, 4, g)
        yield (n_in, n_out), "2:4", NMLinear.from_dense(w24, b, 2, 4), w24, b
        q = QuantLinear.from_dense(w, b, 4, 128)
        yield (n_in, n_out), "int4 g128", q, q.dequantized(), b
        q8 = QuantLinear.from_dense(w, b, 8, 128)
        yield (n_in, n_out), "int8 g128", q8, q8.dequantized(), b
        qnm = QuantNMLinear.from_dense(w24, b, 2, 4, 128)
        yield (n_in, n_out), "int4 + 2:4 g128", qnm, qnm.dequantized(), b


def _bytes_bounds(m, n_in: int, n_out: int) -> tuple[float, float]:
    """Dense float32 weight bytes over the compressed form's: its file bytes (the issue's bound) and the bytes
    the kernel reads per call (its resident arrays, padding included; the bias, which both read, left out)."""
    dense = 4 * n_in * n_out
    return dense / m.file_bytes(), dense / (m.resident_bytes() - 4 * n_out)


def _time_rounds(fns: dict, repeats: int, rounds: int) -> list[dict]:
    return [time_interleaved(fns, repeats, warmup=3) for _ in range(rounds)]


def _summarize(rounds: list[dict], ref: str = "dense", kernel: str = "kernel") -> dict:
    ratios = [r[ref] / r[kernel] for r in rounds]
    mid = sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]
    return {"dense_ms": round(rounds[mid][ref] * 1e3, 4), "kernel_ms": round(rounds[mid][kernel] * 1e3, 4),
            "speedup": round(ratios[mid], 2), "speedup_rounds": [round(v, 2) for v in ratios]}


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def run_linear(threads: int, rounds: int, batches: list[int], log) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for (n_in, n_out), fmt, mod, w, b in linear_cases(g):
        for batch in batches:
            x = torch.randn(batch, n_in, generator=g)
            with torch.inference_mode():
                err = _rel_err(mod(x), F.linear(x, w, b))
            repeats = 200 if batch == 1 else 60
            res = _summarize(_time_rounds({"dense": lambda x=x, w=w, b=b: F.linear(x, w, b),
                                           "kernel": lambda x=x, m=mod: m(x)}, repeats, rounds))
            file_bound, held_bound = _bytes_bounds(mod, n_in, n_out)
            bound = file_bound if batch == 1 else 1 / 0.1 if fmt.startswith("unstructured") else \
                2.0 if "2:4" in fmt else 1.0
            row = {"layer": f"GPT-2 FFN {n_in}->{n_out}", "format": fmt, "batch": batch, "threads": threads, **res,
                   "bound": round(bound, 2), "bound_kind": "bytes (file)" if batch == 1 else "flops",
                   "bytes_ratio_resident": round(held_bound, 2),
                   "target": TARGETS.get(fmt) if batch == 1 else None, "resident_bytes": mod.resident_bytes(),
                   "file_bytes": mod.file_bytes(),
                   "resident_over_file": round(mod.resident_bytes() / mod.file_bytes(), 3),
                   "max_rel_err": err}
            rows.append(row)
            log(row)
    return rows


def run_conv(threads: int, rounds: int, batches: list[int], log, quick: bool = False) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    for name, cin, cout, size, k, s in CONVS[:3] if quick else CONVS:
        w = torch.randn(cout, cin, k, k, generator=g) * 0.05
        w = w * (torch.rand(w.shape, generator=g) >= 0.9)
        b = torch.randn(cout, generator=g) * 0.05
        mod = SparseConv2d.from_dense(w, b, s, k // 2)
        for batch in batches:
            x = torch.randn(batch, cin, size, size, generator=g)
            xl = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                err = _rel_err(mod(x), F.conv2d(x, w, b, s, k // 2))
            repeats = 40 if batch == 1 else 8
            args = (w, b, s, k // 2)
            fns = {"dense": lambda x=x, a=args: F.conv2d(x, *a), "dense_cl": lambda xl=xl, a=args: F.conv2d(xl, *a),
                   "kernel": lambda x=x, m=mod: m(x)}
            rs = _time_rounds(fns, repeats, rounds)
            best = [dict(r, best=min(r["dense"], r["dense_cl"])) for r in rs]
            res = _summarize(best, ref="best")
            mid = res["speedup_rounds"].index(res["speedup"])
            oh = (size + 2 * (k // 2) - k) // s + 1
            w_ph = -(-(size + 2 * (k // 2)) // s)
            junk = w_ph / oh  # computed columns per valid one (module docstring)
            row = {"layer": f"ResNet-18 {name} {cin}->{cout} @{size}", "format": "conv 90%", "batch": batch,
                   "threads": threads, **res, "dense_nchw_ms": round(rs[mid]["dense"] * 1e3, 4),
                   "dense_channels_last_ms": round(rs[mid]["dense_cl"] * 1e3, 4),
                   "bound": round(w.numel() / max(mod.nnz, 1), 2), "bound_kind": "flops",
                   "computed_over_valid_positions": round(junk, 3), "target": TARGETS["conv 90%"],
                   "resident_bytes": mod.resident_bytes(), "file_bytes": mod.file_bytes(),
                   "resident_over_file": round(mod.resident_bytes() / mod.file_bytes(), 3), "max_rel_err": err}
            rows.append(row)
            log(row)
    return rows


def call_overhead(threads: int) -> dict:
    """The fixed cost of one call: a 64 -> 16 layer (one chunk, one window) against F.linear on the same."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g) * (torch.rand(16, 64, generator=g) >= 0.9)
    m = SparseLinear.from_dense(w)
    x = torch.randn(1, 64, generator=g)
    r = time_interleaved({"dense": lambda: F.linear(x, w), "kernel": lambda: m(x)}, 2000, warmup=50)
    return {"threads": threads, "sparse_linear_16x64_us": round(r["kernel"] * 1e6, 2),
            "f_linear_16x64_us": round(r["dense"] * 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["linear", "conv"])
    ap.add_argument("--quick", action="store_true", help="fewer rows and rounds (a smoke run; not written)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other thread counts already in the result file (runs taken apart in time, "
                         "e.g. when the shared machine was quieter; each run's machine line is kept per thread count)")
    args = ap.parse_args()
    if not simd.available():
        raise SystemExit("kernels_micro: these kernels need numba and an AVX-512 host.")
    t0 = time.time()

    def log(row: dict) -> None:
        print(f"{row['threads']}t b{row['batch']:<3} {row['layer']:<46} {row['format']:<17} dense "
              f"{row['dense_ms']:8.3f} ms  kernel {row['kernel_ms']:8.3f} ms  {row['speedup']:5.2f}x "
              f"(rounds {row['speedup_rounds']}, bound {row['bound']}x {row['bound_kind']})", flush=True)

    rows, overhead = [], []
    rounds = 1 if args.quick else args.rounds
    for threads in args.threads:
        torch.set_num_threads(threads)
        overhead.append(call_overhead(threads))
        if args.only in (None, "linear"):
            rows += run_linear(threads, rounds, [1] if args.quick else [1, 8, 64], log)
        if args.only in (None, "conv"):
            rows += run_conv(threads, rounds, [1] if args.quick else [1, 32], log, args.quick)
    if args.quick:
        return
    runs = {str(t): {"machine": machine(), "load_average_at_end": _loadavg(), "wall_s": round(time.time() - t0, 1)}
            for t in args.threads}
    if args.append and (RESULTS / "kernels_micro.json").is_file():
        old = json.loads((RESULTS / "kernels_micro.json").read_text())
        rows = [r for r in old["rows"] if r["threads"] not in args.threads] + rows
        overhead = [o for o in old["call_overhead"] if o["threads"] not in args.threads] + overhead
        runs = {**{k: v for k, v in old.get("runs", {}).items() if int(k) not in args.threads}, **runs}
    result = {
        "machine": machine(), "threads": sorted({r["threads"] for r in rows}, reverse=True), "rounds": rounds,
        "runs": runs,
        "how": "each kernel against F.linear / F.conv2d on the dense float32 form of the same weight, interleaved "
               "in one process with the same threads (time_interleaved medians); the median of the rounds, "
               "speedup_rounds the spread. Conv reference: the faster of NCHW and channels-last dense.",
        "call_overhead": overhead, "rows": rows,
    }
    path = write_result("kernels_micro", result)
    print(f"wrote {path} in {time.time() - t0:.0f} s; speedups by format at batch 1: " + ", ".join(
        f"{k}: {statistics.median([r['speedup'] for r in rows if r['format'] == k and r['batch'] == 1]):.2f}x"
        for k in dict.fromkeys(r["format"] for r in rows)))


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


if __name__ == "__main__":
    np.random.seed(0)
    main()
