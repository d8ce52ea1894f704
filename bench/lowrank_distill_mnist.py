"""Low-rank factorization, compact filters and knowledge distillation on MNIST (issue 16).

    python bench/lowrank_distill_mnist.py --data-dir ../shared/data/mnist [--parts hinton prune lowrank]
        [--seeds 3] [--epochs 50] [--quick]

Three parts, each row in bench/results/lowrank_distill_mnist.json (``table_rows``) and its plot:

- ``hinton``: Hinton, Vinyals, Dean 2015, Sec. 3 (MNIST). Teacher 784-1200-1200-10 with dropout (0.2 on the
  input, 0.5 on the hidden units) and inputs jittered by up to 2 pixels; student 784-800-800-10 trained plainly;
  the same student trained against the teacher's soft targets at T = 20. Paper: 67, 146 and 74 test errors.
  The paper trained far longer (and with max-norm weight constraints, which we do not use); ours trains
  ``--epochs`` epochs each, SGD + momentum, cosine LR, keeping the epoch with the best validation accuracy.
- ``prune``: distillation as the fine-tuning stage of a pruning pipeline. LeNet-5 (the dense reference of
  every MNIST benchmark), one-shot global magnitude pruning to 98% sparse weights, then the same fine-tuning
  epochs with plain cross-entropy (``finetune``) or against the dense model's soft targets (``distill``).
- ``lowrank``: truncated SVD of Linear layers (Denton et al. 2014) on LeNet-300-100 at three global weight
  budgets; on LeNet-5 the conv layers too, by each conv factorization (spatial k x 1 / 1 x k, CP, Tucker-2) and
  the compact-filter replacement (``separable``: depthwise + 1x1). Each is fine-tuned, and beside it magnitude
  pruning (global) to the same number of weights with the same fine-tuning. Latency: the runtime form of each
  file against the dense model, interleaved in one process, 2 threads, medians (``runtime.bench``).

Counting rule (every table): weights only; biases reported separately. For distillation the "compression" is
the teacher's weights over the student's. Hyper-parameters are fixed a priori (the paper's T = 20, our
defaults elsewhere), none chosen on the test split: model selection by validation accuracy only.
Stages are cached in bench/.cache/ (training checkpoints too), so an interrupted run resumes.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict

import torch

import netsurgeon as ns
from _common import (
    CACHE,
    REPO,
    RESULTS,
    cached_json,
    dense_model,
    file_bytes_counts,
    latency,
    load_dense,
    machine,
    mean_std,
    parse_args,
    pyplot,
    recount_bytes,
    rel,
    save_figure,
    train_options,
    weight_counts,
    write_result,
)
from _common import pipeline_run as common_pipeline_run
from netsurgeon.modelfile import load_model, save_model
from netsurgeon.stats import measure_latency

TEMPERATURE, ALPHA = 20.0, 0.9  # the paper's MNIST temperature; soft-target weight (hard labels get 1 - alpha)
TEACHER = {"widths": [1200, 1200], "dropout": 0.5, "input_dropout": 0.2}
STUDENT = {"widths": [800, 800], "dropout": 0.0}
STUDENT_LR = 0.02
PAPER_ERRORS = {"teacher": 67, "student": 146, "distilled": 74}  # of 10,000 test images (Sec. 3)
FINETUNE = ns.TrainConfig(epochs=3, lr=0.01, weight_decay=5e-4, schedule="cosine", batch_size=64)
PRUNE_SPARSITY = 0.98
LOWRANK = {  # model -> [(label, stages before fine-tuning)]
    "lenet300": [(f"lowrank svd, {p:.0%} of weights", [{"lowrank": {"params": p, "conv": "none"}}])
                 for p in (0.5, 0.25, 0.1)],
    "lenet5": [(f"lowrank svd + conv {k}, 25% of weights", [{"lowrank": {"params": 0.25, "conv": k}}])
               for k in ("spatial", "cp", "tucker")]
              + [("lowrank svd + conv spatial, 10% of weights", [{"lowrank": {"params": 0.1, "conv": "spatial"}}]),
                 ("separable (compact filters: depthwise + 1x1)", [{"separable": {}}])],
}


def errors(model, split) -> int:
    model.eval()
    with torch.no_grad():
        return int((model(split.x).argmax(1) != split.y).sum())


def hinton_cfg(epochs: int, seed: int, teacher: bool) -> ns.TrainConfig:
    # students at LR 0.02: at 0.05 (the teacher's) the plain 2x800 student of seed 1 diverged (NaN at step 131)
    return ns.TrainConfig(epochs=epochs, batch_size=100, lr=0.05 if teacher else STUDENT_LR, momentum=0.9,
                          weight_decay=0.0, schedule="cosine", seed=seed, jitter=2 if teacher else 0)


def hinton_stages(cfg: ns.TrainConfig, distill: bool) -> list[dict]:
    """One training stage from scratch keeping the epoch best on validation: plain (``finetune``) or against the
    teacher's soft targets (``distill`` at the paper's T)."""
    opts = train_options(cfg, select="best_val")
    return [{"distill": {**opts, "temperature": TEMPERATURE, "alpha": ALPHA}} if distill else {"finetune": opts}]


def train_mlp(tag: str, data, arch: dict, cfg: ns.TrainConfig, teacher=None) -> dict:
    """Train one Hinton MLP through the pipeline (cached file, checkpointed stage), keeping the best-validation
    epoch."""
    path = CACHE / f"lrd_{tag}.safetensors"
    torch.manual_seed(cfg.seed)
    model = ns.build_model("mlp_dropout", **arch)
    t0 = time.perf_counter()
    report = ns.Pipeline.from_spec(hinton_stages(cfg, teacher is not None)).run(
        model, data, progress=True, teacher=teacher, checkpoint_dir=CACHE / f"lrd_{tag}", checkpoint_every=500,
        resume=True)[0]["report"]
    wall = time.perf_counter() - t0
    save_model(model, path)
    return {"file": rel(path), "test_errors": errors(model, data.test), "val_errors": errors(model, data.val),
            "best_epoch": report["selected_epoch"], "wall_s": wall, "config": asdict(cfg)}


def hinton(data, epochs: int, seeds: list[int], fresh: bool) -> dict:
    teacher_run = cached_json(f"lrd_teacher_e{epochs}", lambda: train_mlp(
        f"teacher_e{epochs}", data, TEACHER, hinton_cfg(epochs, 0, True)), fresh)
    teacher = load_model(REPO / teacher_run["file"])[0].eval()
    runs = {"teacher": [teacher_run], "student": [], "distilled": []}
    for seed in seeds:
        tag = f"lr{STUDENT_LR:g}_e{epochs}_s{seed}"
        runs["student"].append(cached_json(f"lrd_student_{tag}", lambda t=tag, s=seed: train_mlp(
            f"student_{t}", data, STUDENT, hinton_cfg(epochs, s, False)), fresh))
        runs["distilled"].append(cached_json(f"lrd_distilled_{tag}", lambda t=tag, s=seed: train_mlp(
            f"distilled_{t}", data, STUDENT, hinton_cfg(epochs, s, False), teacher), fresh))
    student = load_model(REPO / runs["student"][0]["file"])[0].eval()
    lat = {str(b): measure_latency(student, teacher, torch.randn(b, 1, 28, 28, generator=torch.Generator()
                                                                 .manual_seed(0)), repeats=200 if b == 1 else 50,
                                   threads=2) for b in (1, 256)}
    n_teacher = sum(m.weight.numel() for m in teacher.modules() if isinstance(m, torch.nn.Linear))
    n_student = sum(m.weight.numel() for m in student.modules() if isinstance(m, torch.nn.Linear))
    def biases(m) -> int:
        return sum(x.bias.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))

    return {"runs": runs, "teacher_weights": n_teacher, "student_weights": n_student,
            "teacher_biases": biases(teacher), "student_biases": biases(student),
            "latency_student_vs_teacher": {b: {"ms": 1e3 * v.model_s, "teacher_ms": 1e3 * v.reference_s,
                                               "speedup": v.speedup} for b, v in lat.items()}}


def pipeline_run(tag: str, model, stages: list[dict], data, meta: dict) -> dict:
    return common_pipeline_run(f"lrd_{tag}", model, stages, data, meta)


def prune_distill(data, seeds: list[int], fresh: bool) -> dict:
    src = dense_model("lenet5", data)[0]
    prune = {"magnitude": {"sparsity": PRUNE_SPARSITY, "scope": "global", "rounds": 1, "epochs": 0}}
    out = {}
    for kind in ("finetune", "distill"):
        out[kind] = []
        for seed in seeds:
            ft = {**asdict(FINETUNE), "seed": seed}
            if kind == "distill":
                ft |= {"temperature": TEMPERATURE, "alpha": ALPHA}
            out[kind].append(cached_json(f"lrd_prune_{kind}_s{seed}", lambda k=kind, f=ft, s=seed: pipeline_run(
                f"lenet5_magnitude98_{k}_s{s}", load_dense(src), [prune, {k: f}], data,
                {"method": f"magnitude {PRUNE_SPARSITY:.0%} + {k}"}), fresh))
    return out


def _lowrank_run(tag: str, src, stages: list[dict], ft: dict, data, label: str) -> dict:
    """One low-rank row; if fine-tuning diverges (CP factors are known to be unstable to fine-tune, Lebedev et al.
    2015 Sec. 3.2) it is re-run at a tenth of the LR, and the row says so."""
    try:
        return pipeline_run(tag, load_dense(src), [*stages, ft], data, {"method": label})
    except FloatingPointError as e:
        low = {"finetune": {**ft["finetune"], "lr": ft["finetune"]["lr"] / 10}}
        return {**pipeline_run(tag, load_dense(src), [*stages, low], data, {"method": label}),
                "finetune_note": f"diverged at LR {ft['finetune']['lr']:g} ({e}); re-run at {low['finetune']['lr']:g}"}


def lowrank(data, models: list[str], fresh: bool) -> dict:
    out = {}
    for name in models:
        src = dense_model(name, data)[0]
        ft = {"finetune": asdict(FINETUNE)}
        rows = []
        for i, (label, stages) in enumerate(LOWRANK[name]):
            run = cached_json(f"lrd_lowrank_{name}_{i}", lambda st=stages, i=i, lb=label, n=name, src=src, ft=ft:
                              _lowrank_run(f"{n}_lowrank_{i}", src, st, ft, data, lb), fresh)
            counts = weight_counts(run["file"])
            sparsity = 1 - counts["weights_nonzero"] / counts["weights"]
            base = cached_json(f"lrd_lowrank_{name}_{i}_magnitude", lambda s=sparsity, i=i, n=name, src=src, ft=ft:
                               pipeline_run(f"{n}_lowrank_{i}_magnitude", load_dense(src),
                [{"magnitude": {"sparsity": s, "scope": "global", "rounds": 1, "epochs": 0}}, ft], data,
                {"method": f"magnitude, same weights as lowrank #{i}"}), fresh)
            rows.append({"label": label, "lowrank": run, "magnitude": base})
        out[name] = rows
    return out


def recount(why: str) -> None:
    """--recount: compression_bytes of every committed row by the project's one definition, nothing re-run (the
    rows that name a file are LeNet-5 and LeNet-300-100 ones, built whole before compression)."""
    res = json.loads((RESULTS / "lowrank_distill_mnist.json").read_text())
    for c in recount_bytes(res, lambda row: (row["model"], {}), why):
        print(f"{c['file']}: {c['before']:.3f}x -> {c['after']:.3f}x", flush=True)
    write_result("lowrank_distill_mnist", res)


def main() -> None:
    t0 = time.perf_counter()

    def extra(ap) -> None:
        ap.add_argument("--parts", nargs="+", default=["hinton", "prune", "lowrank"],
                        choices=["hinton", "prune", "lowrank"])
        ap.add_argument("--seeds", type=int, default=3, help="seeds of the student and pruning rows")
        ap.add_argument("--epochs", type=int, default=50, help="training epochs of the Hinton teacher and students")
        ap.add_argument("--recount", metavar="WHY", help="only recompute every row's compression_bytes (dense "
                        "bytes of the model before / file bytes) from the file bytes it records, re-running nothing "
                        "(recorded with WHY)")

    args, data = parse_args(__doc__, ["lenet300", "lenet5"], "1 seed, 2 epochs, one low-rank row per model", extra)
    if args.recount:
        recount(args.recount)
        return
    torch.set_num_threads(2)
    seeds = list(range(1 if args.quick else args.seeds))
    epochs = 2 if args.quick else args.epochs
    if args.quick:
        for k in LOWRANK:
            LOWRANK[k] = LOWRANK[k][:1]
    res = {"benchmark": "lowrank_distill_mnist" + ("_quick" if args.quick else ""),
           "paper": "Hinton, Vinyals, Dean 2015 (Sec. 3, MNIST); Denton et al. 2014; Jaderberg et al. 2014; "
                    "Lebedev et al. 2015; Kim et al. 2016; Howard et al. 2017", "machine": machine(),
           "hyper_parameters": {"chosen": "fixed a priori (paper's T = 20; alpha 0.9 per the paper's advice of a "
                                          "much lower weight on the hard labels); model selection of the Hinton "
                                          "nets by validation accuracy; nothing tuned on the test split",
                                "temperature": TEMPERATURE, "alpha": ALPHA, "hinton_epochs": epochs,
                                "finetune": asdict(FINETUNE), "prune_sparsity": PRUNE_SPARSITY},
           "seeds": seeds, "table_rows": []}
    rows = res["table_rows"]
    if "hinton" in args.parts:
        h = res["hinton"] = hinton(data, epochs, seeds, args.fresh)
        for kind, arch in (("teacher", "mlp 2x1200 dropout+jitter"), ("student", "mlp 2x800"),
                           ("distilled", "mlp 2x800")):
            errs = [r["test_errors"] for r in h["runs"][kind]]
            m, sd = mean_std([e / 100 for e in errs])
            is_student = kind != "teacher"
            lat = h["latency_student_vs_teacher"]
            rows.append({
                "model": arch, "method": {"teacher": f"teacher, {epochs} epochs", "student": f"trained plainly, "
                                          f"{epochs} epochs", "distilled": f"distilled T={TEMPERATURE:g}, "
                                          f"alpha {ALPHA}, {epochs} epochs"}[kind],
                "error_pct": m, "error_pct_std": sd, "test_errors": errs,
                "paper_error_pct": PAPER_ERRORS[kind] / 100, "paper_test_errors": PAPER_ERRORS[kind],
                "dense_error_pct": statistics.fmean(r["test_errors"] for r in h["runs"]["teacher"]) / 100,
                "paper_dense_error_pct": PAPER_ERRORS["teacher"] / 100,
                "weights": h["teacher_weights"], "weights_nonzero": h["student_weights"] if is_student
                else h["teacher_weights"], "biases": h["teacher_biases"],
                "biases_nonzero": h["student_biases"] if is_student else h["teacher_biases"],
                "compression_weights": h["teacher_weights"] / (h["student_weights"] if is_student
                                                               else h["teacher_weights"]),
                "compression_nonzero": h["teacher_weights"] / (h["student_weights"] if is_student
                                                               else h["teacher_weights"]),
                "compression_bytes": None, "paper_compression": None,
                "speedup_b1": lat["1"]["speedup"] if is_student else 1.0,
                "speedup_b256": lat["256"]["speedup"] if is_student else 1.0,
                "wall_s": statistics.fmean(r["wall_s"] for r in h["runs"][kind]), "target_met": None,
                "seeds": len(errs)})
            print(f"hinton {kind:9s} test errors {errs} (paper {PAPER_ERRORS[kind]})", flush=True)
    if "prune" in args.parts:
        p = res["prune"] = prune_distill(data, seeds, args.fresh)
        dense_err = 100 * (1 - ns.evaluate(load_dense(dense_model("lenet5", data)[0]), data.test)[1])
        for kind in ("finetune", "distill"):
            m, sd = mean_std([r["test_error_pct"] for r in p[kind]])
            counts = weight_counts(p[kind][0]["file"])
            lat = latency(p[kind][0]["file"])
            rows.append({"model": "lenet5", "method": f"magnitude {PRUNE_SPARSITY:.0%} global + {FINETUNE.epochs} "
                         f"epochs {'fine-tune' if kind == 'finetune' else f'distill (T={TEMPERATURE:g})'}",
                         "error_pct": m, "error_pct_std": sd, "paper_error_pct": None, "dense_error_pct": dense_err,
                         "paper_dense_error_pct": None, "compression_nonzero": counts["compression_weights"],
                         **file_bytes_counts(p[kind][0]["file"]), "paper_compression": None,
                         "speedup_b1": lat["1"]["speedup"],
                         "speedup_b256": lat["256"]["speedup"], "wall_s": statistics.fmean(
                             r["wall_s"] for r in p[kind]), "target_met": None, "seeds": len(p[kind]), **counts})
            print(f"prune+{kind:8s} test error {m:.2f}% (sd {sd}) at {counts['compression_weights']:.1f}x", flush=True)
    if "lowrank" in args.parts:
        lr = res["lowrank"] = lowrank(data, args.models, args.fresh)
        for name, runs in lr.items():
            dense_err = 100 * (1 - ns.evaluate(load_dense(dense_model(name, data)[0]), data.test)[1])
            for r in runs:
                for kind in ("lowrank", "magnitude"):
                    run = r[kind]
                    counts = weight_counts(run["file"])
                    run["latency"] = latency(run["file"])
                    note = " (diverged at LR 0.01: re-run at 0.001)" if run.get("finetune_note") else ""
                    rows.append({"model": name, "method": (r["label"] if kind == "lowrank" else
                                 f"magnitude global, same weights as '{r['label']}'") + f" + {FINETUNE.epochs} "
                                 "epochs fine-tune" + note, "finetune_note": run.get("finetune_note"),
                                 "error_pct": run["test_error_pct"], "paper_error_pct": None,
                                 "dense_error_pct": dense_err, "paper_dense_error_pct": None,
                                 "compression_nonzero": counts["compression_weights"],
                                 **file_bytes_counts(run["file"]), "paper_compression": None,
                                 "speedup_b1": run["latency"]["1"]["speedup"],
                                 "speedup_b256": run["latency"]["256"]["speedup"],
                                 "flop_ratio_bound": run["latency"]["flop_ratio_bound"], "wall_s": run["wall_s"],
                                 "target_met": None, "seeds": 1, "lowrank_or_baseline": kind, **counts})
                    print(f"{name} {rows[-1]['method'][:60]:60s} err {run['test_error_pct']:.2f}% "
                          f"{counts['compression_weights']:.1f}x speedup b1 {rows[-1]['speedup_b1']:.2f} "
                          f"b256 {rows[-1]['speedup_b256']:.2f}", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    name = res["benchmark"]
    if args.quick:  # a smoke run: kept out of the README's sources
        (CACHE / f"{name}.json").write_text(json.dumps(res, indent=2))
        plot(res, CACHE / f"{name}.png")
    else:
        write_result(name, res)
        plot(res, RESULTS / f"{name}.png")


def plot(res: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    hinton_rows = [r for r in res["table_rows"] if r["model"].startswith("mlp")]
    if hinton_rows:
        x = range(len(hinton_rows))
        ax.bar([i - 0.2 for i in x], [r["error_pct"] * 100 for r in hinton_rows], 0.4,
               yerr=[(r["error_pct_std"] or 0) * 100 for r in hinton_rows], label="ours (mean ± std)")
        ax.bar([i + 0.2 for i in x], [r["paper_test_errors"] for r in hinton_rows], 0.4, label="paper")
        ax.set_xticks(list(x), ["teacher", "student", "distilled"])
        ax.set_ylabel("test errors of 10,000")
        ax.set_title("Hinton et al. 2015, MNIST", fontsize=9)
        ax.legend(fontsize=7)
    for ax, key, label in ((axes[1], "error_pct", "test error %"), (axes[2], "speedup_b256",
                                                                    "speedup over dense, batch 256")):
        for i, model in enumerate(("lenet300", "lenet5")):
            for kind, marker in (("lowrank", "o"), ("magnitude", "s")):
                pts = [r for r in res["table_rows"] if r["model"] == model and r.get("lowrank_or_baseline") == kind]
                if pts:
                    ax.scatter([100 * r["weights_nonzero"] / r["weights"] for r in pts], [r[key] for r in pts],
                               marker=marker, color=f"C{2 * i + (kind == 'magnitude')}", label=f"{model} {kind}")
        ax.set_xlabel("weights kept %")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[1].set_title("low rank vs magnitude at the same weights", fontsize=9)
    axes[2].set_title("runtime form vs dense model, 2 threads", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
