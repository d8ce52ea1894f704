"""1 vs 2 ranks (torchrun, gloo, this CPU): the sharded WoodFisher fit and DNS training steps on LeNet-5 (issue 18).

For each setting (1 rank x 2 threads, 1 rank x 1 thread, 2 ranks x 1 thread) one torchrun job, on the benchmark's
dense LeNet-5 (bench/.cache, trained as in bench/han_mnist.py):
  - WoodFisher fit with block size B = 2000 and m = 1000 gradients (explicit 2000 x 2000 float64 blocks: the
    statistics dominate memory), then one-shot pruning to 90%: time of the gradient and inversion phases, the
    bytes of inverses each rank holds, its peak resident memory (ru_maxrss) before and after the fit, and the
    per-rank estimate the pruner logs before it starts;
  - DNS training steps (batch 64, split across ranks): median seconds per step over 60 steps after 10.
The pruned models of the 1-rank and 2-rank runs must have the same mask (checked) and are measured like every
other row (test error, nonzeros by the one counting rule, file bytes, latency of the runtime form vs dense).

The design note's numbers (docs/distributed.md: ResNet-50 on 8 ranks) come from the same memory estimate the
pruner uses, on ResNet-50's weight shapes; they are written to the JSON as ``resnet50_plan``.

    python bench/distributed.py --data-dir ../shared/data/mnist

Not through ns.Pipeline: each rank reads the sharded fit's internals (phase seconds, bytes of inverses held, the
logged memory estimate, RSS between fit and prune) and times DNS steps with a clock callback beside DNS's, none of
which a stage's report carries.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import netsurgeon as ns
from _common import CACHE, REPO, RESULTS, dense_model, machine, pyplot, rel, save_figure, weight_counts, write_result
from netsurgeon.report import summarize

SETTINGS = [(1, 2), (1, 1), (2, 1)]  # (ranks, threads per rank)
FISHER = {"num_grads": 1000, "block_size": 2000, "damp": 1e-5}
SPARSITY = 0.9
DNS_STEPS, DNS_WARMUP = 60, 10


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: list[str]) -> None:
    """One rank: fit + prune, then DNS steps; writes OUT/rank{r}.json (and rank 0 the pruned .nsz)."""
    dense, data_dir, out, threads = Path(args[0]), Path(args[1]), Path(args[2]), int(args[3])
    from netsurgeon import distributed as ddp
    from netsurgeon.pruning.dns import DNS
    from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

    torch.set_num_threads(threads)
    ddp.init_from_env()
    rank, size = ddp.world()
    data = ns.data.mnist(data_dir)
    model = ns.modelfile.load_model(dense)[0]
    rss0 = _rss_mib()
    pruner = OneShotPruner("woodfisher", FisherConfig(**FISHER))
    t0 = time.perf_counter()
    pruner.fit(model, data.train)
    fit_s = time.perf_counter() - t0
    rss_fit = _rss_mib()
    d = sum(pruner.sizes_)
    estimate = pruner.memory_estimate(d, FISHER["block_size"], size)  # what it logged before starting
    rep = pruner.prune(model, SPARSITY)
    held = pruner.held_bytes_
    result = {"rank": rank, "ranks": size, "threads": threads, "fit_s": fit_s, "prune_s": rep["seconds"],
              **{f"{k}_s": v for k, v in pruner.phase_seconds_.items()}, "held_inverse_bytes": held,
              "estimate_bytes": estimate, "rss_before_fit_mib": rss0, "peak_rss_after_fit_mib": rss_fit}
    del pruner
    if rank == 0:
        f = RESULTS / "files" / f"distributed_woodfisher_{size}r{threads}t.nsz"
        ns.save_compressed(model, f)
        result["file"] = rel(f)
    # DNS training steps on a fresh copy of the dense model
    model = ns.modelfile.load_model(dense)[0]
    stamps: list[float] = []

    class Clock(ns.Callback):
        def after_step(self, trainer=None) -> None:
            stamps.append(time.perf_counter())

    cfg = ns.TrainConfig(epochs=1, max_steps=DNS_STEPS + DNS_WARMUP, batch_size=64, lr=0.01, seed=0)
    ns.train(model, data, cfg, callbacks=[DNS(c_rate=3.0), Clock()])
    steps = [b - a for a, b in zip(stamps[DNS_WARMUP - 1:], stamps[DNS_WARMUP:], strict=False)]
    result["dns_step_s"] = statistics.median(steps)
    result["peak_rss_end_mib"] = _rss_mib()
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    ddp.barrier()


def resnet50_weights() -> list[tuple[str, tuple[int, ...]]]:
    """The Conv/Linear weight shapes of ResNet-50 (He et al. 2016, Table 1: bottlenecks [3, 4, 6, 3], widths 64-512,
    expansion 4, a 1x1 projection at each stage's first block), 1000 classes."""
    shapes = [("conv1", (64, 3, 7, 7))]
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), 1):
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            shapes += [(f"{name}.conv1", (width, cin, 1, 1)), (f"{name}.conv2", (width, width, 3, 3)),
                       (f"{name}.conv3", (4 * width, width, 1, 1))]
            if b == 0:
                shapes.append((f"{name}.downsample", (4 * width, cin, 1, 1)))
            cin = 4 * width
    shapes.append(("fc", (1000, 2048)))
    return shapes


