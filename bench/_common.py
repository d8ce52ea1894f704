"""Helpers shared by the benchmark scripts: machine facts, cached stages, JSON results."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import netsurgeon as ns
from netsurgeon._validation import atomic_save, atomic_write
from netsurgeon.modelfile import load_model, save_model

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
ns.stats.keep_freed_memory()  # before any timing: large tensors must not pay page faults by allocation history


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ns.stats.cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d"), "allocator": ns.stats.keep_freed_memory()}


def cached_json(name: str, compute: Callable[[], dict[str, Any]], fresh: bool = False, *,
                source: Any = None) -> dict[str, Any]:
    """Return the stage result cached under bench/.cache/NAME.json, computing (and caching) it if absent.

    An interrupted benchmark re-run skips the stages it already finished. ``source``: what the stage starts from
    (a result file, or targets, c, ...); its :func:`content_key` is appended to the name, so a stage whose
    starting point changed is recomputed instead of returning a stale result.
    """
    path = CACHE / (f"{name}_{content_key(source)}.json" if source is not None else f"{name}.json")
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    out = compute()
    with atomic_write(path, "w") as f:
        json.dump(out, f, indent=2)
    return out


def content_key(source: str | Path | Any) -> str:
    """Short hash of what a cached stage starts from: a result file's bytes (a ``Path`` or a repository-relative
    path ending in ``.nsz``/``.safetensors``) or any JSON-able value (targets, c per layer). Cache names that
    carry it are recomputed when their starting point changes, instead of silently reusing stale results."""
    if isinstance(source, (str, Path)) and str(source).endswith((".nsz", ".safetensors")):
        data = (REPO / source).read_bytes()
    else:
        data = json.dumps(source, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:10]


def dns_choice(name: str) -> dict[str, Any]:
    """The DNS run bench/dns_mnist.py chose for ``name`` (its ``file``, ``c_rate``, ``targets_pct``,
    ``iter_stop``, ...), read from its committed result: every benchmark that starts from DNS starts from it."""
    return json.loads((RESULTS / "dns_mnist.json").read_text())["models"][name]["dns"]


def rel(path: str | Path) -> str:
    """``path`` relative to the repository, as results record it (absolute paths of this machine mean nothing
    elsewhere); ``REPO / rel(p)`` reads it back, and ``REPO / p`` also reads an old absolute record."""
    return str(Path(path).resolve().relative_to(REPO))


def weight_counts(path: str | Path) -> dict[str, Any]:
    """The one counting rule of every table (issue 13): weights only (Linear/Conv weight tensors), biases
    reported separately, read from the result's ``.nsz`` file."""
    from netsurgeon.architecture import original_model

    info = ns.nsz.read_header(REPO / path)
    weights = [r for r in info.records if r.name.endswith(".weight") and len(r.shape) >= 2]
    biases = [r for r in info.records if r.name.endswith(".bias")]
    n_w, nz_w = sum(r.numel for r in weights), sum(r.nonzero for r in weights)
    n_b = sum(r.numel for r in biases)
    orig = original_model(info.header.get("arch"))  # structured pruning: count against the layers as built
    if orig is not None:
        state = orig.state_dict()
        # a layer of the original counts when the file holds it whole (fc1.weight) or factorized (fc1.0.weight)
        held = {r.name.rpartition(".")[0] for r in info.records}

        def kept(key: str) -> bool:
            layer = key.rpartition(".")[0]
            return layer in held or any(h.startswith(layer + ".") for h in held)

        n_w = sum(v.numel() for k, v in state.items() if kept(k) and k.endswith(".weight") and v.dim() >= 2)
        n_b = sum(v.numel() for k, v in state.items() if kept(k) and k.endswith(".bias"))
    return {"file": rel(REPO / path), "weights": n_w, "weights_nonzero": nz_w,
            "compression_weights": n_w / max(nz_w, 1), "biases": n_b,
            "biases_nonzero": sum(r.nonzero for r in biases)}


def file_bytes_counts(path: str | Path) -> dict[str, Any]:
    """The one definition of "file x smaller" (issue 39.6b): :func:`netsurgeon.stats.dense_bytes` of the model
    before compression (every parameter and buffer, BatchNorm statistics included; the architecture before
    structured pruning or factorization, as the file's header records it) over the file's bytes on disk."""
    info = ns.nsz.read_header(REPO / path)
    return {"file_bytes": info.file_bytes, "dense_bytes": info.dense_bytes, "compression_bytes": info.compression}


