"""Is it faster? The runtime (issue 19) on the committed DNS, Deep Compression and int8 MNIST files, against the
same architecture as a plain dense float32 nn.Module, torch's CSR kernels and onnxruntime.

    python bench/runtime_mnist.py --data-dir ../shared/data/mnist [--threads 2] [--repeats 200]

Per file and batch size (1, 256): latencies timed interleaved in this process with the same threads, median of
--repeats (runtime.bench.latency_report); resident bytes of the runtime module's weights; the test-set
predictions of every runtime form and of onnxruntime on the exported file against the dense model's. Then a
sweep: the dense LeNet-300-100 pruned one-shot (global magnitude) to 50..99.5% sparsity, for the plot of
speedup against sparsity with the FLOP-ratio bound. Writes bench/results/runtime_mnist.json and .png.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import netsurgeon as ns
from _common import (
    REPO,
    RESULTS,
    dense_model,
    dns_choice,
    load_dense,
    machine,
    parse_args,
    pyplot,
    rel,
    run_stages,
    save_figure,
    weight_counts,
    write_result,
)
from netsurgeon.latency import latency_report, ort_session
from netsurgeon.runtime import compile_runtime

FILES = {  # (model, label, file, goal); None: the DNS run bench/dns_mnist.py chose
    "dns_lenet300": ("lenet300", "DNS", None,
                     {"speedup_b1": 10.0, "speedup_b256": 10.0}),
    "dc_lenet300": ("lenet300", "DNS + k-means + Huffman (Deep Compression file)", "dc_lenet300_dns_huffman.nsz",
                    {"speedup_b1": 5.0, "resident_over_file": 3.0}),
    "int8_lenet300": ("lenet300", "int8 PTQ per channel", "int8_lenet300_channel.nsz", {"speedup_b256": 2.0}),
    "han_lenet300": ("lenet300", "magnitude per-layer (Han)", "han_lenet300_layer_float32.nsz", {}),
    "dns_lenet5": ("lenet5", "DNS", None, {}),
    "dc_lenet5": ("lenet5", "DNS + k-means + Huffman (Deep Compression file)", "dc_lenet5_dns_huffman.nsz", {}),
    "int8_lenet5": ("lenet5", "int8 PTQ per channel", "int8_lenet5_channel.nsz", {}),
}
SWEEP = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995]


@torch.inference_mode()
def _predictions(model, x: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([model(x[i:i + batch]).argmax(1).numpy() for i in range(0, len(x), batch)])


def _ort_predictions(path: Path, x: torch.Tensor, threads: int) -> np.ndarray:
    sess = ort_session(path, threads)
    return np.concatenate([sess.run(None, {"input": x[i:i + 256].numpy()})[0].argmax(1)
                           for i in range(0, len(x), 256)])


def measure_file(key: str, data, threads: int, repeats: int) -> dict:
    model_name, label, fname, goal = FILES[key]
    path = RESULTS / "files" / fname if fname else REPO / dns_choice(model_name)["file"]
    rep = {**latency_report(path, (1, 256), threads=threads, repeats=repeats), "file": rel(path)}
    dense = ns.load_compressed(path)
    x, y = data.test.x, data.test.y.numpy()
    ref = _predictions(dense, x, 256)
    out = {"label": label, "model": model_name, "file": rel(path), "latency": rep, "goal": goal,
           "dense_error_pct": 100 * float((ref != y).mean()), "runtime": {}}
    stored = ns.load_compressed(path, keep_codecs=True)
    for b in (1, 256):
        t0 = time.perf_counter()
        rt, plan = compile_runtime(stored, b, threads=threads)
        compile_s = time.perf_counter() - t0
        with ns.stats.num_threads(threads):
            pred = _predictions(rt, x, b)
        out["runtime"][str(b)] = {"compile_s": compile_s, "forms": {"+".join(r.layers): r.form for r in plan.runs},
                                  "same_predictions": int((pred == ref).sum()), "of": len(ref),
                                  "error_pct": 100 * float((pred != y).mean())}
    with tempfile.TemporaryDirectory() as tmp:
        ex = ns.export_onnx(path, Path(tmp) / "m.onnx")
        pred = _ort_predictions(ex.path, x, threads)
    out["onnx"] = {"file_bytes": ex.file_bytes, "dense_onnx_bytes": ex.dense_onnx_bytes, "forms": ex.compact,
                   "max_abs_logit_diff": ex.max_abs_logit_diff, "same_predictions": int((pred == ref).sum()),
                   "error_pct": 100 * float((pred != y).mean())}
    b1, b256 = rep["batches"]["1"], rep["batches"]["256"]
    got = {"speedup_b1": b1["speedup"]["runtime"], "speedup_b256": b256["speedup"]["runtime"],
           "resident_over_file": b1["runtime_resident_bytes"] / rep["file_bytes"]}
    out["overhead"] = call_overhead(dense.eval(), stored, threads, repeats)
    out["met"] = {k: bool(got[k] <= v if k == "resident_over_file" else got[k] >= v) for k, v in goal.items()}
    out["got"] = got
    return out


def call_overhead(dense, stored, threads: int, repeats: int) -> dict | None:
    """At batch 1, how much of the runtime's time is the kernel and how much the Python around it: the dense
    model, the whole runtime module, the fused chain's ``chain_forward`` (the compiled kernel plus its output
    array) and an empty ``nn.Module`` call, interleaved in one pass (medians). Only for files whose batch-1 runtime
    is one fused Linear chain (LeNet-300-100's); None otherwise."""
    from netsurgeon.kernels import fused
    from netsurgeon.kernels.modules import FusedLinearChain
    from netsurgeon.stats import time_interleaved

    rt, _ = compile_runtime(stored, 1, threads=threads)
    chains = [m for m in rt.modules() if isinstance(m, FusedLinearChain)]
    if len(chains) != 1 or any(isinstance(m, torch.nn.Conv2d) for m in stored.modules()):
        return None
    chain, x = chains[0], torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    xn = np.ascontiguousarray(x.numpy().reshape(1, -1))
    empty = torch.nn.Identity()
    with ns.stats.num_threads(threads):
        t = time_interleaved({"dense": lambda: dense(x), "runtime": lambda: rt(x),
                              "kernel": lambda: fused.chain_forward(chain.packed, xn),
                              "empty_module": lambda: empty(x)}, repeats * 5)
    us = {k: 1e6 * v for k, v in t.items()}
    return {"us": us, "python_overhead_us": us["runtime"] - us["kernel"],
            "kernel_share": us["kernel"] / us["runtime"], "speedup_if_no_overhead": us["dense"] / us["kernel"],
            "speedup": us["dense"] / us["runtime"]}


def sweep(data, threads: int, repeats: int) -> list[dict]:
    dense_path, _ = dense_model("lenet300", data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in SWEEP:
            m = load_dense(dense_path)
            run_stages(m, [{"magnitude": {"sparsity": s, "scope": "global", "epochs": 0}}], progress=False)
            f = Path(tmp) / f"s{s}.nsz"
            ns.save_compressed(m, f)
            rep = latency_report(f, (1, 256), threads=threads, repeats=repeats, onnx=False)
            rows.append({"sparsity": s, "flop_ratio_bound": rep["flop_ratio_bound"],
                         **{f"speedup_b{b}": rep["batches"][b]["speedup"]["runtime"] for b in ("1", "256")},
                         **{f"csr_speedup_b{b}": rep["batches"][b]["speedup"]["torch_csr"] for b in ("1", "256")},
                         "ms": {b: rep["batches"][b]["ms"] for b in ("1", "256")},
                         "forms": {b: [r["form"] for r in rep["batches"][b]["plan"]["runs"]] for b in ("1", "256")}})
            print(f"sweep {s}: bound {rep['flop_ratio_bound']:.1f}x, runtime b1 {rows[-1]['speedup_b1']:.2f}x "
                  f"b256 {rows[-1]['speedup_b256']:.2f}x", flush=True)
    return rows


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sw = res["sparsity_sweep"]
    kept = [100 * (1 - r["sparsity"]) for r in sw]
    for ax, b in zip(axes, ("1", "256"), strict=True):
        ax.plot(kept, [r["flop_ratio_bound"] for r in sw], "k--", label="FLOP-ratio bound")
        ax.plot(kept, [r[f"speedup_b{b}"] for r in sw], "o-", label="netsurgeon runtime")
        ax.plot(kept, [r[f"csr_speedup_b{b}"] for r in sw], "s-", label="torch CSR, every Linear")
        for key, r in res["files"].items():
            if r["model"] == "lenet300":
                lat = r["latency"]
                k = 100 * lat["flops_effective"] / lat["flops_dense"]
                ax.plot([k], [lat["batches"][b]["speedup"]["runtime"]], "*", ms=10, label=f"{key} (committed file)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights kept % (LeNet-300-100, global magnitude one-shot)")
        ax.set_ylabel("speedup over dense float32 nn.Module")
        ax.set_title(f"batch {b}, {res['threads']} threads")
        ax.legend(fontsize=6)
    save_figure(fig, path)


def main() -> None:
    t0 = time.perf_counter()

    def extra(ap) -> None:
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--repeats", type=int, default=200)

    args, data = parse_args(__doc__, ["lenet300", "lenet5"], "not supported for this benchmark", extra)
    torch.set_num_threads(args.threads)
    res = {"benchmark": "runtime_mnist", "paper": "issue 19 goals (no paper figure)", "machine": machine(),
           "threads": args.threads, "repeats": args.repeats, "files": {}, "table_rows": []}
    for key, (model_name, *_rest) in FILES.items():
        if model_name not in args.models:
            continue
        r = measure_file(key, data, args.threads, args.repeats)
        res["files"][key] = r
        lat = r["latency"]
        b1, b256 = lat["batches"]["1"], lat["batches"]["256"]
        res["table_rows"].append({
            "model": r["model"], "method": f"runtime: {r['label']}", "error_pct": r["runtime"]["256"]["error_pct"],
            "paper_error_pct": None, "dense_error_pct": None, "paper_dense_error_pct": None,
            "compression_nonzero": lat["flop_ratio_bound"], "compression_bytes": None, "paper_compression": None,
            "speedup_b1": b1["speedup"]["runtime"], "speedup_b256": b256["speedup"]["runtime"],
            # the dense model's median from the same interleaved pass as the runtime's (the ratio's two numbers)
            "dense_ms_b1": b1["dense_ms_per_pass"]["runtime"], "runtime_ms_b1": b1["ms"]["runtime"],
            "dense_ms_b256": b256["dense_ms_per_pass"]["runtime"], "runtime_ms_b256": b256["ms"]["runtime"],
            # the dense model through the same kernels: what is the runtime's, not the compression's
            "dense_runtime_ms_b1": b1["ms"]["dense_runtime"], "dense_runtime_ms_b256": b256["ms"]["dense_runtime"],
            "speedup_over_dense_runtime_b1": b1["runtime_over_dense_runtime"],
            "speedup_over_dense_runtime_b256": b256["runtime_over_dense_runtime"],
            "wall_s": r["runtime"]["256"]["compile_s"],  # choosing the kernels (timing the candidates)
            "target_met": all(r["met"].values()) if r["met"] else None, "call_overhead_b1": r.get("overhead"),
            **weight_counts(r["file"])})
        fb = 100 * (1 - r["runtime"]["256"]["same_predictions"] / r["runtime"]["256"]["of"])
        print(f"{key:14s} b1 {b1['speedup']['runtime']:.2f}x ({b1['ms']['runtime']:.4f} vs "
              f"{b1['dense_ms_per_pass']['runtime']:.4f} ms) b256 {b256['speedup']['runtime']:.2f}x | "
              f"resident {b1['runtime_resident_bytes']:,} B vs file "
              f"{lat['file_bytes']:,} B | predictions differ {fb:.2f}% | onnx {r['onnx']['file_bytes']:,} B "
              f"err {r['onnx']['error_pct']:.2f}% | met {r['met']}", flush=True)
    res["sparsity_sweep"] = sweep(data, args.threads, max(30, args.repeats // 4))
    res["wall_s"] = time.perf_counter() - t0
    write_result("runtime_mnist", res)
    plot(res, RESULTS / "runtime_mnist.png")
    print(f"wrote {RESULTS / 'runtime_mnist.json'} ({res['wall_s']:.0f} s); {REPO}")


if __name__ == "__main__":
    main()
