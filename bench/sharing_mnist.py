"""Weight sharing on MNIST (issue 15): HashedNets against an equal-parameter plain network at compression 1/8 ...
1/64, and soft weight sharing (Ullrich et al. 2017, Table 1) on LeNet-300-100 and LeNet-5, alone and after DNS.

    python bench/sharing_mnist.py --data-dir ../shared/data/mnist [--hash-epochs 10] [--sws-epochs 40]

HashedNets: the released code's net (784-1000-10, dropout 0.25 on the input and the hidden layer), trained
from scratch with SGD (momentum 0.9, LR 0.01 — the release's 0.1 with Torch's default dampening 0.9 — decayed
as 1/(1 + 1e-4·t), batch 50); the plain baseline has one hidden layer as wide as the same number of real
parameters allows, and the same data, epochs and optimizer. Soft weight sharing starts from the dense models of
bench/han_mnist.py (the same as every MNIST table) and retrains with Adam for --sws-epochs epochs at the
paper's τ, 17 components and π0 = 0.999. Both report the test error of the epoch with the best validation
error: HashedNets' trained weights (the release's rule), soft weight sharing's *quantized* network (each epoch's
weights and mixture, quantized to the component means as the file stores them, evaluated on validation; the
chosen epoch's weights and mixture are restored before the final quantization). Nothing is tuned on the test
split. One seed (the time budget; said in the README).

Every run goes through ns.Pipeline (``netsurgeon compress``'s code path): ``hashednets`` (or ``finetune`` for the
plain baseline and the dense net), ``soft_sharing`` and the centroid ``finetune`` stages, the first two with
``select=best_val``: soft sharing's epochs are compared as its file stores them (its ``stored()`` form, the
network quantized to the current mixture), and the weights and mixture of the chosen epoch come back together
before the stage quantizes; the error of the retrained (unquantized) network is read by a pipeline callback just
before. tests/test_bench_pipeline.py pins these stages to the direct calls this script made before.
"""

from __future__ import annotations

import json
import time

import torch

import netsurgeon as ns
from _common import (
    REPO,
    RESULTS,
    cached_json,
    dense_model,
    dns_choice,
    load_dense,
    machine,
    parse_args,
    pyplot,
    rel,
    run_stages,
    save_figure,
    train_options,
    weight_counts,
    write_result,
)
from netsurgeon.kernels.hashed import HashedLinearRuntime
from netsurgeon.stats import measure_latency

THREADS = 2
FACTORS = {"1/8": 1 / 8, "1/16": 1 / 16, "1/32": 1 / 32, "1/64": 1 / 64}
PAPER_HASH = {"1/8": 1.45, "1/64": 2.79}  # the figures for the 3-layer net (HashNet); others not retrieved
PAPER_SWS = {"lenet300": {"dense": 1.89, "error": 1.94, "kept_pct": 4.3, "compression": 64},
             "lenet5": {"dense": 0.88, "error": 0.97, "kept_pct": 0.5, "compression": 162}}


def _err(model, split) -> float:
    return 100 * (1 - ns.evaluate(model, split)[1])


class Retrained(ns.Callback):
    """The test error of soft weight sharing's retrained network, read at the end of its training (the chosen
    epoch's weights restored), before the stage quantizes it."""

    def __init__(self, test) -> None:
        self.test, self.error_pct = test, None

    def finalize(self, model=None):
        self.error_pct = _err(model, self.test)
        return model


def _hash_cfg(epochs: int) -> ns.TrainConfig:
    return ns.TrainConfig(epochs=epochs, batch_size=50, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0,
                          schedule="inv", lr_gamma=1e-4, lr_power=1.0, seed=0)


def _real_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hash_stages(label: str, kind: str, epochs: int) -> list[dict]:
    """HashedNets at factor ``label`` trained from scratch, or (the plain baseline and the 1/1 dense net) the
    network trained as it is; both keep the epoch best on validation."""
    opts = train_options(_hash_cfg(epochs), select="best_val")
    if label == "1/1" or kind == "plain":
        return [{"finetune": opts}]
    return [{"hashednets": {**opts, "compression": FACTORS[label], "init": "random"}}]