def recount_bytes(res: dict[str, Any], arch_of_row: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]],
                  why: str) -> list[dict[str, Any]]:
    """Recompute ``compression_bytes`` of every table row that names a file by :func:`file_bytes_counts`'s
    definition, from the file bytes the row records (its file may no longer be committed: bench/files_budget.py),
    without re-running anything. The dense bytes come from the file's header where the file is here, else from
    the row's architecture as ``arch_of_row(row)`` = (model name, build arguments) builds it; both must agree
    where both exist. The rows gain ``file_bytes`` and ``dense_bytes``; ``res["recounts"]`` records how."""
    from netsurgeon.stats import dense_bytes

    built: dict[str, int] = {}
    changed = []
    for row in res.get("table_rows", []):
        if not row.get("file") or row.get("compression_bytes") is None:
            continue
        name, kwargs = arch_of_row(row)
        key = json.dumps([name, kwargs], sort_keys=True)
        if key not in built:
            built[key] = dense_bytes(ns.build_model(name, **kwargs))
        dense, size = built[key], row.get("file_bytes")
        path = REPO / row["file"]
        if path.is_file():
            here = file_bytes_counts(row["file"])
            if size is not None and size != here["file_bytes"]:
                raise ValueError(f"{row['file']}: the row records {size} bytes, the file has {here['file_bytes']}")
            if here["dense_bytes"] != dense:
                raise ValueError(f"{row['file']}: its header's dense model has {here['dense_bytes']} bytes, "
                                 f"{name} {kwargs} {dense}")
            size = here["file_bytes"]
        if not size:
            raise ValueError(f"{row['file']}: not here and the row records no file_bytes")
        before = row["compression_bytes"]
        row.update(file_bytes=size, dense_bytes=dense, compression_bytes=dense / size)
        changed.append({"file": row["file"], "before": before, "after": row["compression_bytes"]})
    res.setdefault("recounts", []).append({
        "what": "compression_bytes", "why": why, "machine": machine(), "rows": len(changed),
        "how": "dense_bytes (netsurgeon.stats.dense_bytes of the model before compression: every parameter and "
               "buffer x 4) / the file bytes each row records; nothing re-run (bench/_common.py recount_bytes)",
        "changed": changed})
    return changed


