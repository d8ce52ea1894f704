"""Structured pruning on MNIST (issue 14): l1-norm filters (Li et al. 2017), network slimming (Liu et al. 2017)
and structured sparsity learning (Wen et al. 2016) on LeNet-5, the small ResNet and a small VGG-style CNN, each
followed by fine-tuning; beside them, Torch-Pruning removing the same channels as l1_filters.

    python bench/structured_mnist.py --data-dir ../shared/data/mnist [--models lenet5 resnet_small vgg_small]
    python bench/structured_mnist.py --data-dir ../shared/data/mnist --remeasure   # re-time the committed rows
    python bench/structured_mnist.py --data-dir ../shared/data/mnist --remeasure --add-run   # one more timing run

The width study (``--models vgg_small_w32 vgg_small_w64 resnet_small_w32``): vgg_small at 2x and 4x its channels
and the ResNet at 2x, l1_filters only (half of each layer's channels), to show how the speedup tracks the FLOP
ratio as layers grow.

Per row: test error, parameters, FLOPs, .nsz bytes, and the latency of the shrunk model against the dense
model at batch 1 and 256 (interleaved, same process, 2 threads, medians) beside the FLOP-ratio bound; the goal
is a measured speedup >= 80% of the FLOP ratio at batch 256. Training stages are cached in bench/.cache/;
latency is measured on every run (so it can be re-taken on a quiet machine). Torch-Pruning is a benchmark-only
dependency (pip install torch-pruning); its rows are skipped, saying so, when it is missing.
Every row runs through ns.Pipeline (``run``). l1_filter_prune is called directly only for the Torch-Pruning
comparison, which needs the kept channel indices (the l1_filters stage reports counts), and filter_sensitivity is
an analysis (Li et al.'s per-layer curves), not a compression.
"""

from __future__ import annotations

import copy
import json
import time

import torch

import netsurgeon as ns
from _common import (
    CACHE,
    REPO,
    RESULTS,
    cached_json,
    dense_model,
    load_dense,
    machine,
    parse_args,
    pyplot,
    rel,
    save_figure,
    weight_counts,
    write_result,
)
from netsurgeon.modelfile import save_model
from netsurgeon.pruning.structured import filter_sensitivity, l1_filter_prune
from netsurgeon.runtime import compile_runtime
from netsurgeon.runtime.compile import PACK_STEP, _pack_batch
from netsurgeon.stats import (
    layer_flops,
    measure_latency,
    num_threads,
    time_interleaved,
    time_models,
    total_flops,
    zero_columns,
)

SHAPE = (1, 28, 28)
LABEL = {"l1_filters": "half of each layer's channels", "slimming": "half of all BatchNorm channels, global",
         "ssl": "group Lasso 0.1, zeroed channels", "ssl_shape": "group Lasso on filters and filter shapes"}
TRAIN = {"resnet_small": ns.TrainConfig(epochs=2, lr=0.05, weight_decay=1e-4, schedule="cosine"),
         "vgg_small": ns.TrainConfig(epochs=2, lr=0.05, weight_decay=1e-4, schedule="cosine"),
         # at 0.05 the 4x wider net trained badly (epoch 1: 63% train accuracy, validation error 2.2% after 2 epochs)
         "vgg_small_w64": ns.TrainConfig(epochs=2, lr=0.02, weight_decay=1e-4, schedule="cosine")}
FINETUNE = ns.TrainConfig(epochs=1, lr=0.005, weight_decay=1e-4, schedule="cosine")
WIDE = {"vgg_small_w32": ("vgg_small", {"width": 32}), "vgg_small_w64": ("vgg_small", {"width": 64}),
        "resnet_small_w32": ("resnet_small", {"width": 32})}
