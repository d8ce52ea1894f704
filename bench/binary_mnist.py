"""Binary networks on MNIST (issue 21): BinaryConnect (deterministic, stochastic), BWN, loss-aware binarization
(Hou et al. 2017, issue 20) and BNN MLPs, XNOR-Net, BWN and HWGQ on LeNet-5, each beside the same architecture
trained in float with the same data, loss, optimizer and epochs; the .nsz file bytes; and the latency of the
XNOR + popcount runtime against float32, interleaved in one process.

    python bench/binary_mnist.py --data-dir ../shared/data/mnist [--epochs 10] [--bnn-wide-epochs 3]

Protocol (the authors' code, ../shared/papers/binary.md): 50,000 / 10,000 / 10,000 split; batch 100; Adam
with the LR decayed exponentially per epoch (``schedule=exp``); squared hinge loss on a BatchNorm output layer
for the MLPs; test error of the epoch with the best *validation* error (the papers' rule). The papers train
250-1000 epochs on a GPU; this CPU budget allows ``--epochs`` (say so beside every row). One seed.
Training stages are cached (bench/.cache) and checkpointed, so an interrupted run resumes; the latency stage
is re-measured on every run.

Every run goes through ns.Pipeline (``netsurgeon compress``'s code path): one training stage per setup with
``select=best_val`` (the epoch best on validation, weights and method state together), checkpointed under
bench/.cache so an interrupted run resumes; stochastic BinaryConnect's real-weight error is read by a pipeline
callback at the end of training, before the stage binarizes (tests/test_bench_pipeline.py pins each stage list
to the direct calls this script made before: the same weights and file bytes).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

import netsurgeon as ns
from _common import (
    CACHE,
    RESULTS,
    cached_json,
    machine,
    pyplot,
    rel,
    save_figure,
    train_options,
    weight_counts,
    write_result,
)
from netsurgeon.kernels import bitops
from netsurgeon.kernels import fused as kernels
from netsurgeon.runtime import compile_runtime
from netsurgeon.stats import time_interleaved, time_models
from netsurgeon.train import recalibrate_batchnorm

THREADS = 2
PAPER = {  # test error %, and where the figure comes from
    "bc_det": (1.29, "BinaryConnect deterministic, 3x1024 SGD 1000 ep (as quoted in BNN Table 1)"),
    "bc_stoch": (1.18, "BinaryConnect stochastic (paper Table 2)"),
    "float_mlp": (1.30, "BinaryConnect Table 2, no regularizer"),
    "bnn": (0.96, "BNN Theano, 3x4096, 1000 epochs"),
    "bnn_wide": (0.96, "BNN Theano, 3x4096, 1000 epochs"),
    "xnor_lenet5": (None, "XNOR-Net reports no MNIST figure"),
    "bwn_lenet5": (None, "XNOR-Net reports no MNIST figure"),
    "float_lenet5": (None, "-"),
    "bwn_mlp": (None, "BWN (XNOR-Net's weights, one alpha per neuron) on the same MLP: no paper figure"),
    "lab_mlp": (None, "LAB (Hou et al. 2017) reports MNIST on this 3x2048 BN MLP; its table was not readable here"),
    "hwgq_lenet5": (None, "HWGQ (Cai et al. 2017) reports ImageNet only; 2-bit activations + BWN weights"),
}


def _err(model, split) -> float:
    return 100 * (1 - ns.evaluate(model, split)[1])


def _config(key: str, epochs: int) -> ns.TrainConfig:
    mlp = not key.endswith("lenet5")
    lr = 3e-3 if key.startswith("bnn") else 1e-3
    return ns.TrainConfig(epochs=epochs, batch_size=100, optimizer="adam", lr=lr, weight_decay=0.0,
                          schedule="exp", lr_gamma=1e-2, loss="squared_hinge" if mlp else "cross_entropy", seed=0)


SETUPS = {  # key: (model, model kwargs, stage: (method, options) or None for the float baseline)
    "float_mlp": ("mlp_bn", {"widths": [2048] * 3, "act": "relu"}, None),
    "bc_det": ("mlp_bn", {"widths": [2048] * 3, "act": "relu"}, ("binaryconnect", {})),
    "bc_stoch": ("mlp_bn", {"widths": [2048] * 3, "act": "relu"}, ("binaryconnect", {"stochastic": True})),
    "bwn_mlp": ("mlp_bn", {"widths": [2048] * 3, "act": "relu"},  # the last layer binary: BatchNorm follows it
                ("xnor", {"binarize_inputs": False, "keep_first": False, "keep_last": False})),
    "lab_mlp": ("mlp_bn", {"widths": [2048] * 3, "act": "relu"}, ("lab", {})),
    "bnn": ("mlp_bn", {"widths": [2048] * 3, "act": "hardtanh"}, ("bnn", {})),
    "bnn_wide": ("mlp_bn", {"widths": [4096] * 3, "act": "hardtanh"}, ("bnn", {})),
    "float_lenet5": ("lenet5_bn", {}, None),
    "bwn_lenet5": ("lenet5_bn", {}, ("xnor", {"binarize_inputs": False})),  # first and last layers real
    "xnor_lenet5": ("lenet5_bn", {}, ("xnor", {})),
    "hwgq_lenet5": ("lenet5_bn", {}, ("hwgq", {"bits": 2, "backward": "clipped"})),  # + BWN weights
}


def stages(key: str, epochs: int) -> list[dict]:
    """The setup's one training stage: its method (``finetune`` for the float baseline) with the shared
    training settings, keeping the epoch best on validation."""
    method, options = SETUPS[key][2] or ("finetune", {})
    return [{method: train_options(_config(key, epochs), select="best_val", **options)}]


class RealWeights(ns.Callback):
    """At the end of stochastic BinaryConnect's training, before the stage binarizes: re-estimate BatchNorm for
    the real weights (the authors' code) and measure the test error with them (the paper's figure)."""

    def __init__(self, data) -> None:
        self.data, self.test_error_pct = data, None

    def finalize(self, model=None):
        recalibrate_batchnorm(model, self.data.train)
        self.test_error_pct = _err(model, self.data.test)
        return model


def train_one(key: str, data, epochs: int) -> dict:
    model_name, kwargs, stage = SETUPS[key]
    torch.manual_seed(0)
    model = ns.build_model(model_name, **kwargs)
    cfg = _config(key, epochs)
    real = RealWeights(data) if stage and stage[1].get("stochastic") else None
    wall_file = CACHE / f"binary_{key}_{epochs}.wall"  # training time summed over the runs that resumed it
    t0 = time.perf_counter()
    run = ns.Pipeline.from_spec(stages(key, epochs)).run(
        model, data, progress=True, callbacks=[real] if real else [], checkpoint_dir=CACHE / f"binary_{key}_{epochs}",
        checkpoint_every=500, resume=True)[0]
    wall = time.perf_counter() - t0 + (float(wall_file.read_text()) if wall_file.is_file() else 0.0)
    wall_file.write_text(str(wall))
    out = {"model": model_name, "kwargs": kwargs, "stage": stages(key, epochs)[0], "epochs": epochs,
           "best_val_epoch": run["report"]["selected_epoch"], "train_config": cfg.to_dict(), "wall_s": wall}
    if real:  # the paper evaluates with the real weights, its code with BN statistics re-estimated for them
        out["test_error_real_weights_pct"] = real.test_error_pct
    f = RESULTS / "files" / f"binary_{key}.nsz"
    info = ns.save_compressed(model, f, meta={"benchmark": "binary_mnist", "setup": key})
    loaded = ns.load_compressed(f)
    out.update(file=rel(f), file_bytes=info.file_bytes, dense_bytes=info.dense_bytes,
               compression_bytes=info.compression, test_error_pct=_err(loaded, data.test),
               val_error_pct=_err(loaded, data.val))
    binary = [r for r in info.records if r.codec == "binary"]
    if binary:
        out["binary_layers_bytes"] = sum(r.bytes for r in binary)
        out["binary_layers_float32_bytes"] = sum(4 * r.numel for r in binary)
    return out


def kernel_bench(repeats: int) -> dict:
    """One 2048 x 2048 binary layer: XNOR + popcount (packing the input included) against float32 F.linear,
    interleaved; and the bit-exactness check against the float product of the same ±1 tensors."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=g)
    wb = bitops.pack_signs(w.numpy())
    ones = np.ones(2048, np.float32)
    out = {}
    for b in (1, 256):
        x = torch.randn(b, 2048, generator=g)
        xs, ws = torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0)
        exact = np.array_equal(bitops.xnor_matmul(bitops.pack_signs(x.numpy()), wb, 2048, ones),
                               (xs @ ws.T).numpy())
        t = time_interleaved({"xnor": lambda x=x: bitops.xnor_matmul(bitops.pack_signs(x.numpy()), wb, 2048, ones),
                              "float32": lambda x=x: torch.nn.functional.linear(x, w)}, repeats, warmup=5)
        alone = {k: time_interleaved({k: f}, repeats, warmup=5)[k] for k, f in (  # each back to back: warm caches
            ("xnor", lambda x=x: bitops.xnor_matmul(bitops.pack_signs(x.numpy()), wb, 2048, ones)),
            ("float32", lambda x=x: torch.nn.functional.linear(x, w)))}
        out[str(b)] = {"xnor_ms": 1e3 * t["xnor"], "float32_ms": 1e3 * t["float32"],
                       "speedup": t["float32"] / t["xnor"], "bit_exact": bool(exact),
                       "back_to_back_xnor_ms": 1e3 * alone["xnor"], "back_to_back_float32_ms": 1e3 * alone["float32"],
                       "back_to_back_speedup": alone["float32"] / alone["xnor"]}
    return out