def hashed_run(label: str, data, epochs: int) -> dict:
    """HashedNets at factor ``label`` (or the dense net for "1/1"), and its equal-parameter plain baseline."""
    out = {}
    for kind in ("hashednets", "plain"):
        if label == "1/1" and kind == "plain":
            continue
        torch.manual_seed(0)
        model = ns.build_model("mlp_dropout")
        if kind == "plain":
            target = out["hashednets"]["real_params"]
            width = max(1, round((target - 10) / (784 + 1 + 10)))
            model = ns.build_model("mlp_dropout", widths=[width])
        t0 = time.perf_counter()
        report = run_stages(model, hash_stages(label, kind, epochs), data)[0]["report"]
        wall = time.perf_counter() - t0
        model.eval()
        f = RESULTS / "files" / f"sharing_hash_{label.replace('/', 'over')}_{kind}.nsz"
        info = ns.save_compressed(model, f)
        out[kind] = {"epochs": epochs, "real_params": _real_params(model),
                     "test_error_pct": _err(ns.load_compressed(f), data.test),
                     "val_error_pct": _err(model, data.val), "best_val_epoch": report["selected_epoch"],
                     "wall_s": wall, "file": rel(f), "file_bytes": info.file_bytes, "hidden": model.fc1.out_features
                     if kind == "plain" else 1000}
    return out


SWS_TRAIN = {"batch_size": 128, "optimizer": "adam", "lr": 5e-4, "weight_decay": 0.0, "seed": 0}


def sws_stages(epochs: int, tau: float) -> list[dict]:
    """Soft weight sharing at the paper's 17 components and pi0 = 0.999, Adam, keeping the epoch whose
    quantized network is best on validation."""
    opts = train_options(ns.TrainConfig(epochs=epochs, **SWS_TRAIN), select="best_val")
    return [{"soft_sharing": {**opts, "components": 17, "pi0": 0.999, "tau": tau}}]


def sws_run(name: str, data, epochs: int, start: str, tau: float) -> dict:
    """Soft weight sharing from the dense model (``start="dense"``) or from the DNS file (``"dns"``)."""
    if start == "dense":
        model = load_dense(dense_model(name, data)[0])
    else:
        # the DNS table's chosen file; its masks keep pruned weights at zero
        model = ns.load_compressed(REPO / dns_choice(name)["file"], keep_codecs=True)
    before = _err(model, data.test)
    retrained = Retrained(data.test)
    t0 = time.perf_counter()
    report = ns.Pipeline.from_spec(sws_stages(epochs, tau)).run(model, data, progress=True,
                                                                callbacks=[retrained])[0]["report"]
    wall = time.perf_counter() - t0
    model.eval()
    hist = report["history"]
    training = {"steps", "val_acc", "train_loss", "selected_epoch", "resumed", "history"}
    out = {"start": start, "tau": tau, "epochs": epochs, "start_error_pct": before,
           "retrained_error_pct": retrained.error_pct, "val_acc_by_epoch": [h["val_acc"] for h in hist],
           "quantized_val_acc_by_epoch": [h["stored_val_acc"] for h in hist], "best_epoch": report["selected_epoch"],
           "wall_s": wall, **{k: v for k, v in report.items() if k not in training}}
    for fmt, bits in (("auto", "auto"), ("paper_widths", {"conv": 8, "fc": 5})):
        f = RESULTS / "files" / f"sharing_sws_{name}_{start}_{fmt}.nsz"
        info = ns.save_compressed(model, f, index_bits=bits)
        out[fmt] = {"file": rel(f), "file_bytes": info.file_bytes, "compression_bytes": info.compression,
                    "test_error_pct": _err(ns.load_compressed(f), data.test),
                    "val_error_pct": _err(ns.load_compressed(f), data.val)}
    return out


def hash_latency(res: dict, repeats: int = 50) -> dict:
    """The 1/8 HashedNet computed from its buckets (hashes recomputed per multiply-add, no virtual matrix)
    against the same model with the virtual matrices materialized (what ``load_compressed`` gives), interleaved."""
    f = REPO / res["hashednets"]["1/8"]["hashednets"]["file"]
    dense = ns.load_compressed(f)
    coded = ns.load_compressed(f, keep_codecs=True)
    fast = ns.load_compressed(f)
    for name in ("fc1", "fc2"):
        m = coded.get_submodule(name)
        setattr(fast, name, HashedLinearRuntime(m.parametrizations.weight.original,
                                                m.parametrizations.weight[0].seed, m.in_features,
                                                m.out_features, m.bias))
    out = {}
    for b in (1, 256):
        x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((fast(x) - dense(x)).abs().max())
        lat = measure_latency(fast, dense, x, repeats=repeats, threads=THREADS)
        out[str(b)] = {"hashed_ms": 1e3 * lat.model_s, "materialized_ms": 1e3 * lat.reference_s,
                       "speedup": lat.speedup, "max_abs_diff": diff}
    return out