FRACTION = 0.5  # of the channels of every removable group (l1_filters) / of all BN-scaled channels (slimming)
METHODS = {  # name -> pipeline stages (the fine-tuning stage is added by run())
    "l1_filters": [("l1_filters", {"fraction": FRACTION})],
    "slimming": [("slimming", {"lam": 1e-4, "fraction": FRACTION, "epochs": 1, "lr": 0.01})],
    "ssl": [("ssl", {"lam_filter": 0.1, "lam_channel": 0.1, "epochs": 1, "lr": 0.01})],
    # Wen et al. Sec. 3.3 / Table 2: filter-wise and shape-wise groups together; zeroed shapes stay masked through
    # the fine-tuning and the runtime form skips them (an im2col over the kept columns, ColumnConv2d)
    "ssl_shape": [("ssl", {"lam_filter": 0.1, "lam_channel": 0.0, "lam_shape": 0.1, "epochs": 1, "lr": 0.01})],
}
# Candidates chosen on the validation split (issue 14): tag -> options replacing the method's defaults above. The
# rule (RULE) asks for the most removed work at a bounded validation loss, as a user choosing a setting would.
SWEEP = {
    "slimming": {"slimming": {}, "slimming_f0.35": {"fraction": 0.35}, "slimming_f0.2": {"fraction": 0.2}},
    "ssl": {"ssl_lam0.03": {"lam_filter": 0.03, "lam_channel": 0.03}, "ssl": {},
            "ssl_lam0.3": {"lam_filter": 0.3, "lam_channel": 0.3}},
    "ssl_shape": {"ssl_shape0.03": {"lam_filter": 0.03, "lam_shape": 0.03}, "ssl_shape0.1": {},
                  "ssl_shape0.3": {"lam_filter": 0.3, "lam_shape": 0.3}},
}
VAL_SLACK = 1.0  # points of validation error above the dense model's that a chosen setting may cost
RULE = (f"among the candidates, the highest FLOP ratio whose validation error is at most the dense model's + "
        f"{VAL_SLACK:g} point; if none is, the lowest validation error (test split never read to choose)")
SENS_DROP = 0.01  # l1_filters from the sensitivity curves: per layer, the largest fraction losing <= 1 point


def build(name: str):
    """The untrained model of a row's model name, from seed 0 (a width-study name is a base model at a width)."""
    base, kw = WIDE.get(name, (name, {}))
    torch.manual_seed(0)
    return ns.build_model(base, SHAPE, **kw)


def train_config(name: str) -> ns.TrainConfig:
    return TRAIN.get(name) or TRAIN[WIDE.get(name, (name, {}))[0]]


def dense(name: str, data):
    if name == "lenet5":
        return dense_model("lenet5", data)[0]
    path = CACHE / f"structured_{name}_dense.safetensors"
    if not path.is_file():
        m = build(name)
        ns.train(m, data, train_config(name), checkpoint=CACHE / f"structured_{name}_dense.ckpt",
                 checkpoint_every=500, resume=(CACHE / f"structured_{name}_dense.ckpt").is_file(), progress=True)
        save_model(m, path)
    return path


def run(name: str, method: str, data, tag: str | None = None, options: dict | None = None) -> dict:
    src = dense(name, data)
    model = load_dense(src)
    t0 = time.perf_counter()
    stages = [{k: {**v, **(options or {})}} for k, v in METHODS[method]] + [{"finetune": {**FINETUNE.__dict__}}]
    pipe = ns.Pipeline.from_spec(stages)
    pipe.run(model, data)
    wall = time.perf_counter() - t0
    f = RESULTS / "files" / f"structured_{name}_{tag or method}.nsz"
    pipe.save(model, f, meta={"method": method})
    return {"file": rel(f), "wall_s": wall, "val_error_pct": 100 * (1 - ns.evaluate(model, data.val)[1]),
            "stages": stages}


def sensitivity_fractions(curves: dict, dense_val_acc: float) -> dict[str, float]:
    """Li et al. 2017 Sec. 3.2: sensitive layers are pruned less. Per group, the largest fraction of its curve
    (each layer pruned alone, no retraining, validation accuracy) that loses at most SENS_DROP; a group that loses
    more at every fraction is left whole."""
    out = {}
    for key, curve in curves.items():
        ok = [float(f) for f, acc in curve.items() if acc >= dense_val_acc - SENS_DROP]
        if ok:
            for layer in key.split("+"):
                out[layer] = max(ok)
    return out