def write_result(name: str, result: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    with atomic_write(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


DENSE = {  # the dense reference models every MNIST benchmark starts from (SGD + momentum, cosine LR)
    "lenet300": ns.TrainConfig(epochs=20, lr=0.05, weight_decay=1e-4, schedule="cosine", batch_size=64),
    "lenet5": ns.TrainConfig(epochs=15, lr=0.01, weight_decay=5e-4, schedule="cosine", batch_size=64),
    "mlpnet": ns.TrainConfig(epochs=10, lr=0.05, weight_decay=1e-4, schedule="cosine", batch_size=64),
}


def dense_model(name: str, data: ns.data.Dataset, fresh: bool = False,
                quick: bool = False) -> tuple[Path, float | None]:
    """Train (or reuse from bench/.cache) the dense reference model; returns (file, wall seconds of training).

    Training checkpoints every 500 steps, so an interrupted run resumes.
    """
    from dataclasses import replace

    cfg = DENSE[name] if not quick else replace(DENSE[name], epochs=1)
    tag = "_quick" if quick else ""
    path, ckpt = CACHE / f"han_{name}_dense{tag}.safetensors", CACHE / f"han_{name}_dense{tag}.ckpt"
    wall_file = CACHE / f"han_{name}_dense{tag}.wall"
    if fresh or not path.is_file():
        t0 = time.perf_counter()
        torch.manual_seed(0)  # the initial weights too: the same dense model on every run (same threads)
        model = ns.build_model(name)
        ns.train(model, data, cfg, checkpoint=ckpt, checkpoint_every=500, resume=ckpt.is_file() and not fresh,
                 progress=True)
        save_model(model, path)
        wall_file.write_text(str(time.perf_counter() - t0))
    wall = float(wall_file.read_text()) if wall_file.is_file() else None  # None: trained before walls were kept
    return path, wall


def load_dense(path: Path):
    return load_model(path)[0]


def parse_args(doc: str, models: list[str], quick_help: str, extra: Callable[[Any], None] | None = None):
    """The command line every MNIST benchmark shares (``extra(parser)`` adds a script's own options); returns
    (args, data) with logging set up."""
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="MNIST IDX directory, e.g. ../shared/data/mnist")
    ap.add_argument("--models", nargs="+", default=models, choices=models)
    ap.add_argument("--fresh", action="store_true", help="ignore cached stages")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args, ns.data.mnist(args.data_dir)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically and free it."""
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    pyplot().close(fig)


def run_stages(model, stages: list[dict], data=None, progress: bool = True) -> list[dict]:
    """Run ``stages`` (``[{method: {options}}, ...]``, a recipe's ``stages``) on ``model`` in place through
    ``ns.Pipeline``, the code path of ``netsurgeon compress``; returns each stage's record (its report)."""
    return ns.Pipeline.from_spec(stages).run(model, data, progress=progress)


def train_options(cfg: ns.TrainConfig, **changes: Any) -> dict[str, Any]:
    """A TrainConfig's fields as stage options (every training-time method takes them), with ``changes``."""
    return {**cfg.to_dict(), **changes}


def magnitude_stages(cfg: ns.TrainConfig, *, sparsity: float | dict[str, float], rounds: int, epochs: int,
                     lr_factor: float, final: int = 0, scope: str = "layer") -> list[dict]:
    """Han et al.'s iterative pruning as stages: ``rounds`` of magnitude pruning each retrained ``epochs`` at
    LR x ``lr_factor`` (the ``magnitude`` method, training fields from ``cfg``), then, if ``final``, the same masks
    retrained ``final`` epochs longer at that LR with seed ``cfg.seed + 100`` (a ``finetune`` stage)."""
    stages = [{"magnitude": train_options(cfg, epochs=epochs, sparsity=sparsity, scope=scope, rounds=rounds,
                                          lr_factor=lr_factor)}]
    if final:
        stages.append({"finetune": train_options(cfg, lr=cfg.lr * lr_factor, epochs=final, seed=cfg.seed + 100)})
    return stages


HAN_PAPER = {  # Han et al. 2015, Table 1 (errors) and Table 2 (% of weights kept per layer)
    "lenet300": {"ref_error": 1.64, "pruned_error": 1.59, "compression": 12.0,
                 "kept": {"fc1": 8.0, "fc2": 9.0, "fc3": 26.0}},
    "lenet5": {"ref_error": 0.80, "pruned_error": 0.77, "compression": 12.0,
               "kept": {"conv1": 66.0, "conv2": 12.0, "fc1": 8.0, "fc2": 19.0}},
}
# (epochs per prune/retrain round, LR factor, final epochs at the last sparsity), 3 rounds: the schedules chosen
# on the validation split in bench/missed_targets.py (docs/missed_targets.md); before: 6 / 10 epochs, LR / 10, none
HAN_SCHEDULE = {"lenet300": (10, 0.5, 20), "lenet5": (6, 0.1, 12)}


def han_stages(name: str, cfg: ns.TrainConfig, *, quick: bool = False, **kw: Any) -> list[dict]:
    """bench/han_mnist.py's pruning on the schedule chosen on validation (HAN_SCHEDULE) as stages: 3 rounds of
    pruning and retraining at LR x lr_factor, then the same masks retrained ``final`` epochs longer (not with
    ``quick``: 1 epoch per round). ``kw``: sparsity, scope."""
    per_round, lr_factor, final = HAN_SCHEDULE[name]
    return magnitude_stages(cfg, rounds=3, epochs=1 if quick else per_round, lr_factor=lr_factor,
                            final=0 if quick else final, **kw)


DNS_ITERATIONS = {"lenet5": 16_000, "lenet300": 25_000}  # Guo et al. 2016's surgery runs (bench/dns_mnist.py)
# Surgery run: Caffe's LeNet solver (lr 0.01, momentum 0.9, wd 5e-4, "inv" policy), the official example's
# gamma = 1e-4 for LeNet-5 and the default 1e-3 for LeNet-300-100; masks freeze at 7/8 of the run.
DNS_SURGERY = {
    "lenet5": dict(gamma=1e-4, lr=0.01),
    "lenet300": dict(gamma=1e-3, lr=0.01),
}


def dns_surgery_stage(name: str, c: dict[str, float], iterations: int, steps_per_epoch: int,
                      iter_stop: int | None = None) -> dict:
    """DNS surgery's stage: SGD at the official solver's inv LR for ``iterations`` steps, c per layer, the
    per-step history every 250 steps; ``iter_stop`` None keeps the stage's default (the official code's)."""
    cfg = ns.TrainConfig(epochs=-(-iterations // steps_per_epoch), max_steps=iterations, lr=DNS_SURGERY[name]["lr"],
                         momentum=0.9, weight_decay=5e-4, schedule="inv", lr_gamma=1e-4, lr_power=0.75)
    opts = train_options(cfg, c_rate=c, gamma=DNS_SURGERY[name]["gamma"], log_every=250)
    return {"dns": opts if iter_stop is None else {**opts, "iter_stop": iter_stop}}


def dns_surgery(name: str, data, dense_path: Path, targets: dict[str, float], tag: str, iterations: int,
                iter_stop: int | None = None) -> dict:
    """One DNS surgery run from the dense model (bench/dns_mnist.py, bench/missed_targets.py): c calibrated per
    layer on the dense weights to keep ``targets`` %; ``iter_stop`` None is DNS's default (the official code's).
    Through the ``dns`` stage, checkpointed every 1,000 steps under bench/.cache (an interrupted run resumes); the
    plots read the stage report's per-step ``surgery_history``."""
    from netsurgeon.masks import sparsity_report
    from netsurgeon.pruning.dns import calibrate_c_rate

    model = load_dense(dense_path)

    def tensors(layer: str) -> list:
        m = model.get_submodule(layer)
        return [m.weight] + ([m.bias] if m.bias is not None else [])

    c = {k: calibrate_c_rate(tensors(k), v / 100) for k, v in targets.items()}
    stage = dns_surgery_stage(name, c, iterations, -(-len(data.train) // 64), iter_stop)
    t0 = time.perf_counter()
    run = ns.Pipeline.from_spec([stage]).run(model, data, progress=True, checkpoint_dir=CACHE / f"dns_{name}_{tag}",
                                              checkpoint_every=1000, resume=True)[0]
    wall = time.perf_counter() - t0
    f = (CACHE if "quick" in tag else RESULTS / "files") / f"dns_{name}_{tag}.nsz"
    ns.save_compressed(model, f, value_dtype="float16", meta={"method": "dns", "c_rate": c})
    kept = {r.name.removesuffix(".weight"): 100 * r.kept for r in sparsity_report(model, include_bias=False)}
    return {"tag": tag, "targets_pct": targets, "c_rate": c, "iter_stop": run["config"]["iter_stop"],
            "kept_pct": kept, "iterations": iterations,
            "val_error_pct": 100 * (1 - ns.evaluate(model, data.val)[1]), "wall_s": wall, "file": rel(f),
            "surgery": run["report"]["surgery"], "history": run["report"]["surgery_history"]}


DC_PAPER = {  # Deep Compression Tables 2-3: size after pruning + quantization (+ Huffman)
    "lenet300": {"dense_kb": 1070, "kb": 27, "compression": 40, "before_huffman": 32, "error": 1.58,
                 "ref_error": 1.64},
    "lenet5": {"dense_kb": 1720, "kb": 44, "compression": 39, "before_huffman": 33, "error": 0.74,
               "ref_error": 0.80},
}
DC_PAPER_WIDTHS = {"conv": 8, "fc": 5}   # the paper's relative-index widths (Sec. 2): 8 bits conv, 5 bits fc
DC_BITS = {"conv": 8, "fc": 5}
DC_CENTROID = ns.TrainConfig(epochs=2, lr=0.001, momentum=0.9, weight_decay=0.0, schedule="cosine")


def dc_pipeline(name: str, label: str, src: str, data) -> dict:
    """Deep Compression from the pruned file bench/results/files/SRC (bench/deep_compression_mnist.py,
    bench/missed_targets.py): the ``kmeans`` stage (conv 8, fc 5 bits, linear init), the error before fine-tuning,
    a ``finetune`` stage of the centroids, then the file written with fixed-width streams and with Huffman."""
    path = RESULTS / "files" / src
    model = ns.load_compressed(path)
    pruned_err = 100 * (1 - ns.evaluate(model, data.test)[1])
    t0 = time.perf_counter()
    rep = run_stages(model, [{"kmeans": {"bits": DC_BITS, "init": "linear"}}])[0]["report"]["layers"]
    shared_err = 100 * (1 - ns.evaluate(model, data.test)[1])  # between the stages: sharing before fine-tuning
    run_stages(model, [{"finetune": train_options(DC_CENTROID)}], data)
    wall = time.perf_counter() - t0
    slug = f"{name}_{'dns' if label == 'DNS' else label.split()[1].strip('()')}".replace("-", "")
    out = {"source": src, "pruned_error_pct": pruned_err, "shared_error_pct_before_finetune": shared_err,
           "rms_error": {n: r["rms_error"] for n, r in rep.items()}, "wall_s": wall}
    for huff in (False, True):
        f = RESULTS / "files" / f"dc_{slug}{'_huffman' if huff else ''}.nsz"
        info = ns.save_compressed(model, f, value_dtype="float16", huffman=huff,
                                  meta={"method": f"{label} + k-means {DC_BITS} + centroid fine-tuning"})
        loaded = ns.load_compressed(f)
        out["huffman" if huff else "fixed"] = {
            "file": rel(f), "file_bytes": info.file_bytes, "compression_bytes": info.compression,
            "test_error_pct": 100 * (1 - ns.evaluate(loaded, data.test)[1])}
    nz, total = ns.stats.count_nonzero(loaded)
    out.update(nonzero=nz, params=total, compression_nonzero=total / nz,
               per_tensor={r.name: {"codec": r.codec, "bytes": r.bytes, "bytes_fixed": r.bytes_fixed,
                                    "index_bits": r.index_bits, "code_bits": r.code_bits}
                           for r in ns.read_compressed(REPO / out["huffman"]["file"])[0].records})
    return out


AP_EPOCHS = 10  # bench/autoprune_mnist.py's AutoPrune runs (also bench/missed_targets.py, bench/seeds_mnist.py)
AP_MU = {"lenet300": 100.0, "lenet5": 300.0}
AP_CFG = ns.TrainConfig(epochs=AP_EPOCHS, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine")


def ap_measure(model, data, t0: float, extra: dict | None = None, name: str = "", tag: str = "") -> dict:
    """Save bench/results/files/autoprune_NAME_TAG.nsz (float16) and measure it: errors, nonzeros, bytes, FLOPs."""
    from netsurgeon.masks import sparsity_report

    f = RESULTS / "files" / f"autoprune_{name}_{tag}.nsz"
    info = ns.save_compressed(model, f, value_dtype="float16")
    nz, total = ns.stats.count_nonzero(model)
    dense_f, eff_f = ns.stats.total_flops(model, data.input_shape)
    return {"test_error_pct": 100 * (1 - ns.evaluate(model, data.test)[1]),
            "val_error_pct": 100 * (1 - ns.evaluate(model, data.val)[1]),
            "compression_nonzero": total / nz, "nonzero": nz, "params": total, "file_bytes": info.file_bytes,
            "compression_bytes": info.compression, "flops_kept_pct": 100 * eff_f / dense_f,
            "kept_pct": {r.name.removesuffix(".weight"): 100 * r.kept for r in sparsity_report(model, False)},
            "wall_s": time.perf_counter() - t0, **(extra or {})}


def autoprune_stage(mu: float, steps: int, epochs: int = AP_EPOCHS, **kw: Any) -> dict:
    """AutoPrune's stage: AP_CFG's training for ``epochs``, M's Adam at 0.01, M frozen after 80% of ``steps``."""
    return {"autoprune": train_options(AP_CFG, epochs=epochs, **{"mu": mu, "m_lr": 0.01, "stop": int(0.8 * steps),
                                                                  **kw})}


def autoprune_run(name: str, data, mu: float, epochs: int = AP_EPOCHS, tag: str = "main", **kw) -> dict:
    """AutoPrune from the dense model (bench/autoprune_mnist.py; bench/missed_targets.py's longer attempts),
    through the ``autoprune`` stage; the result keeps the report's per-step ``pruning_history`` (plotted)."""
    m = load_dense(dense_model(name, data)[0])
    steps = epochs * -(-len(data.train) // AP_CFG.batch_size)
    t0 = time.perf_counter()
    report = run_stages(m, [autoprune_stage(mu, steps, epochs, **kw)], data)[0]["report"]
    return ap_measure(m, data, t0, {"mu": mu, "options": kw, "history": report["pruning_history"]}, name, tag)


def oneshot_stage(method: str, sparsity: float, **options: Any) -> dict:
    """The stage of one-shot ``method`` (a second-order pruner: woodfisher, kfac, diag_fisher, obd, ...) to one
    global ``sparsity`` with its ``options`` (num_grads, damp, block_size, seed, ...), fitted on the training split.
    ``magnitude`` is global magnitude pruning once, no retraining (the magnitude method's ``epochs: 0``; it takes
    no Fisher options), the same weights as ``OneShotPruner("magnitude", ...)``."""
    if method == "magnitude":
        return {"magnitude": {"sparsity": sparsity, "scope": "global", "epochs": 0}}
    return {method: {**options, "sparsity": sparsity}}


DAMPS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the damping grid of every second-order row (choose_damp)


def choose_damp(data, state: dict, method: str, over: dict, n_grads: int, sparsity: float = 0.95) -> dict:
    """The damping of a second-order row, chosen on the validation split (never test): the lambda of DAMPS with
    the best validation accuracy after one-shot pruning MLPNet (``state``) to ``sparsity`` with ``method`` (its
    registered stage: fit on the training split, prune) and the row's other options ``over`` (Fisher seed 0).
    Ties go to the smaller lambda. Every second-order row of every table (bench/woodfisher_mnist.py's sweep, the
    limited-data curves, the official conditions, bench/survey_mnist.py's K-FAC part) uses it."""
    val = {}
    for damp in DAMPS:
        m = ns.build_model("mlpnet")
        m.load_state_dict(state)
        run_stages(m, [oneshot_stage(method, sparsity, num_grads=n_grads, seed=0, **{**over, "damp": damp})], data,
                   progress=False)
        val[str(damp)] = 100 * ns.evaluate(m, data.val)[1]
    chosen = float(max(val, key=val.get))
    print(f"{method} {over} damping on the validation split at {sparsity:.0%}, {n_grads} gradients: {val} -> "
          f"{chosen:g}", flush=True)
    return {"chosen": chosen, "val_acc": val, "how": f"best validation accuracy at {sparsity:.0%} sparsity, "
                                                     f"{n_grads} gradients, seed 0, over {list(DAMPS)}"}


def pipeline_run(tag: str, model, stages: list[dict], data, meta: dict, out_dir: Path | None = None) -> dict:
    """Run ``stages`` on ``model``, save OUT_DIR/TAG.nsz (default bench/results/files/; smoke runs pass the
    cache), return its validation and test error and the wall time of the stages (saving excluded)."""
    t0 = time.perf_counter()
    pipe = ns.Pipeline.from_spec(stages)
    pipe.run(model, data)
    wall = time.perf_counter() - t0
    f = (out_dir or RESULTS / "files") / f"{tag}.nsz"
    pipe.save(model, f, meta=meta)
    return {"file": rel(f), "wall_s": wall, "val_error_pct": 100 * (1 - ns.evaluate(model, data.val)[1]),
            "test_error_pct": 100 * (1 - ns.evaluate(model, data.test)[1]), "stages": stages}


def latency(path: str) -> dict:
    """The runtime form of a result file against its original dense model (one interleaved measurement, 2
    threads, medians): speedup and ms at batch 1 and 256, and the FLOP-ratio bound."""
    from netsurgeon.latency import latency_report

    rep = latency_report(REPO / path, (1, 256), threads=2, repeats=100, onnx=False)
    return {b: {"speedup": rep["batches"][b]["speedup"]["runtime"], "ms": rep["batches"][b]["ms"]}
            for b in ("1", "256")} | {"flop_ratio_bound": rep.get("flop_ratio_bound")}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)
