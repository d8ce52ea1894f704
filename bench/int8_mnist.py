"""8-bit quantization on MNIST: post-training (per tensor, per channel) and quantization-aware training,
with the int8 file size and the latency of PyTorch's int8 kernels against float32 in the same process.

Post-training quantization is deterministic (no seed to vary); QAT (1 epoch from the dense model) runs with seeds
0, 1, 2 (batch order) and its row is the mean +- std of the three.

    python bench/int8_mnist.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import time

import torch

import netsurgeon as ns
from _common import (
    RESULTS,
    cached_json,
    dense_model,
    load_dense,
    machine,
    mean_std,
    parse_args,
    pyplot,
    rel,
    run_stages,
    save_figure,
    train_options,
    weight_counts,
    write_result,
)
from _common import latency as latency_common
from netsurgeon.stats import measure_latency

SEEDS = (0, 1, 2)


def run(name: str, data) -> dict:
    dense_path, _ = dense_model(name, data)
    out = {"float32_error_pct": 100 * (1 - ns.evaluate(load_dense(dense_path), data.test)[1]),
           "dense_file": rel(dense_path)}
    for label, per_channel in (("PTQ per tensor", False), ("PTQ per channel", True)):
        m = load_dense(dense_path)
        run_stages(m, [{"int8": {"per_channel": per_channel}}])
        f = RESULTS / "files" / f"int8_{name}_{'channel' if per_channel else 'tensor'}.nsz"
        info = ns.save_compressed(m, f)
        out[label] = {"test_error_pct": 100 * (1 - ns.evaluate(ns.load_compressed(f), data.test)[1]),
                      "file_bytes": info.file_bytes, "compression_bytes": info.compression, "file": rel(f)}
    seeds = {}
    for seed in SEEDS:
        m = load_dense(dense_path)
        t = time.perf_counter()
        # fake-quantized training, then int8 weights per channel (the qat stage's finalize)
        run_stages(m, [{"qat": train_options(ns.TrainConfig(epochs=1, lr=0.001, schedule="cosine", seed=seed))}],
                   data)
        f = RESULTS / "files" / f"int8_{name}_qat{f'_seed{seed}' if seed else ''}.nsz"
        info = ns.save_compressed(m, f)
        seeds[seed] = {"test_error_pct": 100 * (1 - ns.evaluate(ns.load_compressed(f), data.test)[1]),
                       "file_bytes": info.file_bytes, "compression_bytes": info.compression,
                       "wall_s": time.perf_counter() - t, "file": rel(f)}
    mean, std = mean_std([v["test_error_pct"] for v in seeds.values()])
    out["QAT per channel (1 epoch)"] = {**seeds[0], "test_error_pct": mean, "test_error_pct_std": std,
                                        "per_seed": seeds}
    return out


def rows(name: str, r: dict) -> list[dict]:
    """The table rows (one counting rule: weights only, biases apart; speed: the runtime form vs the dense model)."""
    out = []
    for label in ("PTQ per tensor", "PTQ per channel", "QAT per channel (1 epoch)"):
        v = r[label]
        lat = latency_common(v["file"])
        out.append({"model": name, "method": f"int8 {label}" + (" [3 seeds]" if "per_seed" in v else ""),
                    "error_pct": v["test_error_pct"], "error_pct_std": v.get("test_error_pct_std"),
                    "paper_error_pct": None, "dense_error_pct": r["float32_error_pct"], "paper_dense_error_pct": None,
                    "compression_nonzero": 1.0, "paper_compression": None, "compression_bytes": v["compression_bytes"],
                    "speedup_b1": lat["1"]["speedup"], "speedup_b256": lat["256"]["speedup"],
                    "wall_s": v.get("wall_s"), "target_met": None, **weight_counts(v["file"])})
    return out


def latency(name: str) -> dict:
    f = RESULTS / "files" / f"int8_{name}_channel.nsz"
    ref = ns.load_compressed(f)                        # same (dequantized) weights in float32
    out = {}
    for b in (1, 256):
        fast = ns.load_compressed(f, runtime=True, batch=b, threads=2)  # the runtime's choice (int8 or dense)
        x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        lat = measure_latency(fast, ref, x, repeats=100, threads=2)
        out[str(b)] = {"int8_ms": 1e3 * lat.model_s, "float32_ms": 1e3 * lat.reference_s, "speedup": lat.speedup}
    return out


def main() -> None:
    args, data = parse_args(__doc__, ["lenet300", "lenet5"], "not supported for this benchmark")
    res = {"benchmark": "int8_mnist", "machine": machine(), "models": {}, "table_rows": [],
           "seeds": {"PTQ": "deterministic (no seed)", "QAT": list(SEEDS)}}
    for name in args.models:
        r = cached_json(f"int8_{name}_seeds", lambda name=name: run(name, data), args.fresh)
        r["latency_int8_linear_vs_float32"] = latency(name)   # re-measured on every run
        res["models"][name] = r
        res["table_rows"] += rows(name, r)
        print(name, {k: v for k, v in r.items() if k != "latency_int8_linear_vs_float32"})
        print(name, r["latency_int8_linear_vs_float32"])
    write_result("int8_mnist", res)
    _plot(res)


def _plot(res: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, vals = [], []
    for name, r in res["models"].items():
        for b, v in r["latency_int8_linear_vs_float32"].items():
            labels.append(f"{name}\nbatch {b}")
            vals.append(v["speedup"])
    ax.bar(labels, vals)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("int8 speedup vs float32 (x)")
    save_figure(fig, RESULTS / "int8_mnist.png")


if __name__ == "__main__":
    main()