def choose(name: str, method: str, data, ref, dense_val: float, fresh: bool) -> dict:
    """Run every candidate of SWEEP[method] (cached), measure its FLOP ratio, and pick one by RULE."""
    fd, _ = total_flops(ref, SHAPE)
    cands = {}
    for tag, opts in SWEEP[method].items():
        c = cached_json(f"structured_{name}_{tag}", lambda t=tag, o=opts: run(name, method, data, t, o), fresh)
        c["flop_ratio"] = fd / structured_flops(ns.load_compressed(REPO / c["file"]))
        cands[tag] = {**c, "options": opts}
    ok = [t for t, c in cands.items() if c["val_error_pct"] <= dense_val + VAL_SLACK]
    best = max(ok, key=lambda t: cands[t]["flop_ratio"]) if ok else min(cands, key=lambda t: cands[t]["val_error_pct"])
    return {"chosen": best, "candidates": cands, "rule": RULE, "dense_val_error_pct": dense_val}


def torch_pruning_same_channels(name: str, data) -> dict:
    """l1_filters one-shot (no fine-tuning) by us and by Torch-Pruning with the same channel indices."""
    try:
        import torch_pruning as tp
    except ImportError:
        return {"skipped": "torch-pruning is not installed (pip install torch-pruning)"}
    ours = load_dense(dense(name, data))
    theirs = copy.deepcopy(ours)
    reports = l1_filter_prune(ours, FRACTION, SHAPE)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=torch.randn(1, *SHAPE))
    for r in reports:
        layer = theirs.get_submodule(r.layers[0])
        drop = sorted(set(range(r.before)) - set(r.kept))
        fn = tp.prune_linear_out_channels if isinstance(layer, torch.nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(layer, fn, idxs=drop)
        group.prune()
    ours.eval(), theirs.eval()
    same_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    x = data.test.x[:256]
    with torch.no_grad():
        diff = float((ours(x) - theirs(x)).abs().max())
    lat = {}
    for b in (1, 256):
        xb = torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(0))
        r = measure_latency(ours, theirs, xb, repeats=100 if b == 1 else 30, threads=2)
        lat[str(b)] = {"ours_ms": 1e3 * r.model_s, "torch_pruning_ms": 1e3 * r.reference_s,
                       "ours_over_theirs_speed": r.speedup}
    return {"same_shapes": same_shapes, "max_abs_output_diff": diff, "latency": lat,
            "error_pct_ours": 100 * (1 - ns.evaluate(ours, data.test)[1]),
            "error_pct_torch_pruning": 100 * (1 - ns.evaluate(theirs, data.test)[1]),
            "saving": "Torch-Pruning saves a pruned model as a pickled whole module (torch.save(model), loaded with "
                      "weights_only=False); ours is a .nsz rebuilt from its recorded layer sizes"}


def structured_flops(model) -> int:
    """FLOPs per sample of the layers as a structure-aware kernel runs them: every weight of a Linear layer,
    the kept (not all-zero) columns of each convolution's lowered weight (SSL's shape-wise groups)."""
    total = 0
    for row in layer_flops(model, SHAPE):
        m = model.get_submodule(row.name)
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1:
            k = m.weight[0].numel()
            total += row.dense * (k - zero_columns(m.weight)) // k
        else:
            total += row.dense
    return total


