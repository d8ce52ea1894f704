"""Time-boxed attempts at a missed paper target (issue 13): Han et al. 2015's pruned LeNet-5.

Target: 0.77% test error at the paper's per-layer kept % (conv1 66, conv2 12, fc1 8, fc2 19: 12x fewer weights),
from a dense model at 0.80% (ours: the same 0.80%). bench/han_mnist.py reaches 1.09 +- 0.01% over 3 seeds with
3 prune/retrain rounds of 6 epochs at the dense LR / 10 (cosine per round).

What is tried here, each from the same dense model and the same kept %, one seed, within about 40 minutes:
  - the baseline schedule again (the reference for the others, same code path);
  - retraining at the dense LR / 2 instead of / 10 (more room to move the surviving weights);
  - 5 rounds instead of 3 (a gentler cut each round) at the same epochs per round;
  - 3 rounds, then one long final retraining (12 epochs, cosine) at the dense LR / 10.
The variant with the lowest VALIDATION error is the attempt's result; its test error is reported beside the
paper's figure, and every variant's numbers are in the JSON (chosen on validation, never on test).

Parts ``han300`` and ``dc300``: the same retraining variants for LeNet-300-100 (paper's kept % fc1 8, fc2 9, fc3 26;
Han: 1.59% at 12x) chosen on validation, then Deep Compression's pipeline from the chosen model (paper: 1.58% at
40x by bytes; before: 1.73 +- 0.02% over 3 seeds from bench/han_mnist.py's 30-epoch schedule).

    python bench/missed_targets.py --data-dir ../shared/data/mnist [--parts han300 dc300]
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import torch

import netsurgeon as ns
from _common import (
    AP_CFG,
    DC_PAPER,
    DC_PAPER_WIDTHS,
    DENSE,
    REPO,
    RESULTS,
    autoprune_run,
    cached_json,
    dc_pipeline,
    dense_model,
    dns_surgery,
    load_dense,
    machine,
    magnitude_stages,
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
from netsurgeon.masks import sparsity_report
from netsurgeon.report import summarize

PAPER = {"error": 0.77, "ref_error": 0.80, "compression": 12.0,
         "kept": {"conv1": 66.0, "conv2": 12.0, "fc1": 8.0, "fc2": 19.0},
         "source": "Han et al. 2015, arXiv:1506.02626, Tables 1-2"}
BASELINE_3SEEDS = {"error_mean": 1.09, "error_std": 0.01, "source": "bench/results/seeds_mnist.json"}
PAPER300 = {"error": 1.59, "ref_error": 1.64, "compression": 12.0, "kept": {"fc1": 8.0, "fc2": 9.0, "fc3": 26.0},
            "source": "Han et al. 2015, arXiv:1506.02626, Tables 1-2"}
VARIANTS300 = {  # bench/han_mnist.py's LeNet-300-100 schedule is 3 rounds x 10 epochs at the dense LR / 10
    "baseline: 3 rounds x 10 epochs, LR/10": (3, 10, 0.1, 0),
    "LR/2: 3 rounds x 10 epochs": (3, 10, 0.5, 0),
    "3 rounds x 10 epochs + 20 final epochs, LR/10": (3, 10, 0.1, 20),
    "3 rounds x 10 epochs + 20 final epochs, LR/2": (3, 10, 0.5, 20),
}
VARIANTS = {  # name -> (rounds, epochs per round, lr factor, final epochs)
    "baseline: 3 rounds x 6 epochs, LR/10": (3, 6, 0.1, 0),
    "LR/2: 3 rounds x 6 epochs": (3, 6, 0.5, 0),
    "5 rounds x 6 epochs, LR/10": (5, 6, 0.1, 0),
    "3 rounds x 6 epochs + 12 final epochs, LR/10": (3, 6, 0.1, 12),
}


def run_variant(name: str, spec: tuple, data, dense_path, seed: int = 0, model_name: str = "lenet5") -> dict:
    rounds, epochs, lr_factor, final = spec
    cfg = replace(DENSE[model_name], seed=seed)
    model = load_dense(dense_path)
    sparsity = {k: 1 - v / 100 for k, v in (PAPER if model_name == "lenet5" else PAPER300)["kept"].items()}
    t0 = time.perf_counter()
    run_stages(model, magnitude_stages(cfg, sparsity=sparsity, rounds=rounds, epochs=epochs, lr_factor=lr_factor,
                                       final=final), data)
    wall = time.perf_counter() - t0
    slug = name.split(":")[0].replace(" ", "_").replace("/", "").replace("+", "").replace(",", "")[:40]
    f = RESULTS / "files" / f"missed_han_{model_name}_{slug}{f'_seed{seed}' if seed else ''}.nsz"
    ns.save_compressed(model, f, value_dtype="float16")
    back = ns.load_compressed(f)
    s = summarize(back, data.input_shape, data=data, file_path=f)
    val_err = 100 * (1 - ns.evaluate(back, data.val)[1])
    kept = {r.name.removesuffix(".weight"): 100 * r.kept for r in sparsity_report(back, include_bias=False)}
    return {"variant": name, "seed": seed, "rounds": rounds, "epochs_per_round": epochs, "lr_factor": lr_factor,
            "final_epochs": final, "retrain_epochs": rounds * epochs + final, "val_error_pct": val_err,
            "test_error_pct": s["test_error_pct"], "kept_pct": kept, "summary": s, "wall_s": wall, "file": rel(f)}


def _row(r: dict, method: str, dense_err: float, chosen: bool, paper: dict = PAPER, model: str = "lenet5") -> dict:
    """A table row of run ``r`` (its summary, errors, wall time and file) against ``paper``'s figures; the
    target: no more than the paper's error + 0.1 point (DNS sets its own after)."""
    s = r["summary"]
    return {"model": model, "method": method, "error_pct": r["test_error_pct"],
            "val_error_pct": r["val_error_pct"], "paper_error_pct": paper["error"], "dense_error_pct": dense_err,
            "paper_dense_error_pct": paper.get("ref_error"),
            "compression_nonzero": s["compression_nonzero"], "paper_compression": paper["compression"],
            "compression_bytes": s["compression_bytes"], "speedup_b1": s["latency"]["1"]["speedup"],
            "speedup_b256": s["latency"]["256"]["speedup"], "wall_s": r["wall_s"], "chosen_on_validation": chosen,
            "target_met": bool(r["test_error_pct"] <= paper["error"] + 0.1 + 1e-9), **weight_counts(r["file"])}


