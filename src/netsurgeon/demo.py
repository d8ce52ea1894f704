"""``netsurgeon demo``: the whole pipeline on scikit-learn's bundled digits, in well under a minute."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ._validation import atomic_write
from .data import digits
from .masks import sparsity_report
from .modelfile import load_compressed, save_model
from .models import build_model
from .nsz import save_compressed
from .pruning.magnitude import prune_and_retrain
from .report import plot_kept, summarize
from .train import TrainConfig, train

__all__ = ["run_demo"]


def run_demo(out_dir: str | os.PathLike[str] = "netsurgeon-demo", *, sparsity: float = 0.95,
             seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Train LeNet-300-100 on 8x8 digits, prune it iteratively with retraining, write ``small.nsz``,
    reload it and measure both models. Writes ``base.safetensors``, ``small.nsz``, ``kept.png`` and
    ``summary.json`` under ``out_dir``; returns the summary."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = digits(seed=seed)
    torch.manual_seed(seed)  # initial weights: the same seed gives the same demo
    model = build_model("lenet300", data.input_shape)
    cfg = TrainConfig(epochs=20, lr=0.05, batch_size=64, seed=seed)
    train(model, data, cfg, progress=progress)
    save_model(model, out / "base.safetensors", meta={"data": "digits"})
    before = summarize(model, data.input_shape, data=data, file_path=out / "base.safetensors")
    dense = copy.deepcopy(model).eval()   # the original dense model: the reference of every speed figure
    prune_and_retrain(model, data, sparsity=sparsity, rounds=3, epochs_per_round=10, scope="global",
                      config=cfg, progress=progress)
    kept = {r.name.removesuffix(".weight"): 100 * r.kept for r in sparsity_report(model, include_bias=False)}
    save_compressed(model, out / "small.nsz", value_dtype="float16", meta={"data": "digits", "method": "magnitude"})
    small = load_compressed(out / "small.nsz")
    after = summarize(small, data.input_shape, data=data, file_path=out / "small.nsz", reference=dense)
    plot_kept({"kept %": kept}, out / "kept.png",
              f"LeNet-300-100 on digits, magnitude pruning to {100 * sparsity:.0f}% (global)")
    result = {"before": before, "after": after, "kept_pct": kept, "wall_s": time.perf_counter() - t0,
              "files": {k: str(out / k) for k in ("base.safetensors", "small.nsz", "kept.png")},
              "summary": str(out / "summary.json")}
    with atomic_write(out / "summary.json", "w") as f:
        json.dump(result, f, indent=2)
    return result