def model_latency(key: str, data, repeats: int) -> dict:
    """The runtime form of the stored binary model against the same architecture with float32 weights and no
    binarization (the dense model the user would otherwise ship), and against that float model's own runtime
    form (what the runtime's kernels give a model without binary layers: max-pooling, for LeNet-5), all three
    interleaved, median. The speed columns are the first ratio; the second credits the binary layers only."""
    f = RESULTS / "files" / f"binary_{key}.nsz"
    model_name, kwargs, _ = SETUPS[key]
    plain = ns.build_model(model_name, **kwargs)
    plain.load_state_dict(ns.load_compressed(f).state_dict())  # same weights, float32 kernels, no sign hooks
    plain.eval()
    out = {}
    for b in (1, 256):
        fast = ns.load_compressed(f, runtime=True, batch=b, threads=THREADS)
        plain_fast = compile_runtime(plain, b, threads=THREADS)[0]
        x = data.test.x[:b]
        with torch.no_grad():
            same = bool((fast(x).argmax(1) == ns.load_compressed(f)(x).argmax(1)).all())
        t = time_models({"runtime": fast, "float32": plain, "float32_runtime": plain_fast}, x, repeats=repeats,
                        threads=THREADS)
        out[str(b)] = {"runtime_ms": 1e3 * t["runtime"], "float32_ms": 1e3 * t["float32"],
                       "float32_runtime_ms": 1e3 * t["float32_runtime"], "speedup": t["float32"] / t["runtime"],
                       "speedup_over_float32_runtime": t["float32_runtime"] / t["runtime"], "same_predictions": same}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="MNIST IDX directory, e.g. ../shared/data/mnist")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of every run but bnn_wide")
    ap.add_argument("--bnn-wide-epochs", type=int, default=3, help="epochs of the 3 x 4096 BNN (0: skip it)")
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--fresh", action="store_true", help="ignore cached stages")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(THREADS)
    kernels.set_threads(THREADS)
    data = ns.data.mnist(args.data_dir, val_size=10_000)
    res = {"benchmark": "binary_mnist", "machine": machine(), "threads": THREADS, "split": "50k/10k/10k",
           "hyperparameters": "the authors' code settings (Adam, batch 100, exponential LR decay, squared hinge "
                              "for the MLPs), epochs cut to the CPU budget; model selection on the validation "
                              "split (best epoch); nothing tuned on the test split", "setups": {}}
    for key in args.setups:
        epochs = args.bnn_wide_epochs if key == "bnn_wide" else args.epochs
        if epochs <= 0:
            continue
        r = cached_json(f"binary_{key}_{epochs}", lambda k=key, e=epochs: train_one(k, data, e), args.fresh)
        res["setups"][key] = r
        print(key, {k: v for k, v in r.items() if k not in ("train_config", "kwargs")})
    res["kernel_2048"] = kernel_bench(args.repeats)
    print("kernel 2048x2048", res["kernel_2048"])
    for key in res["setups"]:
        if SETUPS[key][2]:  # every binary model (weights-only ones run ±1 layers by table lookup where faster)
            res["setups"][key]["latency"] = model_latency(key, data, args.repeats)
            print(key, "latency", res["setups"][key]["latency"])
    res["table_rows"] = _rows(res)
    write_result("binary_mnist", res)
    _plot(res)