def sws_finetune(key: str, data, epochs: int) -> dict:
    """Centroid fine-tuning after soft sharing (Deep Compression Sec. 3.3, here on the one shared codebook):
    the indices stay, the shared values train; fixed epochs, nothing chosen on the test split."""
    src = REPO / f"bench/results/files/sharing_sws_{key}_auto.nsz"
    model = ns.load_compressed(src, keep_codecs=True)
    t0 = time.perf_counter()
    run_stages(model, [{"finetune": train_options(ns.TrainConfig(epochs=epochs, lr=1e-3, momentum=0.9,
                                                                 weight_decay=0.0, seed=0))}], data)
    wall = time.perf_counter() - t0
    model.eval()
    f = RESULTS / "files" / f"sharing_sws_{key}_finetuned.nsz"
    info = ns.save_compressed(model, f)
    return {"epochs": epochs, "wall_s": wall, "file": rel(f), "file_bytes": info.file_bytes,
            "compression_bytes": info.compression, "test_error_pct": _err(ns.load_compressed(f), data.test),
            "val_error_pct": _err(ns.load_compressed(f), data.val)}


def main() -> None:
    def extra(ap) -> None:
        ap.add_argument("--hash-epochs", type=int, default=10)
        ap.add_argument("--sws-epochs", type=int, default=40)
        ap.add_argument("--tau", type=float, default=0.05, help="soft weight sharing's τ (paper: 0.05)")
        ap.add_argument("--finetune-epochs", type=int, default=2, help="centroid fine-tuning after soft sharing")
        ap.add_argument("--sws", nargs="+", help="soft-sharing runs MODEL_START[:EPOCHS], e.g. lenet5_dns:20 "
                                                 "(default: every model from dense and from DNS)")
        ap.add_argument("--update", action="store_true",
                        help="recompute only the --sws runs into the committed result (e.g. after the DNS model they "
                             "start from was re-run), or without --sws only HashedNets; the other runs are kept as "
                             "committed")

    args, data = parse_args(__doc__, ["lenet300", "lenet5"], "not supported for this benchmark", extra)
    hashed = not args.update or not args.sws  # --update alone: HashedNets only
    torch.set_num_threads(THREADS)
    if args.update:
        res = json.loads((RESULTS / "sharing_mnist.json").read_text())
        res["machine_update" if args.sws else "machine_update_hashednets"] = machine()
    else:
        res = {"benchmark": "sharing_mnist", "machine": machine(), "threads": THREADS,
               "hyperparameters": "HashedNets: the released code's settings, epochs cut to --hash-epochs; soft weight "
                                  "sharing: the paper's τ, 17 components, π0, the code's learning rates and Gamma "
                                  "hyper-priors; model selection on the validation split (best epoch; soft sharing: "
                                  "of the quantized network)",
               "hashednets": {}, "sws": {}}
    for label in ["1/1", *FACTORS] if hashed else []:
        res["hashednets"][label] = cached_json(f"sharing_hash_{label.replace('/', 'over')}_{args.hash_epochs}",
                                               lambda lb=label: hashed_run(lb, data, args.hash_epochs), args.fresh)
        print("hashednets", label, res["hashednets"][label])
    if hashed:
        res["hashednets_runtime_1/8"] = hash_latency(res)
        print("hashed runtime", res["hashednets_runtime_1/8"])
    runs = args.sws or ([] if args.update else [f"{n}_{s}" for n in args.models for s in ("dense", "dns")])
    starts = {}  # a DNS start is cached under its file's hash: a re-run DNS model is a new start
    for item in runs:
        key, _, ep = item.partition(":")
        name, start = key.split("_")
        epochs = int(ep) if ep else args.sws_epochs
        starts[key] = dns_choice(name)["file"] if start == "dns" else None
        res["sws"][key] = cached_json(f"sharing_sws_{key}_{epochs}_{args.tau}",
                                      lambda n=name, s=start, e=epochs: sws_run(n, data, e, s, args.tau), args.fresh,
                                      source=starts[key])
        r = res["sws"][key]
        print("sws", key, {k: v for k, v in r.items() if k not in ("means", "stds", "mixing")})
    for key in starts:
        res["sws"][key]["finetuned"] = cached_json(f"sharing_sws_{key}_ft{args.finetune_epochs}",
                                                   lambda k=key: sws_finetune(k, data, args.finetune_epochs),
                                                   args.fresh, source=starts[key])
        print("sws finetuned", key, res["sws"][key]["finetuned"])
    res["table_rows"] = _rows(res)
    write_result("sharing_mnist", res)
    _plot(res)