def resnet50_plan(ranks: int = 8, num_grads: int = 400, block: int = 2000) -> dict:
    """Memory per rank of the sharded WoodFisher on ResNet-50 (the official ImageNet setting: N = 400 gradients,
    blocks of 2000) and the communication per rank, computed with the pruner's own estimate."""
    from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

    shapes = resnet50_weights()
    sizes = [int(torch.Size(s).numel()) for _, s in shapes]
    d = sum(sizes)
    p = OneShotPruner("woodfisher", FisherConfig(num_grads=num_grads, block_size=block))
    p.sizes_, p.shapes_ = sizes, [s for _, s in shapes]
    one, per = p.memory_estimate(d, block), p.memory_estimate(d, block, ranks)
    official = 4 * block * d  # the official code: explicit float32 block x block matrices, all on one process
    share = -(-num_grads // ranks)
    return {
        "weights": d, "layers": len(sizes), "ranks": ranks, "num_grads": num_grads, "block_size": block,
        "blocks": len(p.block_ranges(d, block)),
        "single_process_bytes": one, "per_rank_bytes": per, "official_explicit_float32_bytes": official,
        "alltoall_bytes_sent_per_rank": 4 * share * d * (ranks - 1) // ranks,
        "scores_allgather_bytes_received_per_rank": 4 * d * (ranks - 1) // ranks,
        "update_allgather_bytes_received_per_rank": 8 * d * (ranks - 1) // ranks,
        "ddp_step_allreduce_bytes_per_rank": int(2 * (ranks - 1) / ranks * 4 * d),
        "how": "OneShotPruner.memory_estimate on ResNet-50's weight shapes (bench/distributed.py resnet50_weights); "
               "communication: the all-to-all moves each rank's m/W gradient rows minus its own columns; ring "
               "all-reduce 2(W-1)/W x 4 bytes x d per training step",
    }


def launch(ranks: int, threads: int, dense: Path, data_dir: Path, reuse: bool = False) -> list[dict]:
    out = CACHE / f"distributed_{ranks}r{threads}t"
    if reuse and all((out / f"rank{r}.json").is_file() for r in range(ranks)):
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           __file__, "--worker", str(dense), str(data_dir), str(out), str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    for r in rows:
        r["job_wall_s"] = wall
    return rows


def main() -> None:
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--reuse", action="store_true", help="reuse the ranks' results in bench/.cache (re-measure rows)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    data = ns.data.mnist(args.data_dir)
    dense, _ = dense_model("lenet5", data)
    runs = {f"{r}r{t}t": launch(r, t, dense, args.data_dir.resolve(), args.reuse) for r, t in SETTINGS}
    masks = {}
    rows = []
    dense_err = 100 * (1 - ns.evaluate(ns.modelfile.load_model(dense)[0], data.test)[1])
    for key, ranks in runs.items():
        r0 = ranks[0]
        m = ns.load_compressed(REPO / r0["file"])
        masks[key] = torch.cat([p.detach().flatten() != 0 for n, p in m.named_parameters() if n.endswith("weight")])
        sm = summarize(m, data.input_shape, data=data, file_path=REPO / r0["file"])
        rows.append({"model": "lenet5", "method": f"WoodFisher one-shot {int(SPARSITY * 100)}% (B=2000, m=1000), "
                                                  f"{r0['ranks']} rank(s) x {r0['threads']} thread(s)",
                     "error_pct": sm["test_error_pct"], "dense_error_pct": dense_err,
                     "compression_nonzero": sm["compression_nonzero"], "compression_bytes": sm["compression_bytes"],
                     "speedup_b1": sm["latency"]["1"]["speedup"], "speedup_b256": sm["latency"]["256"]["speedup"],
                     "wall_s": r0["fit_s"] + r0["prune_s"], "paper_error_pct": None, "paper_compression": None,
                     "ranks": r0["ranks"], "threads_per_rank": r0["threads"],
                     "fit_s_per_rank": [r["fit_s"] for r in ranks],
                     "held_inverse_gib_per_rank": [r["held_inverse_bytes"] / 2**30 for r in ranks],
                     "estimate_gib_per_rank": [r["estimate_bytes"]["total"] / 2**30 for r in ranks],
                     "peak_rss_fit_gib_per_rank": [r["peak_rss_after_fit_mib"] / 1024 for r in ranks],
                     "rss_before_fit_gib_per_rank": [r["rss_before_fit_mib"] / 1024 for r in ranks],
                     "dns_step_ms": 1000 * r0["dns_step_s"], **weight_counts(r0["file"])})
    same_mask = {k: bool(torch.equal(v, masks["1r2t"])) for k, v in masks.items()}
    # the 1-rank reference: the lower of the two 1-rank runs (same statistics; glibc heap fragmentation makes a
    # single process peak 8.6 or 11.7 GiB from run to run, docs/distributed.md): the conservative comparison
    one = min((runs[k][0] for k in ("1r1t", "1r2t")),
              key=lambda r: r["peak_rss_after_fit_mib"] - r["rss_before_fit_mib"])
    two = runs["2r1t"]
    result = {
        "benchmark": "distributed", "machine": machine(), "settings": SETTINGS, "fisher": FISHER,
        "sparsity": SPARSITY, "runs": runs, "same_mask_as_1_rank": same_mask,
        "memory_ratio_2_vs_1_rank": {
            "held_inverses": max(r["held_inverse_bytes"] for r in two) / one["held_inverse_bytes"],
            "peak_rss_fit": max(r["peak_rss_after_fit_mib"] for r in two) / one["peak_rss_after_fit_mib"],
            "peak_rss_fit_above_start": max(r["peak_rss_after_fit_mib"] - r["rss_before_fit_mib"] for r in two)
            / (one["peak_rss_after_fit_mib"] - one["rss_before_fit_mib"])},
        "target": "per-rank memory of the fit roughly halves with 2 ranks (issue 18)",
        "reference_1_rank": f"{one['ranks']} rank x {one['threads']} threads (the lower 1-rank peak)",
        "resnet50_plan": resnet50_plan(), "table_rows": rows,
    }
    ratio = result["memory_ratio_2_vs_1_rank"]["peak_rss_fit_above_start"]
    result["target_met"] = bool(ratio <= 0.6 and all(same_mask.values()))
    path = write_result("distributed", result)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    labels = list(runs)
    axes[0].bar(labels, [max(r["peak_rss_after_fit_mib"] - r["rss_before_fit_mib"] for r in runs[k]) / 1024
                         for k in labels])
    axes[0].set_title("fit: peak memory above start\n(GiB, largest rank)", fontsize=9)
    axes[1].bar(labels, [max(r["fit_s"] for r in runs[k]) for k in labels])
    axes[1].set_title("fit wall time (s)", fontsize=9)
    axes[2].bar(labels, [1000 * runs[k][0]["dns_step_s"] for k in labels])
    axes[2].set_title("DNS step, batch 64 (ms)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("ranks x threads")
    save_figure(fig, RESULTS / "distributed.png")
    for row in rows:
        print(f"{row['method']:70s} err {row['error_pct']:.2f}%  fit {row['wall_s']:.1f} s  peak "
              f"{max(row['peak_rss_fit_gib_per_rank']):.2f} GiB  DNS step {row['dns_step_ms']:.1f} ms")
    print(json.dumps(result["memory_ratio_2_vs_1_rank"]), "same mask:", same_mask)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