def conv_rates(model, reference, plan, x) -> dict:
    """Each convolution that the shrunk model's runtime form runs directly (not as columns), timed alone on its
    own input at ``x``'s batch as the runtime runs it (channels-last, the order oneDNN computes in; on g samples
    packed along the channels where the plan packs them; 2 threads), interleaved with the dense
    model's convolution of the same name: ms and GFLOP/s of both. ``matched_saving_ms``: the time saved if every
    such shrunk convolution ran at its dense layer's rate, i.e. the most a faster small-channel kernel could give."""
    inputs: dict[str, dict[str, torch.Tensor]] = {"model": {}, "dense": {}}
    nets = {"model": model, "dense": reference}
    for key, net in nets.items():
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n, k=key: inputs[k].__setitem__(n, a[0]))
                 for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
        with torch.no_grad():
            net.eval()(x)
        for h in hooks:
            h.remove()
    columns = {r.layers[0] for r in plan.runs if r.form == "columns"}
    packed = [int(r.form[4:]) for r in plan.runs if r.layers == [PACK_STEP] and r.form.startswith("pack")]
    g = packed[0] if packed else 1  # the runtime runs the shrunk model's convolutions on g samples at once
    layers, saving = {}, 0.0
    for n in inputs["model"]:
        if n in columns or n not in inputs["dense"]:
            continue
        calls, flops = {}, {}
        for key, net in nets.items():
            m = net.get_submodule(n)
            k = g if key == "model" else 1
            xi = _pack_batch(inputs[key][n], k, True)
            w = m.weight.detach().repeat(k, 1, 1, 1).contiguous(memory_format=torch.channels_last)
            calls[key] = lambda xi=xi, w=w, m=m, k=k: torch.conv2d(xi, w, None, m.stride, m.padding, m.dilation, k)
            flops[key] = 2 * calls[key]().numel() * w[0].numel()
        with num_threads(2), torch.no_grad():
            t = time_interleaved(calls, 20)
        saving += t["model"] - t["dense"] * flops["model"] / flops["dense"]
        layers[n] = {"ms": 1e3 * t["model"], "dense_ms": 1e3 * t["dense"],
                     "gflops_per_s": flops["model"] / t["model"] / 1e9,
                     "dense_gflops_per_s": flops["dense"] / t["dense"] / 1e9}
    return {"layers": layers, "matched_saving_ms": 1e3 * saving,
            "conv_ms": sum(v["ms"] for v in layers.values()),
            "dense_conv_ms": sum(v["dense_ms"] for v in layers.values())}


def measure(name: str, path, data, reference, dense_forms: dict) -> dict:
    """Error, size and FLOPs of the stored model; latency of its runtime form (``load_compressed(...,
    runtime=True)``: the form a user ships, chosen by timing at this batch size) against the dense model, and
    against the dense model's own runtime form, all three interleaved in one loop. The speedup columns are the
    first ratio (the project's one definition of speed); the 80%-of-the-FLOP-bound goal is judged on the second,
    which credits the removed work only, not the runtime's kernels (which the dense model gets too).
    ``dense_forms``: batch -> (runtime form, plan) of ``reference``, compiled once per model."""
    model = ns.load_compressed(path)
    fd, fm = total_flops(reference, SHAPE)[0], structured_flops(model)
    out = {"test_error_pct": 100 * (1 - ns.evaluate(model, data.test)[1]),
           "params": sum(int((p != 0).sum()) for p in model.parameters()), "flops": fm, "flop_ratio": fd / fm,
           "file_bytes": path.stat().st_size, "latency": {}, "runtime_plan": {}}
    plans = {}
    for b in (1, 256):
        x = torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(0))
        fast, plan = plans[b] = compile_runtime(ns.load_compressed(path, keep_codecs=True), b, threads=2)
        dense_fast, dense_plan = dense_forms[b]
        out["runtime_plan"][str(b)] = {"model": plan.describe(), "dense": dense_plan.describe()}
        t = time_models({"runtime": fast, "dense": reference, "dense_runtime": dense_fast}, x,
                        repeats=100 if b == 1 else 30, threads=2)
        out["latency"][str(b)] = {"ms": 1e3 * t["runtime"], "dense_ms": 1e3 * t["dense"],
                                  "dense_runtime_ms": 1e3 * t["dense_runtime"], "speedup": t["dense"] / t["runtime"],
                                  "speedup_over_dense_runtime": t["dense_runtime"] / t["runtime"]}
    out["speedup_over_flop_bound_b256"] = out["latency"]["256"]["speedup_over_dense_runtime"] / out["flop_ratio"]
    # how far a small-channel kernel as efficient as the dense layers' could take the goal's ratio
    lat, x = out["latency"]["256"], torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(0))
    rates = out["conv_rates_b256"] = conv_rates(model, reference, plans[256][1], x)
    rates["share_of_flop_bound_if_matched"] = lat["dense_runtime_ms"] / max(
        lat["ms"] - rates["matched_saving_ms"], 1e-9) / out["flop_ratio"]
    return out