def _rows(res: dict) -> list[dict]:
    rows = []
    dense = res["hashednets"]["1/1"]["hashednets"]
    for label, r in res["hashednets"].items():
        for kind, v in r.items():
            if label == "1/1" and kind == "hashednets":
                method = "dense 784-1000-10 (dropout)"
            else:
                method = f"HashedNets {label}" if kind == "hashednets" else f"plain 784-{v['hidden']}-10, same params"
            counts = weight_counts(v["file"])
            rows.append({"model": "mlp 784-1000-10", "method": method, "error_pct": v["test_error_pct"],
                         "dense_error_pct": dense["test_error_pct"],
                         "paper_error_pct": PAPER_HASH.get(label) if kind == "hashednets" else None, **counts,
                         "compression_weights": 795_010 / v["real_params"],
                         "compression_nonzero": 795_010 / v["real_params"],
                         "compression_bytes": (795_010 * 4) / v["file_bytes"], "wall_s": v["wall_s"],
                         "note": "compression = the dense 784-1000-10's parameters / real stored parameters"})
    for key, r in res["sws"].items():
        name, start = key.split("_")
        paper = PAPER_SWS[name]
        for fmt in ("auto", "paper_widths", "finetuned"):
            if fmt not in r:
                continue
            v = r[fmt]
            counts = weight_counts(v["file"])
            row = {"model": name, "method": ("DNS + " if start == "dns" else "") + "soft weight sharing"
                   + (" (paper's index widths 8/5)" if fmt == "paper_widths" else "")
                   + (f" + centroid fine-tuning ({v['epochs']} ep)" if fmt == "finetuned" else ""),
                   "error_pct": v["test_error_pct"], "dense_error_pct": r["start_error_pct"], **counts,
                   "compression_nonzero": counts["compression_weights"],
                   "compression_bytes": v["compression_bytes"],
                   "wall_s": r["wall_s"] + (v["wall_s"] if fmt == "finetuned" else 0.0)}
            if start == "dense":
                row.update(paper_error_pct=paper["error"], paper_dense_error_pct=paper["dense"],
                           paper_compression_bytes=paper["compression"], paper_compression=100 / paper["kept_pct"])
            if name == "lenet5" and fmt in ("auto", "finetuned"):
                row["target"] = "LeNet-5 >= 200x by file bytes at <= 1.0% error"
                row["target_met"] = bool(v["compression_bytes"] >= 200 and v["test_error_pct"] <= 1.0)
            rows.append(row)
    return rows


def _plot(res: dict) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = list(FACTORS)
    xs = [1 / FACTORS[lb] for lb in labels]
    a1.plot(xs, [res["hashednets"][lb]["hashednets"]["test_error_pct"] for lb in labels], "o-", label="HashedNets")
    a1.plot(xs, [res["hashednets"][lb]["plain"]["test_error_pct"] for lb in labels], "s-", label="plain, same params")
    a1.plot([8, 64], [PAPER_HASH["1/8"], PAPER_HASH["1/64"]], "r^", label="paper HashNet")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("compression factor (1/c)")
    a1.set_ylabel("test error %")
    a1.legend()
    for key, r in res["sws"].items():
        a2.plot(r["auto"]["compression_bytes"], r["auto"]["test_error_pct"], "o", label=key)
    for name, p in PAPER_SWS.items():
        a2.plot(p["compression"], p["error"], "r^")
        a2.annotate(f"paper {name}", (p["compression"], p["error"]))
    a2.set_xscale("log")
    a2.set_xlabel("compression by file bytes (x)")
    a2.set_ylabel("test error %")
    a2.legend()
    save_figure(fig, RESULTS / "sharing_mnist.png")


if __name__ == "__main__":
    main()
