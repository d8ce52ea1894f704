"""The rest of the survey's catalogue on MNIST (issue 20), each method beside its baselines:

* datafree: Srinivas & Babu 2015, data-free merging of fully connected neurons, no retraining, on LeNet-5
  (fc1, 500 neurons) and LeNet-300-100 (fc1 and fc2), against removing the same number of neurons without the
  surgery, the neurons with the smallest l1 norm (Li et al. 2017's rule), and random neurons (3 seeds). The
  operating point is chosen on the validation split: the largest fraction whose validation error is within
  0.5 points of the dense model's. Paper (abstract): "up to 85% of the total parameters" of an MNIST network
  removed "without significantly affecting performance".
* decay: Hanson & Pratt 1989, biased weight decay (hyperbolic and exponential, per unit) against plain
  training, weight decay and the L1 penalty, each trained 3 epochs from the dense LeNet-300-100, then cut to
  the same global sparsity by magnitude and fine-tuned 1 epoch; each strength chosen on the validation split
  (seed 0), then 3 seeds. The paper reports no MNIST figure (parity and speech problems).
* distortion: Merolla et al. 2016, LeNet-300-100 trained from the same initial weights with no distortion and
  with each weight distortion in the forward pass (binarize, additive noise, power of two), then each network
  tested under each distortion (the paper's table; it reports CIFAR-10 and ImageNet, so the MNIST figures are
  ours alone). Noise columns average 3 draws.
* pq: vector quantization (Gong et al. 2014: product quantization, residual quantization; convolutions in
  Q-CNN's layout) of the dense LeNet-300-100 and LeNet-5, no fine-tuning (Gong's protocol), and with 1 epoch of
  codebook fine-tuning, beside scalar k-means at a similar file size. Gong and Wu et al. report ImageNet, so
  the MNIST figures are ours alone.
* fewmult: Lin et al. 2016, a BatchNorm MLP 784-300-100-10 trained from the same initial weights in float, with
  stochastic ternary connect, ternary connect + quantized back-propagation, and binary connect + quantized
  back-propagation (Adam, 5 epochs, best validation epoch not used: last epoch, the same for every row). The
  paper's MNIST table could not be read here (its abstract: no loss against standard training).
* binary: loss-aware binarization (Hou et al. 2017) beside BinaryConnect and BWN on one BatchNorm MLP
  784-3x512-10 (every layer binary, same data, Adam, epochs and loss), and HWGQ (Cai et al. 2017: 2-bit
  activations + BWN weights) beside BWN alone on LeNet-5 with BatchNorm; each with its float twin. (The 3x2048
  MLP of bench/binary_mnist.py costs about an hour per run here; these are the like-for-like rows that fit.)
* kfac: K-FAC (Martens & Grosse 2015) as OBS's Fisher, beside WoodFisher and global magnitude on MLPNet at 95%
  sparsity, one-shot, 3 Fisher seeds, 100 and 8,000 gradients; WoodFisher's repository reports 81.26% for
  K-FAC (and 84.18% for WoodFisher) at 95% with 100 gradients from a 93.97% dense model.

    python bench/survey_mnist.py --data-dir ../shared/data/mnist [--parts datafree decay kfac] [--quick]

Rows go to bench/results/survey_mnist.json (``table_rows``) with a plot; every row's weights are counted from
its .nsz file (weights only, biases apart) and its latency is the runtime form against the dense model.
Every compression runs as ns.Pipeline stages except: random neuron removal (a baseline no registered method
offers), the saliency curve (merge_neurons(curve=True), an analysis) and the distortion tests (distort_model
applied to trained networks at test time).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import torch

import netsurgeon as ns
from _common import (
    CACHE,
    REPO,
    RESULTS,
    cached_json,
    choose_damp,
    dense_model,
    file_bytes_counts,
    latency,
    load_dense,
    machine,
    mean_std,
    oneshot_stage,
    parse_args,
    pipeline_run,
    pyplot,
    recount_bytes,
    rel,
    run_stages,
    save_figure,
    weight_counts,
    write_result,
)
from netsurgeon.changes.resized import layer_sizes, record_resized, resized_record
from netsurgeon.pruning.channels import remove_channels
from netsurgeon.pruning.datafree import merge_neurons, mergeable_layers  # the sweep's layers, a saliency curve

SHAPE = (1, 28, 28)
FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
VAL_SLACK = 0.5  # percentage points of validation error the operating point may lose
SEEDS = [0, 1, 2]
DECAY_SPARSITY = 0.95
DECAY_TRAIN = ns.TrainConfig(epochs=3, lr=0.01, weight_decay=0.0, schedule="cosine", batch_size=64)
FINETUNE = ns.TrainConfig(epochs=1, lr=0.005, weight_decay=0.0, schedule="cosine", batch_size=64)
DECAY = {  # row -> (stage method, fixed options, strength key, strength grid chosen on validation)
    "no regularizer": ("finetune", {}, None, [None]),
    "weight decay (lambda w^2)": ("biased_decay", {"bias": "standard"}, "lam", [1e-4, 1e-3, 1e-2]),
    "L1 (proximal)": ("l1", {}, "lam", [1e-5, 1e-4, 1e-3]),
    "hyperbolic bias, per unit": ("biased_decay", {"bias": "hyperbolic", "per": "unit"}, "lam", [1e-3, 1e-2, 1e-1]),
    "exponential bias, per unit": ("biased_decay", {"bias": "exponential", "per": "unit"}, "lam",
                                   [1e-3, 1e-2, 1e-1]),
}
DISTORT_TRAIN = ns.TrainConfig(epochs=5, lr=0.05, weight_decay=1e-4, schedule="cosine", batch_size=64)
DISTORT_TRAINED = [None, "binarize", "noise", "pow2"]
DISTORT_TESTS = {"none": None, "binarize": ("binarize", {}), "noise 0.5": ("noise", {"sigma": 0.5}),
                 "multiplicative 0.5": ("multiplicative", {"sigma": 0.5}), "pow2 (8 levels)": ("pow2", {})}
PQ = {  # label -> stages (before the optional fine-tune)
    "pq, 4-column segments, k=256": [{"pq": {"kind": "pq", "sub_dim": 4, "k": 256}}],
    "pq, 8-column segments, k=256": [{"pq": {"kind": "pq", "sub_dim": 8, "k": 256}}],
    "rq, 2 stages, k=256": [{"pq": {"kind": "rq", "stages": 2, "k": 256}}],
    "scalar k-means, 2 bits": [{"kmeans": {"bits": 2}}],
    "scalar k-means, 4 bits": [{"kmeans": {"bits": 4}}],
    # Q-CNN (Wu et al. 2016, Sec. 3.1-3.3): the same pq, its fc and conv codebooks and codes then refined for the
    # layer response on 2,000 training inputs (a conv: 20,000 of their patches), 2 passes, with error correction
    "pq, 4-column segments, k=256, Q-CNN response refinement (fc and conv)": [
        {"pq": {"kind": "pq", "sub_dim": 4, "k": 256, "response_iters": 2}}],
}
FEWMULT_TRAIN = ns.TrainConfig(epochs=5, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="cosine",
                               batch_size=100)
FEWMULT = {"float": None, "ternary connect": {"weights": "ternary", "quantized_backprop": False},
           "ternary connect + quantized backprop": {"weights": "ternary", "quantized_backprop": True},
           "binary connect + quantized backprop": {"weights": "binary", "quantized_backprop": True}}
BINARY_TRAIN = ns.TrainConfig(epochs=5, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="cosine",
                              batch_size=100)
BINARY = {  # label -> (model, kwargs, epochs, stage or None for the float twin)
    "mlp float": ("mlp_bn", {"widths": [512] * 3}, 5, None),
    "mlp BinaryConnect": ("mlp_bn", {"widths": [512] * 3}, 5, {"binaryconnect": {}}),
    "mlp BWN": ("mlp_bn", {"widths": [512] * 3}, 5, {"xnor": {"binarize_inputs": False, "keep_first": False,
                                                               "keep_last": False}}),
    "mlp LAB": ("mlp_bn", {"widths": [512] * 3}, 5, {"lab": {}}),
    "lenet5_bn float": ("lenet5_bn", {}, 3, None),
    "lenet5_bn BWN (first/last real)": ("lenet5_bn", {}, 3, {"xnor": {"binarize_inputs": False}}),
    "lenet5_bn HWGQ 2-bit + BWN": ("lenet5_bn", {}, 3, {"hwgq": {"bits": 2}}),
}
KFAC = {"sparsity": 0.95, "grads": [100, 8000], "paper": {"kfac": 81.26, "woodfisher": 84.18, "dense": 93.97}}


def err(model, split) -> float:
    return 100 * (1 - ns.evaluate(model, split)[1])


# -- data-free neuron merging -------------------------------------------------------------------------------
def _layers(model) -> list[str]:
    return list(mergeable_layers(model, SHAPE))


def _remove(model, kind: str, f: float, seed: int = 0) -> None:
    layers = _layers(model)
    fraction = {n: f for n in layers}
    if kind in ("datafree", "zero partner", "no surgery"):
        run_stages(model, [{"datafree": {"fraction": fraction, "zero_partner": kind == "zero partner",
                                         "surgery": kind != "no surgery"}}], progress=False)
    elif kind == "l1 neurons":
        run_stages(model, [{"l1_filters": {"fraction": fraction}}], progress=False)
    else:  # random neurons: the same counts, chosen uniformly (a baseline no registered method offers)
        g = torch.Generator().manual_seed(seed)
        for name in layers:
            grp = mergeable_layers(model, SHAPE)[name][1]
            n = grp.size
            keep = torch.randperm(n, generator=g)[: n - min(n - 1, int(round(f * n)))].sort().values
            before = layer_sizes(model)
            remove_channels(model, [grp], {0: keep})
            record_resized(model, resized_record(model, before))


def datafree(data, models: list[str], quick: bool) -> dict:
    out = {}
    fractions = [0.5, 0.9] if quick else FRACTIONS
    for name in models:
        src = dense_model(name, data)[0]
        dense = load_dense(src)
        res = {"dense_val_error_pct": err(dense, data.val), "dense_test_error_pct": err(dense, data.test),
               "layers": _layers(dense), "sweep": {}}
        total = sum(p.numel() for p in dense.parameters())
        for kind in ("datafree", "zero partner", "no surgery", "l1 neurons", "random"):
            rows = {}
            for f in fractions:
                runs = []
                for seed in (SEEDS if kind == "random" and not quick else [0]):
                    m = load_dense(src)
                    t0 = time.perf_counter()
                    _remove(m, kind, f, seed)
                    wall = time.perf_counter() - t0
                    runs.append({"val": err(m, data.val), "test": err(m, data.test), "wall_s": wall,
                                 "params": sum(p.numel() for p in m.parameters())})
                rows[str(f)] = {"val_error_pct": mean_std([r["val"] for r in runs])[0],
                                "test_error_pct": mean_std([r["test"] for r in runs])[0],
                                "test_error_std": mean_std([r["test"] for r in runs])[1],
                                "params_removed_pct": 100 * (1 - runs[0]["params"] / total),
                                "wall_s": mean_std([r["wall_s"] for r in runs])[0], "seeds": len(runs)}
            res["sweep"][kind] = rows
            print(f"{name} {kind:11s} " + " ".join(f"{f}:{r['test_error_pct']:.2f}" for f, r in rows.items()),
                  flush=True)
        ok = [f for f in fractions if res["sweep"]["datafree"][str(f)]["val_error_pct"]
              <= res["dense_val_error_pct"] + VAL_SLACK]
        chosen = max(ok) if ok else min(fractions)
        res["chosen_fraction"] = chosen
        res["chosen_how"] = (f"largest fraction of neurons whose validation error (data-free merge) is within "
                             f"{VAL_SLACK} points of the dense model's; grid {fractions}")
        files = {}
        for kind in ("datafree", "zero partner", "l1 neurons"):
            m = load_dense(src)
            _remove(m, kind, chosen)
            f = (CACHE if quick else RESULTS / "files") / f"survey_{name}_{kind.replace(' ', '_')}.nsz"
            ns.save_compressed(m, f, meta={"method": kind, "fraction": chosen})
            files[kind] = rel(f)
        m = load_dense(src)
        curve = merge_neurons(m, {res["layers"][0]: 0.01}, SHAPE, curve=True)[0].curve
        res["saliency_curve_first_layer"] = list(curve)
        res["files"] = files
        out[name] = res
    return out


# -- biased weight decay ------------------------------------------------------------------------------------
def _decay_stages(row: str, strength, seed: int) -> list[dict]:
    method, fixed, key, _ = DECAY[row]
    train = {**asdict(DECAY_TRAIN), "seed": seed}
    first = {method: {**train, **fixed, **({key: strength} if key else {})}}
    if method == "biased_decay":
        first[method]["sparsity"] = DECAY_SPARSITY
        cut = []
    else:
        cut = [{"magnitude": {"sparsity": DECAY_SPARSITY, "scope": "global", "rounds": 1, "epochs": 0}}]
    return [first, *cut, {"finetune": {**asdict(FINETUNE), "seed": seed}}]


def decay(data, fresh: bool, quick: bool) -> dict:
    src = dense_model("lenet300", data)[0]

    def run(i: int, row: str, strength, seed: int) -> dict:
        tag = f"survey_decay_{i}_{strength}_s{seed}{'_quick' if quick else ''}"
        return cached_json(tag, lambda: pipeline_run(tag, load_dense(src), _decay_stages(row, strength, seed), data,
                                                     {"method": row}, CACHE if quick else None), fresh)

    out = {}
    for i, (row, (_, _, _, grid)) in enumerate(DECAY.items()):
        val = {str(st): run(i, row, st, 0) for st in (grid if not quick else grid[:1])}
        best = min(val, key=lambda k: val[k]["val_error_pct"])
        strength = None if best == "None" else float(best)
        runs = [val[best]] + [run(i, row, strength, seed) for seed in ([] if quick else SEEDS[1:])]
        out[row] = {"chosen_strength": best, "val_error_by_strength": {k: v["val_error_pct"] for k, v in val.items()},
                    "runs": runs}
        print(f"decay {row:28s} strength {best}: test {[round(r['test_error_pct'], 2) for r in runs]}", flush=True)
    return out


# -- robustness to weight distortion ----------------------------------------------------------------------------
def distortion(data, quick: bool) -> dict:
    from netsurgeon.quantization.distortion import distort_model

    out = {}
    cfg = DISTORT_TRAIN if not quick else ns.TrainConfig(**{**asdict(DISTORT_TRAIN), "epochs": 1})
    for kind in DISTORT_TRAINED:
        label = kind or "none"
        torch.manual_seed(0)  # the same initial weights for every row
        model = ns.build_model("lenet300")
        stages = [{"distort": {**asdict(cfg), "distortion": kind}} if kind else {"finetune": asdict(cfg)}]
        run = pipeline_run(f"survey_distort_{label}", model, stages, data, {"method": f"trained with {label}"},
                           CACHE if quick else None)
        tests = {}
        for test, spec in DISTORT_TESTS.items():
            if spec is None:
                tests[test] = err(model, data.test)
                continue
            draws = 3 if spec[0] in ("noise", "multiplicative") else 1
            tests[test] = mean_std([err(distort_model(model, spec[0], seed=s, **spec[1]), data.test)
                                    for s in range(draws)])[0]
        out[label] = {**run, "test_error_under": tests}
        print(f"trained with {label:9s}: " + ", ".join(f"{k} {v:.2f}" for k, v in tests.items()), flush=True)
    return out


# -- vector quantization ---------------------------------------------------------------------------------------
def vector_quantization(data, models: list[str], fresh: bool, quick: bool) -> dict:
    out: dict = {}
    skipped = out["skipped"] = {}
    for name in models:
        src = dense_model(name, data)[0]
        res = {}
        for i, (label, stages) in enumerate(PQ.items() if not quick else list(PQ.items())[:1]):
            for ft in (False, True):
                tag = f"survey_pq_{name}_{i}{'_ft' if ft else ''}{'_quick' if quick else ''}"
                # Adam, LR 1e-4: a shared centroid sums the gradients of every weight using it (with SGD the 2-bit
                # k-means codebook of the dense LeNet-5 diverged at LR 5e-3 and at 1e-4)
                st = [*stages, {"finetune": {**asdict(FINETUNE), "optimizer": "adam", "lr": 1e-4,
                                             "max_steps": 20 if quick else None}}] if ft else stages
                try:
                    res[f"{label}{', 1 ep codebook fine-tune' if ft else ''}"] = cached_json(
                        tag, lambda t=tag, s=st, lb=label, sr=src: pipeline_run(
                            t, load_dense(sr), s, data, {"method": lb}, CACHE if quick else None), fresh)
                except ValueError as e:  # e.g. rq: every layer of LeNet-300-100 too small for 256 x 784 codebooks
                    skipped[f"{name}: {label}"] = str(e)
                    print(f"{name} {label}: skipped ({e})", flush=True)
                    break
        out[name] = res
        print(name, {k: round(v["test_error_pct"], 2) for k, v in res.items()}, flush=True)
    return out


# -- few multiplications --------------------------------------------------------------------------------------
def few_multiplications(data, quick: bool) -> dict:
    out = {}
    cfg = asdict(FEWMULT_TRAIN) | ({"epochs": 1, "max_steps": 30} if quick else {})
    for i, (label, opts) in enumerate(FEWMULT.items()):
        torch.manual_seed(0)  # the same initial weights for every row
        model = ns.build_model("mlp_bn", widths=[300, 100])
        stage = {"fewmult": {**cfg, **opts}} if opts else {"finetune": cfg}
        out[label] = pipeline_run(f"survey_fewmult_{i}", model, [stage], data, {"method": label},
                                  CACHE if quick else None)
        print(f"fewmult {label:38s} test {out[label]['test_error_pct']:.2f}%", flush=True)
    return out


# -- binary weights: LAB, HWGQ -------------------------------------------------------------------------------
def binary(data, fresh: bool, quick: bool) -> dict:
    out = {}
    for i, (label, (arch, kwargs, epochs, stage)) in enumerate(BINARY.items()):
        cfg = asdict(BINARY_TRAIN) | {"epochs": 1 if quick else epochs} | ({"max_steps": 20} if quick else {})
        (name, opts), = (stage or {"finetune": {}}).items()
        tag = f"survey_binary_{i}{'_quick' if quick else ''}"

        def run(a=arch, k=kwargs, n=name, o=opts, c=cfg, t=tag, lb=label) -> dict:
            torch.manual_seed(0)  # the same initial weights for a model's rows
            return pipeline_run(t, ns.build_model(a, **k), [{n: {**c, **o}}], data, {"method": lb},
                                CACHE if quick else None)

        out[label] = cached_json(tag, run, fresh)
        print(f"binary {label:34s} test {out[label]['test_error_pct']:.2f}%", flush=True)
    return out


# -- K-FAC vs WoodFisher --------------------------------------------------------------------------------------
def kfac(data, quick: bool) -> dict:
    src = dense_model("mlpnet", data)[0]
    state = load_dense(src).state_dict()
    out = {"dense_test_acc": 100 * ns.evaluate(load_dense(src), data.test)[1], "grads": {}}
    for n in KFAC["grads"][:1] if quick else KFAC["grads"]:
        damp = choose_damp(data, state, "kfac", {}, n)
        rows = {}
        for label, method, over in (("K-FAC", "kfac", {}),
                                    ("WoodFisher block 2000", "woodfisher", {"block_size": 2000}),
                                    ("global magnitude", "magnitude", {})):
            # every second-order row's damping chosen the same way on the validation split (issue 39: WoodFisher
            # kept lambda = 1e-5 while K-FAC chose from the grid)
            choice = None
            if method != "magnitude":
                choice = damp if method == "kfac" else choose_damp(data, state, method, over, n)
            over = {**over, "damp": choice["chosen"]} if choice else over
            accs, files = [], []
            for seed in (SEEDS[:1] if quick or method == "magnitude" else SEEDS):
                m = load_dense(src)
                t0 = time.perf_counter()
                run_stages(m, [oneshot_stage(method, KFAC["sparsity"], num_grads=n, seed=seed, **over)], data,
                           progress=False)
                wall = time.perf_counter() - t0
                accs.append(100 * ns.evaluate(m, data.test)[1])
                f = (CACHE if quick else RESULTS / "files") / f"survey_mlpnet_{method}_{n}g_s{seed}.nsz"
                ns.save_compressed(m, f, meta={"method": method, "num_grads": n})
                files.append({"file": rel(f), "wall_s": wall})
            rows[label] = {"test_acc": accs, "files": files, "config": over, "damp_choice": choice}
            print(f"mlpnet 95% {n} gradients {label:22s} {accs}", flush=True)
        out["grads"][str(n)] = {"kfac_damp": damp, "rows": rows}
    return out


# -- the table ---------------------------------------------------------------------------------------------------
def _row(model: str, method: str, file: str, error: float, std: float | None, dense_err: float, wall: float,
         paper_err: float | None = None, seeds: int = 1, **extra) -> dict:
    counts = weight_counts(file)
    size = file_bytes_counts(file)  # the project's "file x smaller": dense bytes of the model before / file bytes
    lat = latency(file)
    return {"model": model, "method": method, "error_pct": error, "error_pct_std": std, "paper_error_pct": paper_err,
            "dense_error_pct": dense_err, "paper_dense_error_pct": None,
            "compression_nonzero": counts["compression_weights"], **size, "paper_compression": None,
            "speedup_b1": lat["1"]["speedup"], "speedup_b256": lat["256"]["speedup"],
            "flop_ratio_bound": lat["flop_ratio_bound"], "wall_s": wall, "target_met": None, "seeds": seeds,
            **counts, **extra}


def table(res: dict, data) -> list[dict]:
    rows = []
    for name, r in res.get("datafree", {}).items():
        f = str(r["chosen_fraction"])
        for kind in ("datafree", "zero partner", "l1 neurons"):
            s = r["sweep"][kind][f]
            what = {"datafree": "data-free merge (paper)", "zero partner": "data-free merge + zero partner (ours)",
                    "l1 neurons": "l1-norm neurons"}[kind]
            rows.append(_row(name, f"{what}, "
                             f"{float(f):.0%} of {'+'.join(r['layers'])} neurons, no retraining",
                             r["files"][kind], s["test_error_pct"], None, r["dense_test_error_pct"], s["wall_s"],
                             params_removed_pct=s["params_removed_pct"],
                             paper_params_removed_pct=85.0 if kind == "datafree" else None))
    dense300 = None
    for row, d in res.get("decay", {}).items():
        if dense300 is None:
            dense300 = err(load_dense(dense_model("lenet300", data)[0]), data.test)
        m, sd = mean_std([r["test_error_pct"] for r in d["runs"]])
        rows.append(_row("lenet300", f"{row} ({d['chosen_strength']}), {DECAY_TRAIN.epochs} ep, cut to "
                         f"{DECAY_SPARSITY:.0%}, {FINETUNE.epochs} ep fine-tune", d["runs"][0]["file"], m, sd,
                         dense300, mean_std([r["wall_s"] for r in d["runs"]])[0], seeds=len(d["runs"])))
    for name, runs in res.get("pq", {}).items():
        if name == "skipped":
            continue
        dense_err = err(load_dense(dense_model(name, data)[0]), data.test)
        for label, r in runs.items():
            rows.append(_row(name, label, r["file"], r["test_error_pct"], None, dense_err, r["wall_s"]))
    for label, r in res.get("distortion", {}).items():
        rows.append(_row("lenet300", f"trained with distortion: {label}, {DISTORT_TRAIN.epochs} epochs (error clean; "
                         "under each distortion: see distortion)", r["file"], r["test_error_pct"], None, None,
                         r["wall_s"], test_error_under=r["test_error_under"]))
    bn = res.get("binary", {})
    for label, r in bn.items():
        twin = bn.get("mlp float" if label.startswith("mlp") else "lenet5_bn float", {})
        (opts,) = r["stages"][0].values()
        model = "mlp_bn 3x512" if label.startswith("mlp") else "lenet5_bn"
        rows.append(_row(model, f"{label.split(' ', 1)[1]}, {opts['epochs']} ep", r["file"], r["test_error_pct"],
                         None, twin.get("test_error_pct"), r["wall_s"]))
    fm = res.get("fewmult", {})
    for label, r in fm.items():
        rows.append(_row("mlp_bn 300-100", f"{label}, {FEWMULT_TRAIN.epochs} ep", r["file"], r["test_error_pct"], None,
                         fm["float"]["test_error_pct"] if "float" in fm else None, r["wall_s"]))
    k = res.get("kfac")
    if k:
        for n, g in k["grads"].items():
            for label, r in g["rows"].items():
                accs = r["test_acc"]
                m, sd = mean_std([100 - a for a in accs])
                paper = None
                if n == "100" and label in ("K-FAC", "WoodFisher block 2000"):
                    paper = 100 - KFAC["paper"]["kfac" if label == "K-FAC" else "woodfisher"]
                rows.append(_row("mlpnet", f"{label}, one-shot {KFAC['sparsity']:.0%}, {n} gradients",
                                 r["files"][0]["file"], m, sd, 100 - k["dense_test_acc"],
                                 mean_std([f["wall_s"] for f in r["files"]])[0], paper_err=paper, seeds=len(accs),
                                 paper_dense_error_pct_note=100 - KFAC["paper"]["dense"]))
    return rows


def _bars(ax, vals: dict[str, tuple[float, float | None]], xlabel: str, title: str) -> None:
    """Horizontal bars of (mean, std) per label."""
    names = list(vals)
    ax.barh(range(len(names)), [vals[n][0] for n in names], xerr=[vals[n][1] or 0 for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)


def plot(res: dict, path) -> None:
    plt = pyplot()
    parts = [p for p in ("datafree", "decay", "distortion", "pq", "fewmult", "binary", "kfac") if p in res]
    n = len(parts) + ("datafree" in res)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
    axes = [a for row in grid for a in row]
    for extra in axes[n:]:
        extra.axis("off")
    if "datafree" in res:
        ax = axes.pop(0)
        for name, r in res["datafree"].items():
            for kind, rows in r["sweep"].items():
                xs = [v["params_removed_pct"] for v in rows.values()]
                ax.plot(xs, [v["test_error_pct"] for v in rows.values()], marker="o", ms=3, label=f"{name} {kind}")
        ax.axvline(85, ls=":", c="k", lw=1, label="paper: 85% removed")
        ax.set_yscale("log")
        ax.set_xlabel("% of all parameters removed (no retraining)")
        ax.set_ylabel("test error %")
        ax.set_title("data-free neuron merging")
        ax.legend(fontsize=6)
        ax = axes.pop(0)
        for name, r in res["datafree"].items():
            ax.plot(range(1, len(r["saliency_curve_first_layer"]) + 1), r["saliency_curve_first_layer"],
                    label=f"{name} {r['layers'][0]}")
        ax.set_yscale("log")
        ax.set_xlabel("neurons removed (greedy)")
        ax.set_ylabel("saliency of the merge")
        ax.set_title("saliency curve (the paper's stopping heuristic)")
        ax.legend(fontsize=7)
    if "decay" in res:
        ax = axes.pop(0)
        vals = {n: mean_std([r["test_error_pct"] for r in d["runs"]]) for n, d in res["decay"].items()}
        _bars(ax, vals, f"test error % at {DECAY_SPARSITY:.0%} sparsity (LeNet-300-100)",
              "pruning by decay, equal sparsity")
    if "distortion" in res:
        ax = axes.pop(0)
        trained = list(res["distortion"])
        tests = list(next(iter(res["distortion"].values()))["test_error_under"])
        grid = [[res["distortion"][t]["test_error_under"][c] for c in tests] for t in trained]
        from matplotlib.colors import LogNorm

        im = ax.imshow(grid, cmap="viridis_r", norm=LogNorm())
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(tests)), tests, rotation=30, fontsize=7)
        ax.set_yticks(range(len(trained)), [f"trained: {t}" for t in trained], fontsize=7)
        ax.set_title("test error % under each distortion (LeNet-300-100)")
        fig.colorbar(im, ax=ax)
    if "pq" in res:
        ax = axes.pop(0)
        for name, runs in res["pq"].items():
            if name == "skipped":
                continue
            for label, r in runs.items():
                size = (REPO / r["file"]).stat().st_size if (REPO / r["file"]).is_file() else None
                if size:
                    ax.scatter(size / 1024, r["test_error_pct"], s=12,
                               marker="o" if "fine-tune" in label else "x", label=f"{name}: {label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(".nsz KiB")
        ax.set_ylabel("test error %")
        ax.set_title("vector vs scalar quantization")
        ax.legend(fontsize=5)
    if "binary" in res:
        ax = axes.pop(0)
        _bars(ax, {n: (r["test_error_pct"], None) for n, r in res["binary"].items()}, "test error %",
              "binary weights: LAB, BWN, BinaryConnect, HWGQ")
    if "fewmult" in res:
        ax = axes.pop(0)
        _bars(ax, {n: (r["test_error_pct"], None) for n, r in res["fewmult"].items()},
              "test error % (BN MLP 300-100)", "few multiplications (Lin et al. 2016)")
    if "kfac" in res:
        ax = axes.pop(0)
        for i, (n, g) in enumerate(res["kfac"]["grads"].items()):
            labels = list(g["rows"])
            ms = [mean_std(g["rows"][lb]["test_acc"]) for lb in labels]
            ax.bar([j + 0.4 * i for j in range(len(labels))], [v[0] for v in ms], 0.4,
                   yerr=[v[1] or 0 for v in ms], label=f"{n} gradients")
            ax.set_xticks([j + 0.2 for j in range(len(labels))], labels, fontsize=7)
        ax.axhline(KFAC["paper"]["kfac"], ls=":", c="k", lw=1, label="paper K-FAC, 100 gradients")
        ax.set_ylabel(f"test accuracy % at {KFAC['sparsity']:.0%} (MLPNet, one-shot)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def rerun_kfac(data, why: str) -> None:
    """Recompute only the K-FAC part and its table rows (the mlpnet rows) into the committed result, recording when
    and why under ``reruns``; every other part and row stays as it was measured (and re-timed). The new rows' speed
    columns come from this run's process (``_common.latency``), not from bench/retime.py."""
    res = json.loads((RESULTS / "survey_mnist.json").read_text())
    t0 = time.perf_counter()
    res["kfac"] = kfac(data, False)
    wall = time.perf_counter() - t0
    new = table({"kfac": res["kfac"]}, data)
    at = next(i for i, r in enumerate(res["table_rows"]) if r["model"] == "mlpnet")
    rest = [r for r in res["table_rows"] if r["model"] != "mlpnet"]
    res["table_rows"] = rest[:at] + new + rest[at:]
    res.setdefault("reruns", []).append({"part": "kfac", "reason": why, "machine": machine(), "wall_s": wall})
    write_result("survey_mnist", res)
    plot(res, RESULTS / "survey_mnist.png")
    for r in new:
        print(f"{r['method'][:60]:60s} err {r['error_pct']:.2f} ± {r['error_pct_std'] or 0:.2f}", flush=True)