def runtime_forms(reference) -> dict:
    """batch -> (runtime form, plan) of the dense model, compiled once per model for every row's timing."""
    return {b: compile_runtime(reference, b, threads=2) for b in (1, 256)}


def table_row(name: str, label: str, v: dict, dense_row: dict) -> dict:
    return {
        "model": name, "method": label, "val_error_pct": v["val_error_pct"],
        "error_pct": v["test_error_pct"], "paper_error_pct": None,
        "dense_error_pct": dense_row["test_error_pct"], "paper_dense_error_pct": None,
        "compression_nonzero": dense_row["params"] / v["params"], "paper_compression": None,
        "compression_bytes": 4 * dense_row["params"] / v["file_bytes"],
        "speedup_b1": v["latency"]["1"]["speedup"], "speedup_b256": v["latency"]["256"]["speedup"],
        "latency_b1_ms": v["latency"]["1"]["ms"], "dense_latency_b1_ms": v["latency"]["1"]["dense_ms"],
        "latency_b256_ms": v["latency"]["256"]["ms"],
        "dense_latency_b256_ms": v["latency"]["256"]["dense_ms"],
        "speedup_over_dense_runtime_b256": v["latency"]["256"]["speedup_over_dense_runtime"],
        "flop_ratio": v["flop_ratio"], "wall_s": v["wall_s"],
        # the goal is about removed work: a run that removed (almost) nothing has no speedup to judge
        "target_met": bool(v["speedup_over_flop_bound_b256"] >= 0.8) if v["flop_ratio"] > 1.1 else None,
        **weight_counts(v["file"])}


def report(name: str, method: str, v: dict, dense_row: dict) -> None:
    print(f"{name:13s} {method:22s} err {v['test_error_pct']:.2f}% (dense {dense_row['test_error_pct']:.2f}) "
          f"params {v['params']:,} / {dense_row['params']:,} | FLOP ratio {v['flop_ratio']:.2f}x | speedup "
          f"b1 {v['latency']['1']['speedup']:.2f}x b256 {v['latency']['256']['speedup']:.2f}x (over the dense "
          f"runtime form {v['latency']['256']['speedup_over_dense_runtime']:.2f}x)", flush=True)


TIMED = ("latency", "speedup_over_flop_bound_b256", "conv_rates_b256", "runtime_plan")  # what a timing run measures


