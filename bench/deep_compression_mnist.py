"""Deep Compression (Han, Mao, Dally 2016, Tables 2-3) on MNIST: pruned LeNets -> k-means weight sharing
(conv 8 bits, fc 5 bits, linear init) -> centroid fine-tuning -> Huffman coding -> .nsz bytes.

    python bench/deep_compression_mnist.py --data-dir ../shared/data/mnist [--fresh]

Starts from the pruned models that bench/han_mnist.py and bench/dns_mnist.py wrote (bench/results/files/);
run those first. Writes bench/results/deep_compression_mnist.json and .png. Compression is the dense
float32 size of all parameters over the size of the .nsz file.
"""

from __future__ import annotations

import time
from pathlib import Path

import netsurgeon as ns
from _common import (
    DC_BITS,
    DC_CENTROID,
    DC_PAPER,
    DC_PAPER_WIDTHS,
    REPO,
    RESULTS,
    cached_json,
    dc_pipeline,
    dns_choice,
    machine,
    parse_args,
    pyplot,
    rel,
    run_stages,
    save_figure,
    weight_counts,
    write_result,
)

CHOI_LENET = 51.25  # Choi et al. 2017, LeNet compression ratio with Hessian-weighted k-means + Huffman
PAPER, PAPER_WIDTHS, BITS, CENTROID = DC_PAPER, DC_PAPER_WIDTHS, DC_BITS, DC_CENTROID  # in bench/_common.py
SOURCES = {  # pruned starting points: (label, file); DNS's is the run bench/dns_mnist.py chose
    "lenet300": [("magnitude per-layer (Han)", "han_lenet300_layer_float32.nsz"), ("DNS", None)],
    "lenet5": [("magnitude per-layer (Han)", "han_lenet5_layer_float32.nsz"),
               ("magnitude global", "han_lenet5_global_float32.nsz"), ("DNS", None)],
}


def sources(name: str) -> list[tuple[str, str]]:
    return [(label, src or Path(dns_choice(name)["file"]).name) for label, src in SOURCES[name]]


def _file(src: str) -> Path:
    """A pruned starting point's path relative to the repository: stages are cached under its content hash."""
    return RESULTS.relative_to(REPO) / "files" / src


def init_comparison(name: str, src: str, data) -> dict:
    """Accuracy right after sharing (no fine-tuning) for each initialization and fc bit width (Fig. 6-style)."""
    out = {}
    for init in ("linear", "density", "random"):
        for bits in (2, 3, 4, 5):
            model = ns.load_compressed(RESULTS / "files" / src)
            run_stages(model, [{"kmeans": {"bits": {"conv": 8, "fc": bits}, "init": init}}], progress=False)
            out.setdefault(init, {})[str(bits)] = 100 * ns.evaluate(model, data.test)[1]
    return out


def plot(res: dict, path) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    labels, fixed, huff = [], [], []
    for name, r in res["models"].items():
        for label, v in r["pipelines"].items():
            labels.append(f"{name}\n{label}")
            fixed.append(v["fixed"]["compression_bytes"])
            huff.append(v["huffman"]["compression_bytes"])
    xs = range(len(labels))
    a1.bar([x - 0.2 for x in xs], fixed, 0.4, label="k-means, fixed-width streams")
    a1.bar([x + 0.2 for x in xs], huff, 0.4, label="+ Huffman")
    a1.set_xticks(list(xs), labels, fontsize=7)
    a1.set_yscale("log")
    a1.set_ylabel("compression by .nsz bytes (x)")
    a1.legend(fontsize=7)
    for name, r in res["models"].items():
        for init, accs in r["init_comparison"].items():
            a2.plot([int(b) for b in accs], list(accs.values()), marker="o", label=f"{name} {init}")
    a2.set_xlabel("fc bits (before fine-tuning)")
    a2.set_ylabel("test accuracy %")
    a2.legend(fontsize=7)
    save_figure(fig, path)


def hessian_weighted(name: str, src: str, data) -> dict:
    """Choi et al. 2017: one codebook for all layers, k-means weighted by the diagonal of the empirical Fisher
    (2,000 gradients of mini-batch 16 on the training split), against plain k-means at the same bits.
    No fine-tuning, so the comparison isolates the clustering objective. Each file is the ``hessian_kmeans``
    stage (``weighted: false``: plain k-means over all layers); the Fisher diagonal is the same at every bit width
    (the same starting weights, gradient seed 0), computed by the stage each time."""
    out = {}
    for bits in (2, 3, 4, 5):
        for label, weighted in (("k-means, all layers", False), ("Hessian-weighted k-means", True)):
            m = ns.load_compressed(RESULTS / "files" / src)
            run_stages(m, [{"hessian_kmeans": {"bits": bits, "weighted": weighted, "num_grads": 2000,
                                               "grad_batch": 16, "seed": 0}}], data)
            f = RESULTS / "files" / f"dc_{name}_global_{'hw' if weighted else 'km'}{bits}.nsz"
            info = ns.save_compressed(m, f, value_dtype="float16")
            out.setdefault(label, {})[str(bits)] = {
                "test_error_pct": 100 * (1 - ns.evaluate(ns.load_compressed(f), data.test)[1]),
                "file_bytes": info.file_bytes, "compression_bytes": info.compression}
    return out


