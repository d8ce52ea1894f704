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

    python bench/missed_targets.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import torch

import netsurgeon as ns
from _common import (
    DENSE,
    RESULTS,
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
from netsurgeon.masks import sparsity_report
from netsurgeon.pruning.magnitude import prune_and_retrain
from netsurgeon.report import summarize

PAPER = {"error": 0.77, "ref_error": 0.80, "compression": 12.0,
         "kept": {"conv1": 66.0, "conv2": 12.0, "fc1": 8.0, "fc2": 19.0},
         "source": "Han et al. 2015, arXiv:1506.02626, Tables 1-2"}
BASELINE_3SEEDS = {"error_mean": 1.09, "error_std": 0.01, "source": "bench/results/seeds_mnist.json"}
VARIANTS = {  # name -> (rounds, epochs per round, lr factor, final epochs)
    "baseline: 3 rounds x 6 epochs, LR/10": (3, 6, 0.1, 0),
    "LR/2: 3 rounds x 6 epochs": (3, 6, 0.5, 0),
    "5 rounds x 6 epochs, LR/10": (5, 6, 0.1, 0),
    "3 rounds x 6 epochs + 12 final epochs, LR/10": (3, 6, 0.1, 12),
}


def run_variant(name: str, spec: tuple, data, dense_path) -> dict:
    rounds, epochs, lr_factor, final = spec
    cfg = DENSE["lenet5"]
    model = load_dense(dense_path)
    sparsity = {k: 1 - v / 100 for k, v in PAPER["kept"].items()}
    t0 = time.perf_counter()
    prune_and_retrain(model, data, sparsity=sparsity, rounds=rounds, epochs_per_round=epochs, scope="layer",
                      config=cfg, lr_factor=lr_factor, progress=True)
    if final:
        ns.train(model, data, replace(cfg, lr=cfg.lr * lr_factor, epochs=final, seed=cfg.seed + 100),
                 progress=True)
    wall = time.perf_counter() - t0
    slug = name.split(":")[0].replace(" ", "_").replace("/", "").replace("+", "").replace(",", "")[:40]
    f = RESULTS / "files" / f"missed_han_lenet5_{slug}.nsz"
    ns.save_compressed(model, f, value_dtype="float16")
    back = ns.load_compressed(f)
    s = summarize(back, data.input_shape, data=data, file_path=f)
    val_err = 100 * (1 - ns.evaluate(back, data.val)[1])
    kept = {r.name.removesuffix(".weight"): 100 * r.kept for r in sparsity_report(back, include_bias=False)}
    return {"variant": name, "rounds": rounds, "epochs_per_round": epochs, "lr_factor": lr_factor,
            "final_epochs": final, "retrain_epochs": rounds * epochs + final, "val_error_pct": val_err,
            "test_error_pct": s["test_error_pct"], "kept_pct": kept, "summary": s, "wall_s": wall, "file": rel(f)}


def main() -> None:
    t0 = time.perf_counter()
    args, data = parse_args(__doc__, ["lenet5"], "not supported here")
    torch.set_num_threads(2)
    dense_path, _ = dense_model("lenet5", data)
    dense_err = 100 * (1 - ns.evaluate(load_dense(dense_path), data.test)[1])
    runs = [run_variant(n, v, data, dense_path) for n, v in VARIANTS.items()]
    best = min(runs, key=lambda r: r["val_error_pct"])
    rows = []
    for r in runs:
        s = r["summary"]
        chosen = " (chosen on validation)" if r is best else ""
        rows.append({"model": "lenet5", "method": f"magnitude per-layer (Han), {r['variant']}{chosen}",
                     "error_pct": r["test_error_pct"], "val_error_pct": r["val_error_pct"],
                     "paper_error_pct": PAPER["error"], "dense_error_pct": dense_err,
                     "paper_dense_error_pct": PAPER["ref_error"], "compression_nonzero": s["compression_nonzero"],
                     "paper_compression": PAPER["compression"], "compression_bytes": s["compression_bytes"],
                     "speedup_b1": s["latency"]["1"]["speedup"], "speedup_b256": s["latency"]["256"]["speedup"],
                     "wall_s": r["wall_s"], "chosen_on_validation": r is best,
                     "target_met": bool(r["test_error_pct"] <= PAPER["error"] + 0.1 + 1e-9),
                     **weight_counts(r["file"])})
    result = {"benchmark": "missed_targets", "target": "Han et al. 2015 LeNet-5 per-layer: 0.77% at 12x",
              "paper": PAPER, "baseline_3_seeds": BASELINE_3SEEDS, "machine": machine(),
              "dense_error_pct": dense_err, "dense_train_config": asdict(DENSE["lenet5"]),
              "selection": "variant with the lowest validation error (5,000 held-out training images); "
                           "the test split is read only to report", "chosen": best["variant"],
              "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs], "table_rows": rows,
              "wall_s": time.perf_counter() - t0}
    path = write_result("missed_targets", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [r["variant"] for r in runs]
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["val_error_pct"] for r in runs], 0.4, label="validation error")
    ax.bar([i + 0.2 for i in x], [r["test_error_pct"] for r in runs], 0.4, label="test error")
    ax.axhline(PAPER["error"], color="red", ls="--", label="paper 0.77%")
    ax.axhline(dense_err, color="black", ls=":", label=f"dense {dense_err:.2f}%")
    ax.set_xticks(list(x), [n.replace(": ", ":\n").replace(", ", "\n") for n in names], fontsize=7)
    ax.set_ylabel("error (%)")
    ax.set_title("Han LeNet-5 at the paper's per-layer kept % (12x): retraining variants")
    ax.legend(fontsize=7)
    save_figure(fig, RESULTS / "missed_targets.png")
    for r in runs:
        print(f"{r['variant']:48s} val {r['val_error_pct']:.2f}%  test {r['test_error_pct']:.2f}%  "
              f"{r['wall_s']:.0f} s{'  <- chosen on validation' if r is best else ''}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
