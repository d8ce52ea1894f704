"""Gupta et al. 2015 ("Deep Learning with Limited Numerical Precision", Sec. 4, Fig. 2) on MNIST: train
LeNet-300-100 from scratch in simulated fixed point, round-to-nearest vs stochastic rounding, against float32
with the same optimizer. Two simulations: the paper's (parameters, layer outputs after wide accumulation, and
back-propagated errors all in fixed point) and parameters only (this benchmark's first version).

    python bench/fixed_point_mnist.py --data-dir ../shared/data/mnist

Every run goes through ns.Pipeline (``netsurgeon compress``'s code path): a ``fixed_point`` stage, or a
``finetune`` stage for float32, on a freshly initialized network; the plot's per-epoch validation accuracy is
the stage report's history (tests/test_bench_pipeline.py pins the stages to the direct calls this script made
before).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

import netsurgeon as ns
from _common import (
    RESULTS,
    cached_json,
    machine,
    parse_args,
    pyplot,
    run_stages,
    save_figure,
    train_options,
    write_result,
)

FORMATS = [(2, 14), (2, 12), (2, 10)]   # <IL, FL>: 16, 14 and 12 bits; range [-2, 2): enough for the weights
# The full simulation also puts layer outputs in fixed point, and those leave [-8, 8) while training
# (measured: <4,12> stochastic 55.8% error): 6 integer bits give them room at the same word lengths.
WIDE = [(6, 10), (6, 8), (6, 6)]
CFG = ns.TrainConfig(epochs=5, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=64)  # plain SGD as in the paper


SEEDS = [0, 1, 2]


def stages(fmt, rounding, activations: bool = True, seed: int = 0) -> list[dict]:
    """One training stage from scratch: ``fixed_point`` in format ``fmt`` (``finetune``, plain float32, if None)."""
    opts = train_options(replace(CFG, seed=seed))
    if fmt is None:
        return [{"finetune": opts}]
    return [{"fixed_point": {**opts, "int_bits": fmt[0], "frac_bits": fmt[1], "rounding": rounding,
                             "activations": activations}}]


def run(data, fmt, rounding, activations: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = ns.build_model("lenet300")
    t = time.perf_counter()
    report = run_stages(m, stages(fmt, rounding, activations, seed), data)[0]["report"]
    return {"test_error_pct": 100 * (1 - ns.evaluate(m, data.test)[1]), "wall_s": time.perf_counter() - t,
            "val_acc_per_epoch": [h["val_acc"] for h in report["history"]]}


def seeds(name: str, compute, fresh: bool) -> dict:
    """The run over SEEDS (seed 0 keeps its first cache name): mean and std of the test error, and each run."""
    runs = [cached_json(name if s == 0 else f"{name}_seed{s}", lambda s=s: compute(s), fresh) for s in SEEDS]
    errs = [r["test_error_pct"] for r in runs]
    return {"test_error_pct": statistics.mean(errs), "test_error_std": statistics.pstdev(errs), "seeds": SEEDS,
            "per_seed": errs, "val_acc_per_epoch": runs[0]["val_acc_per_epoch"],
            "wall_s": sum(r["wall_s"] for r in runs)}


def main() -> None:
    args, data = parse_args(__doc__, ["lenet300"], "not supported for this benchmark")
    res = {"benchmark": "fixed_point_mnist", "paper": "Gupta et al. 2015, arXiv:1502.02551, Sec. 4",
           "machine": machine(), "train": CFG.__dict__, "runs": {}}
    res["runs"]["float32"] = seeds("fp_float32", lambda s: run(data, None, None, seed=s), args.fresh)
    for activations, tag, formats in ((True, "", WIDE + FORMATS), (False, " params only", FORMATS)):
        for il, fl in formats:
            for rounding in ("nearest", "stochastic"):
                key = f"<{il},{fl}> {rounding}{tag}"
                res["runs"][key] = seeds(
                    f"fp_{il}_{fl}_{rounding}{'_params' if tag else '_full'}",
                    lambda s, il=il, fl=fl, rounding=rounding, a=activations: run(data, (il, fl), rounding, a, s),
                    args.fresh)
    ref = res["runs"]["float32"]["test_error_pct"]
    res["claim"] = {}
    for fmt, tag in (("<6,10>", ""), ("<2,14>", " params only")):
        res["claim"][f"16-bit {fmt} stochastic within 0.1 point of float32{tag}"] = \
            abs(res["runs"][f"{fmt} stochastic{tag}"]["test_error_pct"] - ref) <= 0.1
        res["claim"][f"16-bit {fmt} nearest worse than float32 by > 0.1 point{tag}"] = \
            res["runs"][f"{fmt} nearest{tag}"]["test_error_pct"] - ref > 0.1
    write_result("fixed_point_mnist", res)
    _plot(res)
    for k, v in res["runs"].items():
        print(f"{k:22s} test error {v['test_error_pct']:.2f} +- {v['test_error_std']:.2f}%")
    print(res["claim"])


def _plot(res: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in res["runs"].items():
        style = (":" if "params only" in k else "--" if "nearest" in k else "-")
        ax.plot(range(1, len(v["val_acc_per_epoch"]) + 1), [100 * (1 - a) for a in v["val_acc_per_epoch"]],
                style, marker="o", ms=3, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error %")
    ax.set_title("LeNet-300-100 in fixed point (dotted: parameters only)")
    ax.legend(fontsize=7)
    save_figure(fig, RESULTS / "fixed_point_mnist.png")


if __name__ == "__main__":
    main()