# the architecture of each table row's model label, as built before compression (for --recount of rows whose file
# is no longer committed)
ROW_ARCH = {"lenet5": ("lenet5", {}), "lenet300": ("lenet300", {}), "mlpnet": ("mlpnet", {}),
            "mlp_bn 3x512": ("mlp_bn", {"widths": [512] * 3}), "lenet5_bn": ("lenet5_bn", {}),
            "mlp_bn 300-100": ("mlp_bn", {"widths": [300, 100]})}


def recount(why: str) -> None:
    """--recount: compression_bytes of every committed row by the project's one definition, nothing re-run."""
    res = json.loads((RESULTS / "survey_mnist.json").read_text())
    for c in recount_bytes(res, lambda row: ROW_ARCH[row["model"]], why):
        print(f"{c['file']}: {c['before']:.3f}x -> {c['after']:.3f}x", flush=True)
    write_result("survey_mnist", res)


def main() -> None:
    t0 = time.perf_counter()

    def extra(ap) -> None:
        parts = ["datafree", "decay", "distortion", "pq", "fewmult", "binary", "kfac"]
        ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
        ap.add_argument("--rerun-kfac", metavar="WHY", help="only recompute the K-FAC part and its rows into the "
                        "committed result (recorded with WHY); the other parts and rows stay as they are")
        ap.add_argument("--recount", metavar="WHY", help="only recompute every row's compression_bytes (dense "
                        "bytes of the model before / file bytes) from the file bytes it records, re-running nothing "
                        "(recorded with WHY)")

    args, data = parse_args(__doc__, ["lenet5", "lenet300"], "2 fractions, 1 seed, one strength, 100 gradients",
                            extra)
    torch.set_num_threads(2)
    if args.rerun_kfac:
        rerun_kfac(data, args.rerun_kfac)
        return
    if args.recount:
        recount(args.recount)
        return
    name = "survey_mnist" + ("_quick" if args.quick else "")
    old = RESULTS / f"{name}.json"
    res = json.loads(old.read_text()) if old.is_file() and not args.quick else {}
    res |= {"benchmark": name, "machine": machine(),
            "paper": "Srinivas & Babu 2015; Hanson & Pratt 1989; Martens & Grosse 2015 (as in Singh & Alistarh 2020)",
            "hyper_parameters": {"chosen": "on the validation split only (each part says how)",
                                 "decay_train": asdict(DECAY_TRAIN), "finetune": asdict(FINETUNE),
                                 "decay_sparsity": DECAY_SPARSITY, "datafree_val_slack_points": VAL_SLACK}}
    if "datafree" in args.parts:
        res["datafree"] = cached_json(f"survey_datafree{'_quick' if args.quick else ''}",
                                      lambda: datafree(data, args.models, args.quick), args.fresh)
    if "decay" in args.parts:
        res["decay"] = decay(data, args.fresh, args.quick)
    if "distortion" in args.parts:
        res["distortion"] = cached_json(f"survey_distortion{'_quick' if args.quick else ''}",
                                        lambda: distortion(data, args.quick), args.fresh)
    if "pq" in args.parts:
        res["pq"] = vector_quantization(data, args.models, args.fresh, args.quick)
    if "fewmult" in args.parts:
        res["fewmult"] = cached_json(f"survey_fewmult{'_quick' if args.quick else ''}",
                                     lambda: few_multiplications(data, args.quick), args.fresh)
    if "binary" in args.parts:
        res["binary"] = binary(data, args.fresh, args.quick)
    if "kfac" in args.parts:
        res["kfac"] = cached_json(f"survey_kfac{'_quick' if args.quick else ''}", lambda: kfac(data, args.quick),
                                  args.fresh)
    res["table_rows"] = table(res, data)
    for r in res["table_rows"]:
        print(f"{r['model']:9s} {r['method'][:70]:70s} err {r['error_pct']:.2f} "
              f"{r['compression_weights']:.1f}x b1 {r['speedup_b1']:.2f} b256 {r['speedup_b256']:.2f}", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    if args.quick:
        (CACHE / f"{name}.json").write_text(json.dumps(res, indent=2))
        plot(res, CACHE / f"{name}.png")
    else:
        write_result(name, res)
        plot(res, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