def remeasure(name: str, r: dict, data, add_run: bool = False) -> None:
    """Re-time the committed files of one model with today's runtime, in place: every measured column of
    ``measure`` is taken again; the training results (validation errors, choices, wall times) stay. The dense
    reference is the trained model where this checkout has it, else the same architecture at its seeded
    initialization: a dense model's time does not depend on its weights' values (no kernel here skips zeros
    of a dense tensor), and its error and size are the committed ones.

    Each row keeps its timing runs (``timing_runs``; ``add_run``: this process's run joins those already there,
    else it replaces them) and shows the run whose share of the FLOP bound is the median: on this VM one
    process can run the same files 10-25% faster or slower than another, so one process run decides nothing
    near the 80% line."""
    cached = CACHE / ("han_lenet5_dense.safetensors" if name == "lenet5" else f"structured_{name}_dense.safetensors")
    if cached.is_file():
        ref, how = load_dense(cached).eval(), "the trained dense model"
    else:
        ref, how = build(name).eval(), "the architecture at its seeded initialization (timing only)"
    dense_forms = runtime_forms(ref)
    stamp = machine()
    runs: list = []
    for method, v in r["methods"].items():
        new = measure(name, REPO / v["file"], data, ref, dense_forms)
        runs = (v.get("timing_runs") or [] if add_run else []) + [
            {"date": stamp["date"], "commit": stamp["commit"], **{k: new[k] for k in TIMED}}]
        shown = sorted(runs, key=lambda t: t["speedup_over_flop_bound_b256"])[(len(runs) - 1) // 2]
        v.update(new | {k: shown[k] for k in TIMED})
        v["timing_runs"] = runs
        v["shares_of_flop_bound_b256"] = [t["speedup_over_flop_bound_b256"] for t in runs]
        report(name, method, v, r["dense"])
    r["remeasured"] = {"machine": stamp, "timing_reference": how, "timing_runs": len(runs),
                       "note": "latency columns re-taken with today's runtime, each timing run in a process of its "
                               "own; the row shows the run with the median share of the FLOP bound (all runs in "
                               "timing_runs); Torch-Pruning's comparison and the training results are from the "
                               "original run (machine in the result's header)"}


def main() -> None:
    t0 = time.perf_counter()
    def extra(ap) -> None:
        ap.add_argument("--train-threads", type=int, default=2, help="torch threads for training (timing: 2)")
        ap.add_argument("--remeasure", action="store_true", help="re-time the committed result's rows (their files) "
                        "with today's runtime; models not in it are run in full and added")
        ap.add_argument("--add-run", action="store_true", help="with --remeasure: add this process's timing run to "
                        "the rows' earlier ones (the table shows the run with the median share) instead of "
                        "replacing them")

    args, data = parse_args(__doc__, ["lenet5", "resnet_small", "vgg_small", *WIDE], "not supported", extra)
    torch.set_num_threads(args.train_threads)
    res = {"benchmark": "structured_mnist", "paper": "Li et al. 2017; Liu et al. 2017; Wen et al. 2016 (no MNIST "
           "figures for these models)", "machine": machine(), "fraction": FRACTION, "finetune": FINETUNE.__dict__,
           "selection_rule": RULE, "sensitivity_rule": f"per layer, the largest fraction losing <= {SENS_DROP:g} "
           "validation accuracy when pruned alone without retraining (Li et al. 2017 Sec. 3.2)",
           "models": {}, "table_rows": []}
    if (RESULTS / "structured_mnist.json").is_file():  # models not run now keep their committed rows
        old = json.loads((RESULTS / "structured_mnist.json").read_text())
        labels = {}
        for row in old["table_rows"]:
            labels.setdefault(row["model"], []).append(row["method"])
        for name, r in old["models"].items():
            r.setdefault("machine", old["machine"])  # where its training and first timing ran
            for v, label in zip(r["methods"].values(), labels[name], strict=True):
                v.setdefault("label", label)
        res["models"] = old["models"]
    for name in args.models:
        if args.remeasure and name in res["models"]:
            remeasure(name, res["models"][name], data, args.add_run)
            continue
        ref = load_dense(dense(name, data)).eval()
        dense_forms = runtime_forms(ref)  # shared by every method's row
        r = {"dense": {"test_error_pct": 100 * (1 - ns.evaluate(ref, data.test)[1]),
                       "params": sum(p.numel() for p in ref.parameters()), "flops": total_flops(ref, SHAPE)[0],
                       "train": "DENSE['lenet5'] (bench/_common.py)" if name == "lenet5" else
                       train_config(name).__dict__},
             "machine": machine(), "methods": {}, "torch_pruning": torch_pruning_same_channels(name, data)}
        dense_val = 100 * (1 - ns.evaluate(ref, data.val)[1])
        r["dense"]["val_error_pct"] = dense_val
        runs = {"l1_filters": (f"l1_filters ({LABEL['l1_filters']}) + 1 epoch fine-tune", cached_json(
            f"structured_{name}_l1_filters", lambda n=name: run(n, "l1_filters", data), args.fresh))}
        if name not in WIDE:  # the width study runs l1_filters alone
            # Li et al. 2017 Fig. 2(b): each layer pruned alone, no retraining, validation accuracy
            r["sensitivity"] = cached_json(f"structured_{name}_sensitivity", lambda n=name: {
                k: {f"{f:g}": a for f, a in v.items()}
                for k, v in filter_sensitivity(load_dense(dense(n, data)), data.val, SHAPE).items()}, args.fresh)
            fractions = sensitivity_fractions(r["sensitivity"], 1 - dense_val / 100)
            if fractions:  # Li et al.'s own procedure: per-layer fractions read off the sensitivity curves
                runs["l1_filters_sensitivity"] = (
                    f"l1_filters (per-layer fractions from the validation sensitivity curves, <= {100 * SENS_DROP:g} "
                    f"point lost each: {', '.join(f'{k} {v:g}' for k, v in fractions.items())}) + 1 epoch fine-tune",
                    cached_json(f"structured_{name}_l1_sens", lambda n=name, fr=fractions: run(
                        n, "l1_filters", data, "l1_sens", {"fraction": fr}), args.fresh))
            r["sensitivity_fractions"] = fractions
            r["selection"] = {}
            for method in SWEEP:
                if method == "slimming" and not any(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules()):
                    continue
                sel = r["selection"][method] = choose(name, method, data, ref, dense_val, args.fresh)
                opts = {**METHODS[method][0][1], **sel["candidates"][sel["chosen"]]["options"]}
                shown = ", ".join(f"{k} {opts[k]:g}" for k in ("lam", "fraction", "lam_filter", "lam_channel",
                                                                "lam_shape") if k in opts)
                runs[method] = (f"{method} ({shown}; chosen on validation among {len(sel['candidates'])}) + 1 epoch "
                                "fine-tune", sel["candidates"][sel["chosen"]])
        else:
            r["width"] = WIDE[name][1]["width"]
        for method, (label, stage) in runs.items():
            v = r["methods"][method] = {**stage, **measure(name, REPO / stage["file"], data, ref, dense_forms),
                                        "label": label}
            report(name, method, v, r["dense"])
        res["models"][name] = r
        tpr = r["torch_pruning"]
        if "latency" in tpr:
            print(f"{name:13s} vs Torch-Pruning (same channels): same shapes {tpr['same_shapes']}, max |diff| "
                  f"{tpr['max_abs_output_diff']:.1e}, our speed / theirs b1 "
                  f"{tpr['latency']['1']['ours_over_theirs_speed']:.2f} b256 "
                  f"{tpr['latency']['256']['ours_over_theirs_speed']:.2f}", flush=True)
    res["table_rows"] = [table_row(name, v["label"], v, r["dense"]) for name, r in res["models"].items()
                         for v in r["methods"].values()]
    res["wall_s"] = time.perf_counter() - t0
    write_result("structured_mnist", res)
    plot(res)


def plot(res: dict) -> None:
    plt = pyplot()
    models = [m for m in res["models"] if "sensitivity" in res["models"][m]]  # the width study has no curves
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(5 * (1 + len(models)), 4), squeeze=False)
    ax = axes[0][0]
    names = list(res["models"])  # marker: the model; colour: the method (and l1 by sensitivity apart)
    kinds = sorted({k for r in res["models"].values() for k in r["methods"]})
    for name, r in res["models"].items():
        for kind, v in r["methods"].items():
            ax.scatter(v["flop_ratio"], v["latency"]["256"]["speedup_over_dense_runtime"],
                       color=f"C{kinds.index(kind)}", marker="osD^vP*X"[names.index(name) % 8], label=f"{name} {kind}")
    lim = max([r["flop_ratio"] for r in res["table_rows"]] + [2])
    ax.plot([1, lim], [1, lim], "k--", label="speedup = FLOP ratio")
    ax.plot([1, lim], [0.8, 0.8 * lim], "k:", label="goal: 80% of it")
    ax.set_xlabel("FLOP ratio (dense / shrunk)")
    ax.set_ylabel("speedup over the dense runtime form, batch 256")
    ax.legend(fontsize=6, loc="upper left")
    for ax, name in zip(axes[0][1:], models, strict=True):
        for layer, curve in res["models"][name]["sensitivity"].items():
            ax.plot([100 * float(f) for f in curve], [100 * a for a in curve.values()], marker="o", ms=3,
                    label=layer)
        ax.set_title(f"{name}: one layer pruned, no retraining (Li et al. Fig. 2b)", fontsize=8)
        ax.set_xlabel("filters pruned away %")
        ax.set_ylabel("validation accuracy %")
        ax.legend(fontsize=6)
    save_figure(fig, RESULTS / "structured_mnist.png")


if __name__ == "__main__":
    main()