def paper_widths(name: str, label: str, huffman_file: str, data) -> dict:
    """The same weights (the Huffman file of a pipeline) written with the paper's fixed index widths instead of
    our automatic per-tensor width: the byte count to compare with the paper's like for like."""
    model = ns.load_compressed(REPO / huffman_file, keep_codecs=True)
    slug = "perlayer" if "per-layer" in label else "global" if "global" in label else "dns"
    f = RESULTS / "files" / f"dc_{name}_{slug}_paper_widths.nsz"
    info = ns.save_compressed(model, f, value_dtype="float16", index_bits=PAPER_WIDTHS)
    return {"file": rel(f), "file_bytes": info.file_bytes, "compression_bytes": info.compression,
            "test_error_pct": 100 * (1 - ns.evaluate(ns.load_compressed(f), data.test)[1])}


def _row(name: str, method: str, p: dict, is_han: bool, v: dict, out: dict, wall_s: float | None,
         target: bool | None) -> dict:
    """A table row for pipeline result ``v`` whose written file is ``out`` (Huffman or paper-width file)."""
    return {"model": name, "method": method, "error_pct": out["test_error_pct"],
            "paper_error_pct": p["error"] if is_han else None, "dense_error_pct": None,
            "paper_dense_error_pct": p["ref_error"], "kept_pct": 100 * v["nonzero"] / v["params"],
            "compression_nonzero": v["compression_nonzero"], "paper_compression": None,
            "paper_compression_bytes": p["compression"] if is_han else None,
            "compression_bytes": out["compression_bytes"], "speedup_b1": None, "speedup_b256": None,
            "wall_s": wall_s, "target_met": target, **weight_counts(out["file"])}


def add_paper_width_rows(res: dict, data) -> None:
    """Add, for every pipeline, the like-for-like row at the paper's index widths (issue 13, item 3)."""
    res["table_rows"] = [r for r in res["table_rows"] if "paper's fixed index widths" not in r["method"]]
    for name, r in res["models"].items():
        p = r["paper"]
        for label, v in r["pipelines"].items():
            w = v["paper_widths"] = paper_widths(name, label, v["huffman"]["file"], data)
            is_han = label.startswith("magnitude")
            res["table_rows"].append(_row(
                name, f"{label} + k-means + Huffman, paper's fixed index widths (conv 8, fc 5)", p, is_han, v, w,
                wall_s=None, target=None))


def main() -> None:
    t0 = time.perf_counter()

    def extra(ap) -> None:
        ap.add_argument("--paper-widths-only", action="store_true",
                        help="only add the rows at the paper's index widths to the committed result (no retraining)")

    args, data = parse_args(__doc__, ["lenet300", "lenet5"], "not supported for this benchmark", extra)
    if args.paper_widths_only:
        import json

        res = json.loads((RESULTS / "deep_compression_mnist.json").read_text())
        add_paper_width_rows(res, data)
        write_result("deep_compression_mnist", res)
        return
    res = {"benchmark": "deep_compression_mnist", "paper": "Han, Mao, Dally 2016, arXiv:1510.00149, Tables 2-3",
           "choi_2017_lenet_compression": CHOI_LENET,
           "machine": machine(), "bits": BITS, "centroid_finetune": CENTROID.__dict__, "models": {},
           "table_rows": []}
    for name in args.models:
        p = PAPER[name]
        r = {"paper": p, "pipelines": {}}
        for label, src in sources(name):
            v = cached_json(f"dc_{name}_{src.removesuffix('.nsz')}", lambda name=name, label=label, src=src:
                            dc_pipeline(name, label, src, data), args.fresh, source=_file(src))
            r["pipelines"][label] = v
            h = v["huffman"]
            is_han = label.startswith("magnitude")
            target = (h["compression_bytes"] >= p["compression"] and h["test_error_pct"] <= p["error"] + 0.1 + 1e-9
                      if is_han else None)
            if label == "DNS" and name == "lenet5":  # the stretch goal
                target = h["compression_bytes"] >= 300 and h["test_error_pct"] <= 1.0 + 1e-9
            r.setdefault("targets", {})[label] = target
            stretch = " (stretch goal >= 300x at <= 1.0%)" if label == "DNS" and name == "lenet5" else ""
            res["table_rows"].append(_row(name, f"{label} + k-means (conv 8, fc 5 bits) + Huffman{stretch}", p,
                                          is_han, v, h, wall_s=v["wall_s"], target=target))
        han = SOURCES[name][0][1]
        r["init_comparison"] = cached_json(f"dc_{name}_inits", lambda name=name, han=han: init_comparison(
            name, han, data), args.fresh, source=_file(han))
        r["hessian_weighted"] = cached_json(f"dc_{name}_hessian", lambda name=name, han=han: hessian_weighted(
            name, han, data), args.fresh, source=_file(han))
        res["models"][name] = r
    add_paper_width_rows(res, data)
    res["wall_s"] = time.perf_counter() - t0
    write_result("deep_compression_mnist", res)
    plot(res, RESULTS / "deep_compression_mnist.png")
    for row in res["table_rows"]:
        print(f"{row['model']:9s} {row['method']:60s} err {row['error_pct']:.2f}% | "
              f"{row['compression_bytes']:.1f}x bytes | target {row['target_met']}")


if __name__ == "__main__":
    main()