BASELINE = {"bc_det": "float_mlp", "bc_stoch": "float_mlp", "bwn_mlp": "float_mlp", "lab_mlp": "float_mlp",
            "bnn": "float_mlp", "bnn_wide": "float_mlp",
            "bwn_lenet5": "float_lenet5", "xnor_lenet5": "float_lenet5", "hwgq_lenet5": "float_lenet5"}


def _rows(res: dict) -> list[dict]:
    rows = []
    for key, r in res["setups"].items():
        counts = weight_counts(r["file"])
        lat = r.get("latency", {})
        paper, source = PAPER[key]
        base = res["setups"].get(BASELINE.get(key, ""), {})
        widths = r["kwargs"].get("widths")
        row = {"model": r["model"] + (f" {len(widths)}x{widths[0]}" if widths else ""),
               "method": key + ("" if key.startswith("float") else f" ({r['epochs']} ep)"),
               "error_pct": r["test_error_pct"], "error_real_weights_pct": r.get("test_error_real_weights_pct"),
               "dense_error_pct": base.get("test_error_pct"),
               "compression_nonzero": counts["compression_weights"], **counts,
               "compression_bytes": r["compression_bytes"],
               "binary_layers_compression_bytes": (r["binary_layers_float32_bytes"] / r["binary_layers_bytes"]
                                                   if r.get("binary_layers_bytes") else None),
               "speedup_b1": lat.get("1", {}).get("speedup"), "speedup_b256": lat.get("256", {}).get("speedup"),
               "latency_b1_ms": lat.get("1", {}).get("runtime_ms"),
               "float32_latency_b1_ms": lat.get("1", {}).get("float32_ms"),
               "latency_b256_ms": lat.get("256", {}).get("runtime_ms"),
               "float32_latency_b256_ms": lat.get("256", {}).get("float32_ms"),
               "speedup_over_float32_runtime_b1": lat.get("1", {}).get("speedup_over_float32_runtime"),
               "speedup_over_float32_runtime_b256": lat.get("256", {}).get("speedup_over_float32_runtime"),
               "wall_s": r["wall_s"], "epochs": r["epochs"], "paper_error_pct": paper, "paper_source": source}
        if key in ("bnn", "bnn_wide") and lat:
            row["target"] = "whole BNN MLP >= 10x faster than float32 at batch 1"
            row["target_met"] = bool(lat["1"]["speedup"] >= 10)
        rows.append(row)
    return rows


def _plot(res: dict) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = list(res["setups"])
    errs = [res["setups"][k]["test_error_pct"] for k in keys]
    a1.bar(keys, errs, color=["#888" if k.startswith("float") else "#3a7" for k in keys])
    for i, k in enumerate(keys):
        if PAPER[k][0] is not None:
            a1.plot([i - 0.4, i + 0.4], [PAPER[k][0]] * 2, "r-", lw=2)
    a1.set_ylabel("test error % (red: paper)")
    a1.tick_params(axis="x", rotation=45)
    labels, vals = ["2048x2048 layer b1", "2048x2048 layer b256"], [res["kernel_2048"]["1"]["speedup"],
                                                                     res["kernel_2048"]["256"]["speedup"]]
    for k in keys:
        for b, v in res["setups"][k].get("latency", {}).items():
            labels.append(f"{k} b{b}")
            vals.append(v["speedup"])
    a2.bar(labels, vals)
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_ylabel("speedup vs float32 (x)")
    a2.tick_params(axis="x", rotation=45)
    save_figure(fig, RESULTS / "binary_mnist.png")


if __name__ == "__main__":
    main()
