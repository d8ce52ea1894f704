"""``netsurgeon compare``: every method on one model and one data set, measured the same way, in one report.

Each entry of the comparison is a pipeline (a registered method, plus a fine-tuning stage where the method itself
does not train). Every entry gets the same training budget: the same number of optimizer steps over the same
training split, whether a method spends them while compressing (DNS, binarization, ...) or fine-tuning after a
one-shot cut (OBD, WoodFisher, k-means, ...). The steps are planned from the wall-clock ``budget``: a few steps of
plain training are timed first and about half the budget is given to training, the rest to statistics, writing
and measuring. Each result is written as a ``.nsz`` file, read back, and measured like ``netsurgeon eval``: test
error, nonzero weights, file bytes, FLOPs and the runtime form's latency against the dense input model, timed
interleaved in one process (batch 1 and 256). A method that cannot run on the model (no BatchNorm for network
slimming, a Hessian too large for OBS, ...) is a row that says why; the others go on.

Results go to ``OUT/runs/NAME.json`` as each entry finishes, so an interrupted comparison continues where it
stopped (an entry whose settings changed is run again); ``OUT/results.json`` and ``OUT/index.html`` (one static
page: the table, Pareto fronts, per-layer kept %, the papers' figures where the model is a paper model) are
written at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import atomic_write
from .progress import log as progress_log

__all__ = ["SUITE", "Entry", "Plan", "parse_budget", "plan_budget", "resumable_plan", "input_fingerprint",
           "suite_entries", "read_pipelines", "plan_entries", "run_comparison", "compare", "layer_kept",
           "pareto_front", "PAPER_POINTS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The training budget of every entry: ``steps`` optimizer steps of ``batch_size`` (``steps_per_epoch`` per
    pass over the training split), and the sparsity that pruning entries aim for."""

    steps: int
    steps_per_epoch: int
    sparsity: float = 0.9
    batch_size: int = 64

    @staticmethod
    def epoch_steps(data: Any, batch_size: int = 64) -> int:
        """Optimizer steps in one pass over ``data``'s training split."""
        return max(1, -(-len(data.train) // batch_size))

    def train(self, fraction: float = 1.0) -> dict[str, Any]:
        """The training options of a stage that spends ``fraction`` of the budget."""
        steps = max(1, round(fraction * self.steps))
        epochs = -(-steps // self.steps_per_epoch)
        opts: dict[str, Any] = {"epochs": epochs, "batch_size": self.batch_size}
        if steps < epochs * self.steps_per_epoch:
            opts["max_steps"] = steps
        return opts


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: a name, a family (for the plots' colours) and its pipeline stages."""

    name: str
    family: str
    stages: list[dict[str, Any]]
    train_steps: int = 0


def _finetune(p: Plan, fraction: float = 1.0, **opts: Any) -> dict[str, Any]:
    return {"finetune": {**p.train(fraction), **opts}}


# A shared value's gradient sums over every weight of its cluster (thousands in a large layer), so plain SGD steps
# on codebooks diverge: at LR 0.01 on digits (91% error), and Hessian k-means on LeNet-5 even at 0.001 (NaN at
# step 25). Adam scales each value's step by its own gradient history: codebooks are fine-tuned with Adam at 1e-4.
_CODEBOOK = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0}


def _oneshot_ft(method: str, ft: dict[str, Any] | None = None, **opts: Any) -> Callable[[Plan], list[dict[str, Any]]]:
    return lambda p: [{method: dict(opts)}, _finetune(p, **(ft or {}))]


def _pruned_ft(method: str, **opts: Any) -> Callable[[Plan], list[dict[str, Any]]]:
    return lambda p: [{method: {"sparsity": p.sparsity, **opts}}, _finetune(p)]


def _trained(method: str, sparse: bool = False, **opts: Any) -> Callable[[Plan], list[dict[str, Any]]]:
    """``method`` spending the whole budget; ``sparse``: aiming at the plan's sparsity."""
    return lambda p: [{method: {**({"sparsity": p.sparsity} if sparse else {}), **opts, **p.train()}}]


def _dns(p: Plan) -> list[dict[str, Any]]:
    stop = max(1, round(0.875 * p.steps))  # masks freeze for the last 1/8 of the run (bench/dns_mnist.py)
    return [{"dns": {**p.train(), "iter_stop": {"conv": stop, "fc": stop}}}]


def _gradual(p: Plan) -> list[dict[str, Any]]:
    end = max(1, round(0.75 * p.steps))  # Zhu & Gupta: prune over the first 3/4, recover in the rest
    return [{"gradual": {**p.train(), "target": p.sparsity, "end": end, "every": max(1, end // 10)}}]


# name -> (family, stages of a plan, what it is). Methods that are stages of other pipelines rather than
# compressors of their own (encode, finetune, distill) and distort (a robustness experiment that keeps float
# weights) appear inside entries, not as rows.
SUITE: dict[str, tuple[str, Callable[[Plan], list[dict[str, Any]]]]] = {
    "magnitude": ("pruning", _trained("magnitude", sparse=True, rounds=1)),
    "magnitude_global": ("pruning", _trained("magnitude", sparse=True, rounds=1, scope="global")),
    "quality": ("pruning", _trained("quality", rounds=1)),
    "gradual": ("pruning", _gradual),
    "dns": ("pruning", _dns),
    "autoprune": ("pruning", _trained("autoprune")),
    "l1": ("pruning", _trained("l1")),
    "biased_decay": ("pruning", _trained("biased_decay", sparse=True)),
    "obd": ("second order", _pruned_ft("obd", num_grads=500)),
    "diag_fisher": ("second order", _pruned_ft("diag_fisher", num_grads=500)),
    "woodfisher": ("second order", _pruned_ft("woodfisher", num_grads=500)),
    "woodtaylor": ("second order", _pruned_ft("woodtaylor", num_grads=500)),
    "kfac": ("second order", _pruned_ft("kfac", num_grads=500)),
    "obs": ("second order", _pruned_ft("obs", num_grads=500)),
    "l1_filters": ("structured", _oneshot_ft("l1_filters", fraction=0.5)),
    "ssl": ("structured", _trained("ssl")),
    "slimming": ("structured", _trained("slimming", fraction=0.5)),
    "datafree": ("structured", _oneshot_ft("datafree", fraction=0.5)),
    "lowrank": ("low rank", _trained("lowrank", params=0.25)),
    "separable": ("low rank", _trained("separable")),
    "kmeans": ("quantization", _oneshot_ft("kmeans", _CODEBOOK)),
    "hessian_kmeans": ("quantization", _oneshot_ft("hessian_kmeans", _CODEBOOK, num_grads=500)),
    "int8": ("quantization", lambda p: [{"int8": {}}]),
    "qat": ("quantization", _trained("qat")),
    "fixed_point": ("quantization", _trained("fixed_point")),
    "pq": ("quantization", _oneshot_ft("pq", _CODEBOOK)),
    "binaryconnect": ("binary", _trained("binaryconnect")),
    "bnn": ("binary", _trained("bnn")),
    "xnor": ("binary", _trained("xnor")),
    "lab": ("binary", _trained("lab")),
    "fewmult": ("binary", _trained("fewmult")),
    "hwgq": ("binary", _trained("hwgq")),
    "hashednets": ("sharing", _trained("hashednets")),
    "soft_sharing": ("sharing", _trained("soft_sharing")),
    "deep_compression": ("pipeline", lambda p: [
        {"magnitude": {"sparsity": p.sparsity, "rounds": 1, **p.train(0.5)}}, {"kmeans": {}},
        _finetune(p, 0.5, **_CODEBOOK)]),
    "magnitude_distill": ("pipeline", lambda p: [
        {"magnitude": {"sparsity": p.sparsity, "rounds": 1, "epochs": 0}}, {"distill": p.train()}]),
}
NOT_IN_SUITE = {"encode": "the file-writing stage of every entry", "finetune": "the fine-tuning stage of entries",
                "distill": "the fine-tuning stage of magnitude_distill",
                "distort": "a robustness experiment: trains float weights under distortion, compresses nothing"}


def _stage_steps(stages: Sequence[dict[str, Any]], steps_per_epoch: int) -> int:
    """Optimizer steps a pipeline's stages are set to take (epochs x steps per epoch, capped by max_steps)."""
    total = 0
    for st in stages:
        (_, opts), = st.items()
        if isinstance(opts, dict) and int(opts.get("epochs") or 0) > 0:
            n = int(opts["epochs"]) * steps_per_epoch
            total += min(n, int(opts["max_steps"])) if opts.get("max_steps") else n
    return total


def suite_entries(plan: Plan, names: Sequence[str] | None = None) -> list[Entry]:
    """The built-in entries named (default: all of :data:`SUITE`), with ``plan``'s budget filled in."""
    names = list(SUITE) if names is None else list(names)
    bad = [n for n in names if n not in SUITE]
    if bad:
        hint = "".join(f" ({n!r} is {NOT_IN_SUITE[n]})" for n in bad if n in NOT_IN_SUITE)
        raise ValueError(f"compare: unknown method(s) {', '.join(map(repr, bad))}{hint}; valid: "
                         f"{', '.join(SUITE)}.")
    out = []
    for n in names:
        family, make = SUITE[n]
        stages = make(plan)
        out.append(Entry(n, family, stages, _stage_steps(stages, plan.steps_per_epoch)))
    return out


def read_pipelines(path: str | os.PathLike[str], plan: Plan) -> list[Entry]:
    """Entries from a YAML file ``{pipelines: {name: [stages...]}}`` (stages as in a recipe). A stage option
    ``epochs: budget`` (or ``budget: 0.5``) takes the plan's training budget (or that fraction of it)."""
    from .recipes import load_yaml

    raw = load_yaml(path, "compare: pipelines")
    pipes = raw.get("pipelines") if isinstance(raw, dict) else None
    if not isinstance(pipes, dict) or not pipes:
        raise ValueError(f"compare: {str(path)!r} must hold 'pipelines: {{name: [stages...]}}'; got {raw!r:.80}.")
    out = []
    for name, stages in pipes.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", name):
            raise ValueError(f"compare: pipeline name {name!r} must be 1-64 letters, digits or _.+- characters.")
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"compare: pipeline {name!r} must be a non-empty list of stages; got {stages!r:.80}.")
        filled = []
        for st in stages:
            if isinstance(st, dict) and len(st) == 1:
                (method, opts), = st.items()
                opts = dict(opts or {}) if isinstance(opts, dict) else opts
                if isinstance(opts, dict):
                    frac = opts.pop("budget", None)
                    if opts.get("epochs") == "budget":
                        del opts["epochs"]
                        frac = 1.0
                    if frac is not None:
                        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                            raise ValueError(f"compare: pipeline {name!r}, {method}: budget must be in (0, 1]; "
                                             f"got {frac!r}.")
                        opts.update(plan.train(float(frac)))
                st = {method: opts}
            filled.append(st)
        out.append(Entry(name, "pipeline", filled, _stage_steps(filled, plan.steps_per_epoch)))
    return out


def parse_budget(text: str) -> float:
    """``"20m"``, ``"90s"``, ``"1h"``, ``"1h30m"`` or a number of seconds -> seconds."""
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        sec = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", t).strip():
            raise ValueError(f"--budget takes a duration like 20m, 90s, 1h or 1h30m; got {text!r}.")
        sec = sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)
    if sec <= 0:
        raise ValueError(f"--budget must be positive; got {text!r}.")
    return sec


def plan_budget(model: nn.Module, data: Any, budget_s: float, n_entries: int, *, sparsity: float = 0.9,
                batch_size: int = 64, train_share: float = 0.5, probe_steps: int = 40, seed: int = 0) -> Plan:
    """Time ``probe_steps`` steps of plain training on a copy of ``model`` and give each of ``n_entries`` the
    same number of steps, so that training takes about ``train_share`` of ``budget_s`` (at least 10 steps)."""
    from .train import TrainConfig, train

    spe = Plan.epoch_steps(data, batch_size)
    probe = copy.deepcopy(model)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        train(probe, data, TrainConfig(epochs=1, batch_size=batch_size, max_steps=n, seed=seed))
        return time.perf_counter() - t0

    timed(2)  # warm-up: the first steps pay for allocation
    # a training call has a fixed cost (data set-up, the validation pass at the end): the difference of two
    # probes is the cost of the steps alone
    step_s = max((timed(probe_steps + 10) - timed(10)) / probe_steps, 1e-5)
    steps = max(10, int(train_share * budget_s / max(n_entries, 1) / step_s))
    log.info("compare: %.1f ms per training step; %d steps (%.2f epochs) per entry", 1e3 * step_s, steps,
             steps / spe)
    return Plan(steps=steps, steps_per_epoch=spe, sparsity=sparsity, batch_size=batch_size)


def resumable_plan(out_dir: str | os.PathLike[str], settings: dict[str, Any], make: Callable[[], Plan]) -> Plan:
    """The plan stored in ``OUT/plan.json`` when it was made for the same ``settings`` (input, budget, entries,
    ...), else ``make()`` (stored). Timing steps again on resume would give a slightly different step count and
    so different entries: a resumed comparison must keep the budget it started with."""
    from dataclasses import asdict

    f = Path(out_dir) / "plan.json"
    settings = json.loads(json.dumps(settings))  # as JSON would give it back
    if f.is_file():
        try:
            stored = json.loads(f.read_text())
            if stored.get("settings") == settings:
                return Plan(**stored["plan"])
        except (OSError, ValueError, TypeError):
            pass
    plan = make()
    f.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(f, "w") as fh:
        json.dump({"settings": settings, "plan": asdict(plan)}, fh, indent=2)
    return plan


def input_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of the input model file: a resumed comparison re-runs nothing only for the same input."""
    return _sha256(Path(path))


def layer_kept(model: nn.Module, dense: nn.Module) -> dict[str, float]:
    """% of each dense Linear/Conv layer's weights that ``model`` keeps as nonzeros: a layer replaced by factors
    (``fc1`` -> ``fc1.0``, ``fc1.1``) or shrunk by structured pruning counts its own modules' nonzeros."""
    mods = _weight_layers(model)
    return {name: 100.0 * sum(int(torch.count_nonzero(x.weight.detach())) for n, x in mods.items()
                              if n == name or n.startswith(name + ".")) / m.weight.numel()
            for name, m in _weight_layers(dense).items()}


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The named modules holding a weight matrix or kernel (Linear, Conv, factor layers), the root excluded."""
    return {n: m for n, m in model.named_modules()
            if n and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# The papers' own MNIST figures, for the models the papers used (error %, and the compression they report:
# "nonzero" = dense weights / nonzero weights, "bytes" = dense file / compressed file). The papers' dense models
# differ from the user's; their points show where each paper landed, not a target for this run's budget.
PAPER_POINTS: dict[str, list[dict[str, Any]]] = {
    "lenet5": [
        {"paper": "Han et al. 2015 (magnitude)", "error_pct": 0.77, "compression_nonzero": 12.0},
        {"paper": "Guo et al. 2016 (DNS)", "error_pct": 0.91, "compression_nonzero": 108.0},
        {"paper": "Han et al. 2016 (Deep Compression)", "error_pct": 0.74, "compression_bytes": 39.0},
        {"paper": "Ullrich et al. 2017 (soft sharing)", "error_pct": 0.97, "compression_bytes": 162.0},
    ],
    "lenet300": [
        {"paper": "Han et al. 2015 (magnitude)", "error_pct": 1.59, "compression_nonzero": 12.0},
        {"paper": "Guo et al. 2016 (DNS)", "error_pct": 1.99, "compression_nonzero": 56.0},
        {"paper": "Han et al. 2016 (Deep Compression)", "error_pct": 1.58, "compression_bytes": 40.0},
        {"paper": "Ullrich et al. 2017 (soft sharing)", "error_pct": 1.94, "compression_bytes": 64.0},
    ],
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _measure(model: nn.Module, dense: nn.Module, data: Any, path: Path, batches: Sequence[int],
             threads: int | None, repeats: int) -> dict[str, Any]:
    from .report import summarize

    s = summarize(model, data.input_shape, data=data, file_path=path, batches=batches, threads=threads,
                  repeats=repeats, reference=dense)
    s["layer_kept_pct"] = layer_kept(model, dense)
    # the one counting rule of every table: Linear/Conv weights only, biases reported apart
    w = {n: m.weight.numel() for n, m in _weight_layers(dense).items()}
    nz = sum(s["layer_kept_pct"][n] / 100 * w[n] for n in w)
    s.update(weights=sum(w.values()), weights_nonzero=round(nz), compression_weights=sum(w.values()) / max(nz, 1))
    return s


def _run_entry(entry: Entry, pipe: Any, dense: nn.Module, data: Any, out: Path, meta: dict[str, Any],
               batches: Sequence[int], threads: int | None, repeats: int, progress: bool) -> dict[str, Any]:
    from .runtime import load_compressed

    path = out / "files" / f"{entry.name}.nsz"
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    runs = pipe.run(model, data, progress=progress)
    wall = time.perf_counter() - t0
    from .models import arch_of

    arch = dict(arch_of(model) or {}) or None  # as the stages left it (factorized or shrunk layers)
    if arch is not None and "input_shape" not in arch:
        arch["input_shape"] = list(data.input_shape)
    pipe.save(model, path, meta={**meta, "compare_entry": entry.name}, arch=arch)
    # measured as a user gets it: the file, read back (a model with no recorded architecture is rebuilt from
    # a copy of the dense input, which the file's recorded sizes and factors reshape)
    rebuildable = bool(arch and (arch.get("name") or arch.get("factory")))
    back = load_compressed(path, None if rebuildable else copy.deepcopy(dense), trust_code=True)
    s = _measure(back, dense, data, path, batches, threads, repeats)
    return {"status": "ok", "wall_s": wall, "stage_seconds": [r["seconds"] for r in runs],
            "file": f"files/{entry.name}.nsz", **s}


def compare(model: nn.Module, data: Any, out_dir: str | os.PathLike[str], *, entries: Sequence[Entry],
            plan: Plan, input_file: str | os.PathLike[str] | None = None, data_name: str = "",
            model_name: str = "", seed: int = 0, batches: Sequence[int] = (1, 256), threads: int | None = None,
            repeats: int = 30, budget_s: float | None = None, command: str = "", fingerprint: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run every entry on a copy of ``model`` (trained, dense) and measure each result; write ``OUT/runs``,
    ``OUT/files``, ``OUT/results.json`` and ``OUT/index.html``. Returns the results dict.

    Entries already in ``OUT/runs`` with the same settings (stages, input model, data, seed, measurement) are
    not run again (``fingerprint`` identifies the input; default: the sha256 of ``input_file``, else of the
    weights). A failing entry is recorded with its error and the comparison goes on; Ctrl-C stops it
    (the finished entries are kept)."""
    from .pipeline import Pipeline

    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "files").mkdir(exist_ok=True)
    dense = copy.deepcopy(model).eval()
    fingerprint = fingerprint or (_sha256(Path(input_file)) if input_file else _state_hash(dense))
    common = {"input": fingerprint, "data": data_name, "seed": seed, "batches": list(batches), "threads": threads,
              "repeats": repeats}
    t_start = time.perf_counter()

    def cached(name: str, key: str) -> dict[str, Any] | None:
        f = out / "runs" / f"{name}.json"
        if not f.is_file():
            return None
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        if r.get("key") != key or (r.get("file") and not (out / r["file"]).is_file()):
            return None
        return r

    def write_run(name: str, r: dict[str, Any]) -> None:
        with atomic_write(out / "runs" / f"{name}.json", "w") as f:
            json.dump(r, f, indent=2)

    key = hashlib.sha256(json.dumps({"dense": True, **common}, sort_keys=True).encode()).hexdigest()
    ref = cached("_dense", key)
    if ref is None:
        progress_log.info("compare: measuring the dense input model")
        ref = _measure(dense, dense, data, Path(input_file) if input_file else _dense_file(dense, out),
                       batches, threads, repeats)
        ref.update(key=key, status="ok", name="dense (input)", family="dense", wall_s=0.0, train_steps=0,
                   file=None)
        write_run("_dense", ref)
    rows = []
    for i, entry in enumerate(entries, 1):
        # every option of every stage, defaults included: a changed default runs the entry again
        pipe = Pipeline.from_spec(entry.stages, defaults={"seed": seed}, source=entry.name)
        key = hashlib.sha256(json.dumps({"stages": pipe.to_dict()["stages"], **common}, sort_keys=True).encode()
                             ).hexdigest()
        r = cached(entry.name, key)
        if r is not None:
            progress_log.info("[%d/%d] %s: done before (%s), kept", i, len(entries), entry.name, r["status"])
        else:
            progress_log.info("[%d/%d] %s: %s", i, len(entries), entry.name,
                              " -> ".join(next(iter(s)) for s in entry.stages))
            t0 = time.perf_counter()
            meta = {"data": data_name, "seed": seed}
            try:
                torch.manual_seed(seed)
                r = _run_entry(entry, pipe, dense, data, out, meta, batches, threads, repeats, progress)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one method failing on this model must not stop the others
                r = {"status": "failed", "error": _first_line(e), "wall_s": time.perf_counter() - t0}
                log.debug("compare: %s failed", entry.name, exc_info=True)
            r["total_s"] = time.perf_counter() - t0  # compressing, writing, reading back and measuring
            r.update(key=key, name=entry.name, family=entry.family, stages=entry.stages, train_steps=entry.train_steps)
            write_run(entry.name, r)
            if r["status"] == "ok":
                score = (f"perplexity {r['test_perplexity']:.3f}" if "test_perplexity" in r
                         else f"error {r['test_error_pct']:.2f}%")
                progress_log.info("[%d/%d] %s: %s, %s bytes (%.1fx), %.1f s", i, len(entries), entry.name, score,
                                  f"{r['file_bytes']:,}", r["compression_bytes"], r["wall_s"])
            else:
                progress_log.info("[%d/%d] %s: FAILED: %s", i, len(entries), entry.name, r["error"])
        rows.append(r)
    from . import __version__

    paper = PAPER_POINTS.get(model_name, []) if data_name == "mnist" else []
    results = {
        "model": model_name, "data": data_name, "metric": getattr(data, "metric", "accuracy"), "seed": seed,
        "command": command, "version": __version__,
        "machine": _machine(threads), "date": time.strftime("%Y-%m-%d %H:%M"),
        "budget_s": budget_s, "plan": {"steps": plan.steps, "steps_per_epoch": plan.steps_per_epoch,
                                       "epochs": plan.steps / plan.steps_per_epoch, "sparsity": plan.sparsity,
                                       "batch_size": plan.batch_size},
        "wall_s_this_run": time.perf_counter() - t_start,
        "total_s": sum(float(r.get("total_s") or 0) for r in rows),
        "dense": ref, "rows": rows, "paper_points": paper,
        "not_in_suite": NOT_IN_SUITE,
    }
    with atomic_write(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    from .compare_html import write_report

    write_report(results, out / "index.html")
    return results


def plan_entries(plan: Plan, methods: Sequence[str] | None = None,
                 pipelines: str | os.PathLike[str] | None = None) -> list[Entry]:
    """The entries to compare: the built-in ones named in ``methods`` (all of them when neither ``methods`` nor
    ``pipelines`` is given) and the YAML ``pipelines``. Raises ValueError on an unknown name, a bad file or a
    name used twice."""
    entries = [] if methods is None and pipelines is not None else suite_entries(plan, methods)
    extra = read_pipelines(pipelines, plan) if pipelines is not None else []
    dup = sorted({e.name for e in entries} & {e.name for e in extra})
    if dup:
        raise ValueError(f"compare: the pipelines file names {dup}, which are also built-in entries; rename them.")
    return entries + extra


def run_comparison(model: nn.Module, data: Any, out_dir: str | os.PathLike[str], *,
                   methods: Sequence[str] | None = None, pipelines: str | os.PathLike[str] | None = None,
                   budget: str | float = "20m", steps: int | None = None, sparsity: float = 0.9, seed: int = 0,
                   threads: int | None = None,
                   repeats: int = 30, input_file: str | os.PathLike[str] | None = None, data_name: str = "",
                   model_name: str = "", command: str = "", progress: bool = True) -> dict[str, Any]:
    """Compare the methods on ``model`` (trained, float weights) and ``data``: check every entry, plan the
    budget (or reuse the plan of an interrupted run in ``out_dir``), run :func:`compare`. ``budget``: seconds
    or a duration such as ``"20m"``; ``steps`` fixes the training steps of every entry instead (no timing: the
    same steps, hence the same weights, on any machine). Returns the results dict of ``out_dir/results.json``."""
    from .pipeline import Pipeline, weight_form

    budget_s = parse_budget(budget) if isinstance(budget, str) else float(budget)
    if not budget_s > 0:
        raise ValueError(f"compare: budget must be positive; got {budget!r}.")
    probe = plan_entries(Plan(steps=1, steps_per_epoch=1, sparsity=sparsity), methods, pipelines)
    form = weight_form(model)
    if form != "float":
        raise ValueError(f"compare starts from float weights; the model holds {form} weights.")
    for e in probe:  # an entry that cannot run in this order is refused before anything runs
        Pipeline.from_spec(e.stages, source=e.name).check(has_data=True, start_form="float")
    fingerprint = input_fingerprint(input_file) if input_file else _state_hash(model)
    settings = {"input": fingerprint, "data": data_name, "budget_s": budget_s, "entries": len(probe),
                "sparsity": sparsity, "seed": seed}
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"compare: steps must be a positive integer; got {steps!r}.")
        plan = Plan(steps=steps, steps_per_epoch=Plan.epoch_steps(data), sparsity=sparsity)
    else:
        plan = resumable_plan(out_dir, settings, lambda: plan_budget(model, data, budget_s, len(probe),
                                                                     sparsity=sparsity, seed=seed))
    return compare(model, data, out_dir, entries=plan_entries(plan, methods, pipelines), plan=plan,
                   input_file=input_file, data_name=data_name, model_name=model_name, seed=seed, threads=threads,
                   repeats=repeats, budget_s=budget_s, command=command, fingerprint=fingerprint, progress=progress)


def _state_hash(model: nn.Module) -> str:
    return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())
                          ).hexdigest()


def _dense_file(dense: nn.Module, out: Path) -> Path:
    from .modelfile import save_model

    path = out / "files" / "_dense.safetensors"
    save_model(dense, path)
    return path


def _machine(threads: int | None) -> dict[str, Any]:
    from .stats import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__}