def han(data, dense_path, dense_err: float, model: str = "lenet5") -> dict:
    variants, paper = (VARIANTS, PAPER) if model == "lenet5" else (VARIANTS300, PAPER300)
    runs = [cached_json(f"missed_han_{model}_{i}", lambda n=n, v=v: run_variant(n, v, data, dense_path,
                                                                              model_name=model))
            if model != "lenet5" else run_variant(n, v, data, dense_path) for i, (n, v) in enumerate(variants.items())]
    best = min(runs, key=lambda r: r["val_error_pct"])
    rows = [_row(r, f"magnitude per-layer (Han), {r['variant']}{' (chosen on validation)' if r is best else ''}",
                 dense_err, r is best, paper, model) for r in runs]
    return {"chosen": best["variant"], "rows": rows, "runs": [{k: v for k, v in r.items() if k != "summary"}
                                                              for r in runs]}


def han_seeds(data, dense_path, dense_err: float, prev: dict) -> dict:
    """The variant chosen on validation, run again with seeds 1 and 2 (batch order and the retraining draws):
    mean and std of the test error over seeds 0, 1, 2, as the headline rows of bench/seeds_mnist.py."""
    name = prev["chosen"]
    seed0 = next(r for r in prev["runs"] if r["variant"] == name)
    runs = [cached_json(f"missed_han_seed{s}", lambda s=s: {k: v for k, v in run_variant(
        name, VARIANTS[name], data, dense_path, seed=s).items()}) for s in (1, 2)]
    errs = [seed0["test_error_pct"], *(r["test_error_pct"] for r in runs)]
    mean, std = mean_std(errs)
    row = _row({**runs[-1], "test_error_pct": mean, "val_error_pct": mean_std(
        [seed0["val_error_pct"], *(r["val_error_pct"] for r in runs)])[0]},
        f"magnitude per-layer (Han), {name} [3 seeds]", dense_err, True)
    row.update(error_pct_std=std, target_met=bool(mean <= PAPER["error"] + 0.1 + 1e-9),
               wall_s=sum(r["wall_s"] for r in runs) + seed0["wall_s"])
    return {"variant": name, "test_error_per_seed": errs, "mean": mean, "std": std, "row": row,
            "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs]}


def _choose(rows: list[dict], min_compression: float) -> None:
    """Mark the row with the lowest validation error among those at >= ``min_compression`` (none if no row is)."""
    eligible = [x for x in rows if x["compression_weights"] >= min_compression]
    best = min(eligible, key=lambda x: x["val_error_pct"]) if eligible else None
    for x in rows:
        x["chosen_on_validation"] = x is best
        if x is best:
            x["method"] += " (chosen on validation)"


DNS_PAPER = {"error": 0.91, "compression": 108.0, "iterations": 16_000}


def dns_longer(data, dense_path, dense_err: float) -> dict:
    """DNS LeNet-5 (bench/dns_mnist.py's chosen run of 16,000 iterations; paper 0.91% at 108x): the same
    solver for twice the iterations (masks still freeze at 7/8 of the run), (a) from the same initial targets,
    (b) from targets scaled so that the longer run, which splices more weights back, ends near 108x again (scale:
    the compression (a) lost). Among the runs at >= 108x, the lowest validation error is the result."""
    import json

    run3 = json.loads((RESULTS / "dns_mnist.json").read_text())["models"]["lenet5"]["dns"]
    runs, rows = {}, []
    for tag, label in (("attempt_32k", "DNS, same initial targets, 32,000 iterations (2x)"),
                       ("attempt_32k_scaled", "DNS, initial targets scaled to end at ~108x, 32,000 iterations")):
        if tag == "attempt_32k":
            targets = run3["targets_pct"]
        else:  # the first longer run kept 108.9 / c_a times more weights than the 16k run: start that much lower
            scale = rows[0]["compression_weights"] / run3["compression_nonzero"]
            targets = {k: v * scale for k, v in run3["targets_pct"].items()}
        # cached under the starting targets: a re-run dns_mnist (new chosen run) is a new attempt
        r = cached_json(f"missed_dns_lenet5_{tag.removeprefix('attempt_')}",
                        lambda t=targets, g=tag, n=2 * DNS_PAPER["iterations"]: dns_surgery(
                            "lenet5", data, dense_path, t, g, n, n * 7 // 8), source=targets)
        back = ns.load_compressed(REPO / r["file"])
        s = summarize(back, data.input_shape, data=data, file_path=REPO / r["file"])
        row = _row({**r, "summary": s, "test_error_pct": s["test_error_pct"]}, label, dense_err, False, DNS_PAPER)
        row["baseline_16k"] = {"val_error_pct": run3["val_error_pct"], "test_error_pct": run3["test_error_pct"]}
        row["target_met"] = bool(row["compression_weights"] >= DNS_PAPER["compression"]
                                 and row["error_pct"] <= 0.95 + 1e-9)
        rows.append(row)
        runs[tag] = {"targets_pct": targets, **{k: v for k, v in r.items() if k != "history"}}
    _choose(rows, DNS_PAPER["compression"])
    return {"rows": rows, "runs": runs}


def deep_compression(data, han_result: dict, model: str = "lenet5") -> dict:
    """Deep Compression's LeNet-5 pipeline (bench/deep_compression_mnist.py: k-means conv 8 / fc 5 bits, 2 epochs
    of centroid fine-tuning, float16 values, Huffman) from the Han model this attempt chose, instead of the
    18-epoch one: paper 0.74% at 39x by bytes; before 0.90 +- 0.02% (3 seeds)."""
    from pathlib import Path

    run = next(r for r in han_result["runs"] if r["variant"] == han_result["chosen"])
    label = (f"magnitude {run['retrain_epochs']}-epoch (Han, chosen in missed_targets)" if model == "lenet5" else
             f"magnitude {run['retrain_epochs']}-epoch (Han LeNet-300-100, chosen in missed_targets)")
    v = cached_json(f"missed_dc_{model}", lambda: dc_pipeline(model, label, Path(run["file"]).name, data))
    shared = ns.load_compressed(REPO / v["huffman"]["file"], keep_codecs=True)  # the paper's fixed index widths
    f = RESULTS / "files" / f"missed_dc_{model}_paper_widths.nsz"
    info = ns.save_compressed(shared, f, value_dtype="float16", index_bits=DC_PAPER_WIDTHS)
    p = DC_PAPER[model]
    rows = []
    for method, out in ((f"Deep Compression from the {label}: k-means + Huffman", v["huffman"]),
                        (f"Deep Compression from the {label}, paper's fixed index widths (conv 8, fc 5)",
                         {"file": rel(f), "compression_bytes": info.compression,
                          "test_error_pct": 100 * (1 - ns.evaluate(ns.load_compressed(f), data.test)[1])})):
        rows.append({"model": model, "method": method, "error_pct": out["test_error_pct"],
                     "paper_error_pct": p["error"], "dense_error_pct": None, "paper_dense_error_pct": p["ref_error"],
                     "compression_nonzero": v["compression_nonzero"], "paper_compression": None,
                     "paper_compression_bytes": p["compression"], "compression_bytes": out["compression_bytes"],
                     "speedup_b1": None, "speedup_b256": None, "wall_s": v["wall_s"],
                     "target_met": bool(out["compression_bytes"] >= p["compression"]
                                        and out["test_error_pct"] <= p["error"] + 0.1 + 1e-9),
                     **weight_counts(out["file"])})
    return {"source": run["file"], "pipeline": {k: x for k, x in v.items() if k != "per_tensor"}, "rows": rows}


def dc300_seeds(data, path300, err300: float, han300: dict, dc300: dict) -> dict:
    """The LeNet-300-100 variant chosen on validation, run again with seeds 1 and 2, each followed by the same Deep
    Compression pipeline: mean and std over seeds 0, 1, 2 of the pruned and the final test error and the bytes."""
    from pathlib import Path

    name = han300["chosen"]
    seed0 = next(r for r in han300["runs"] if r["variant"] == name)
    pruned, final, comp = [seed0["test_error_pct"]], [dc300["pipeline"]["huffman"]["test_error_pct"]], \
        [dc300["pipeline"]["huffman"]["compression_bytes"]]
    wall = seed0["wall_s"] + dc300["pipeline"]["wall_s"]
    for seed in (1, 2):
        r = cached_json(f"missed_han_lenet300_seed{seed}", lambda seed=seed: {k: v for k, v in run_variant(
            name, VARIANTS300[name], data, path300, seed=seed, model_name="lenet300").items() if k != "summary"})
        label = f"magnitude {r['retrain_epochs']}-epoch-seed{seed} (Han LeNet-300-100, chosen in missed_targets)"
        v = cached_json(f"missed_dc_lenet300_seed{seed}", lambda r=r, label=label: dc_pipeline(
            "lenet300", label, Path(r["file"]).name, data))
        pruned.append(r["test_error_pct"])
        final.append(v["huffman"]["test_error_pct"])
        comp.append(v["huffman"]["compression_bytes"])
        wall += r["wall_s"] + v["wall_s"]
    p = DC_PAPER["lenet300"]
    (m, sd), (cm, csd) = mean_std(final), mean_std(comp)
    row = {"model": "lenet300", "method": f"Deep Compression from Han LeNet-300-100 ({name}) [3 seeds]",
           "error_pct": m, "error_pct_std": sd, "paper_error_pct": p["error"], "dense_error_pct": err300,
           "paper_dense_error_pct": p["ref_error"], "compression_nonzero": dc300["pipeline"]["compression_nonzero"],
           "paper_compression": None, "paper_compression_bytes": p["compression"], "compression_bytes": cm,
           "compression_bytes_std": csd, "speedup_b1": None, "speedup_b256": None, "wall_s": wall,
           "target_met": bool(cm >= p["compression"] and m <= p["error"] + 0.1 + 1e-9),
           **weight_counts(dc300["pipeline"]["huffman"]["file"])}  # seed 0's file: the same kept % every seed
    return {"variant": name, "pruned_test_error_per_seed": pruned, "dc_test_error_per_seed": final,
            "compression_bytes_per_seed": comp, "row": row}


AP_PAPER = {"compression": 310.0, "target_error": 0.95, "source": "Xiao, Wang, Rajasekaran 2019 (NeurIPS), abstract"}
AP_VARIANTS = {  # tag -> (label, mu, AutoPrune epochs, fine-tuning epochs with the masks fixed)
    "mu300_30ep": ("AutoPrune mu=300, 30 epochs (3x; M frozen after 80%)", 300.0, 30, 0),
    "mu1000_10ep_ft10": ("AutoPrune mu=1000, 10 epochs, then 10 epochs of fine-tuning, masks fixed", 1000.0, 10, 10),
}


def autoprune_longer(data, dense_path, dense_err: float) -> dict:
    """AutoPrune LeNet-5 (bench/autoprune_mnist.py: mu=300, 10 epochs: 143.9x at 1.45%; paper 310x with no
    accuracy loss, target here: >= 310x at <= 0.95%): (a) the same mu for 3x the epochs, (b) a 3.3x stronger mu
    for the same 10 epochs, then 10 epochs of fine-tuning with the masks fixed. Among the runs at >= 310x, the
    lowest validation error is the result (AutoPrune trains its gates on validation batches, so that error is
    optimistic for it; the test split decides nothing)."""
    from netsurgeon.masks import mask_zeros

    rows, runs = [], {}
    for tag, (label, mu, epochs, ft) in AP_VARIANTS.items():
        def run(mu=mu, epochs=epochs, ft=ft, tag=tag) -> dict:
            r = autoprune_run("lenet5", data, mu, epochs=epochs, tag=f"missed_{tag}")
            f = RESULTS / "files" / f"autoprune_lenet5_missed_{tag}.nsz"
            if ft:
                t0 = time.perf_counter()
                m = ns.load_compressed(f)
                mask_zeros(m)  # the zeros AutoPrune left stay pruned while the rest is fine-tuned
                run_stages(m, [{"finetune": train_options(AP_CFG, epochs=ft, lr=AP_CFG.lr / 10, seed=1)}], data)
                ns.save_compressed(m, f, value_dtype="float16")
                r["wall_s"] += time.perf_counter() - t0
            r.pop("history", None)
            return {**r, "file": rel(f)}
        r = cached_json(f"missed_ap_{tag}", run)
        back = ns.load_compressed(REPO / r["file"])
        s = summarize(back, data.input_shape, data=data, file_path=REPO / r["file"])
        val = 100 * (1 - ns.evaluate(back, data.val)[1])
        row = _row({"summary": s, "test_error_pct": s["test_error_pct"], "val_error_pct": val,
                    "wall_s": r["wall_s"], "file": r["file"]}, label, dense_err, False,
                   {"error": AP_PAPER["target_error"], "compression": AP_PAPER["compression"]})
        row["paper_error_pct"] = None  # the paper states "no accuracy loss", no error figure
        row["target_met"] = bool(row["compression_weights"] >= AP_PAPER["compression"]
                                 and row["error_pct"] <= AP_PAPER["target_error"] + 1e-9)
        rows.append(row)
        runs[tag] = {k: v for k, v in r.items() if k != "history"}
    _choose(rows, AP_PAPER["compression"])
    return {"rows": rows, "runs": runs, "paper": AP_PAPER}


def main() -> None:
    import json

    t0 = time.perf_counter()

    def extra(ap) -> None:
        parts = ["han", "han_seeds", "dns", "dc", "han300", "dc300", "dc300_seeds", "autoprune"]
        ap.add_argument("--parts", nargs="+", default=parts, choices=parts)

    args, data = parse_args(__doc__, ["lenet5"], "not supported here", extra)
    if args.quick:
        raise SystemExit("missed_targets.py has no --quick mode: every part is a real attempt.")
    torch.set_num_threads(2)
    dense_path, _ = dense_model("lenet5", data)
    dense_err = 100 * (1 - ns.evaluate(load_dense(dense_path), data.test)[1])
    old = RESULTS / "missed_targets.json"
    prev = json.loads(old.read_text()) if old.is_file() and not args.fresh else {}
    result = {**prev, "benchmark": "missed_targets", "paper": PAPER, "baseline_3_seeds": BASELINE_3SEEDS,
              "machine": machine(), "dense_error_pct": dense_err, "dense_train_config": asdict(DENSE["lenet5"]),
              "selection": "variant with the lowest validation error (5,000 held-out training images); the test "
                           "split is read only to report"}
    if "han" in args.parts or "han" not in prev:
        result["han"] = han(data, dense_path, dense_err)
    if "han_seeds" in args.parts:
        result["han_seeds"] = han_seeds(data, dense_path, dense_err, result["han"])
    if "dns" in args.parts:
        result["dns"] = dns_longer(data, dense_path, dense_err)
    if "dc" in args.parts:
        result["dc"] = deep_compression(data, result["han"])
    if "autoprune" in args.parts:
        result["autoprune"] = autoprune_longer(data, dense_path, dense_err)
    if {"han300", "dc300", "dc300_seeds"} & set(args.parts):  # Deep Compression LeNet-300-100: 1.58% at 40x
        path300, _ = dense_model("lenet300", data)
        err300 = 100 * (1 - ns.evaluate(load_dense(path300), data.test)[1])
        if "han300" in args.parts or "han300" not in prev:
            result["han300"] = {**han(data, path300, err300, "lenet300"), "dense_error_pct": err300,
                                "paper": PAPER300}
        if "dc300" in args.parts:
            result["dc300"] = deep_compression(data, result["han300"], "lenet300")
        if "dc300_seeds" in args.parts:
            result["dc300_seeds"] = dc300_seeds(data, path300, err300, result["han300"], result["dc300"])
    result["table_rows"] = [*result["han"]["rows"], *([result["han_seeds"]["row"]] if "han_seeds" in result else []),
                            *(result["dns"].get("rows", [result["dns"].get("row")]) if "dns" in result else []),
                            *(result["dc"]["rows"] if "dc" in result else []),
                            *(result["han300"]["rows"] if "han300" in result else []),
                            *(result["dc300"]["rows"] if "dc300" in result else []),
                            *([result["dc300_seeds"]["row"]] if "dc300_seeds" in result else []),
                            *(result["autoprune"]["rows"] if "autoprune" in result else [])]
    result["wall_s"] = time.perf_counter() - t0
    path = write_result("missed_targets", result)
    runs = result["han"]["runs"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["val_error_pct"] for r in runs], 0.4, label="validation error")
    ax.bar([i + 0.2 for i in x], [r["test_error_pct"] for r in runs], 0.4, label="test error")
    ax.axhline(PAPER["error"], color="red", ls="--", label="paper 0.77%")
    ax.axhline(dense_err, color="black", ls=":", label=f"dense {dense_err:.2f}%")
    ax.set_xticks(list(x), [r["variant"].replace(": ", ":\n").replace(", ", "\n") for r in runs], fontsize=7)
    ax.set_ylabel("error (%)")
    ax.set_title("Han LeNet-5 at the paper's per-layer kept % (12x): retraining variants")
    ax.legend(fontsize=7)
    save_figure(fig, RESULTS / "missed_targets.png")
    for r in result["table_rows"]:
        val = f"val {r['val_error_pct']:.2f}%" if r.get("val_error_pct") is not None else "val -    "
        print(f"{r['method'][:80]:80s} {val}  test {r['error_pct']:.2f}%"
              + (f" ± {r['error_pct_std']:.2f}" if r.get("error_pct_std") is not None else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
