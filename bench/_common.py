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


class BestOnValidation(ns.Callback):
    """Keep the weights of the epoch with the best validation accuracy and restore them at the end (the papers'
    model selection; the test split is never read). Its state goes into checkpoints, so a resumed run keeps it."""

    def __init__(self) -> None:
        self.best_acc, self.best_epoch, self.best = -1.0, 0, None

    def on_epoch_end(self, trainer=None) -> None:
        h = trainer.history[-1]
        if h["val_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = h["val_acc"], h["epoch"]
            self.best = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def restore(self, model) -> None:
        if self.best is not None:
            model.load_state_dict(self.best)

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.best_epoch, self.best = state["best_acc"], state["best_epoch"], state["best"]


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
