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

from ._validation import atomic_write, sha256_file
from .compare_html import pareto_front, write_report
from .plan import FAMILIES, Plan, Stages
from .progress import log as progress_log
from .stats import chance_accuracy

__all__ = ["suite", "not_in_suite", "Entry", "Plan", "parse_budget", "plan_budget", "resumable_plan",
           "input_fingerprint", "suite_entries", "read_pipelines", "plan_entries", "run_comparison", "compare",
           "layer_kept", "pareto_front", "PAPER_POINTS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: a name, a family (for the plots' colours) and its pipeline stages."""

    name: str
    family: str
    stages: list[dict[str, Any]]
    train_steps: int = 0


def suite() -> dict[str, tuple[str, Stages]]:
    """Every built-in entry: name -> (family, stages of a plan), from the methods' own declarations
    (``registry.register(..., compare=...)``), in the order of :data:`~netsurgeon.plan.FAMILIES`."""
    from .pipeline import methods

    rows = [(FAMILIES.index(family), i, name, family, make) for i, m in enumerate(methods().values())
            for name, (family, make) in m.compare.items()]
    return {name: (family, make) for _, _, name, family, make in sorted(rows, key=lambda r: (r[0], r[1]))}


def not_in_suite() -> dict[str, str]:
    """Registered methods without an entry of their own, and why (they run inside other entries)."""
    from .pipeline import methods

    return {m.name: m.not_compared for m in methods().values() if m.not_compared}


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
    """The built-in entries named (default: all of :func:`suite`), with ``plan``'s budget filled in."""
    entries, skipped = suite(), not_in_suite()
    names = list(entries) if names is None else list(names)
    bad = [n for n in names if n not in entries]
    if bad:
        hint = "".join(f" ({n!r} is {skipped[n]})" for n in bad if n in skipped)
        raise ValueError(f"compare: unknown method(s) {', '.join(map(repr, bad))}{hint}; valid: "
                         f"{', '.join(entries)}.")
    out = []
    for n in names:
        family, make = entries[n]
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
                batch_size: int = 64, train_share: float = 0.5, probe_steps: int = 40, seed: int = 0,
                device: Any = None) -> Plan:
    """Time ``probe_steps`` steps of plain training on a copy of ``model`` and give each of ``n_entries`` the
    same number of steps, so that training takes about ``train_share`` of ``budget_s`` (at least 10 steps)."""
    from .train import TrainConfig, train

    spe = Plan.epoch_steps(data, batch_size)
    probe = copy.deepcopy(model)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        train(probe, data, TrainConfig(epochs=1, batch_size=batch_size, max_steps=n, seed=seed), device=device)
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
    return sha256_file(path)


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
               batches: Sequence[int], threads: int | None, repeats: int, progress: bool,
               device: Any = None) -> dict[str, Any]:
    from .compress import compress_model
    from .modelfile import load_compressed

    path = out / "files" / f"{entry.name}.nsz"
    result = compress_model(copy.deepcopy(dense), pipe, data, path, meta={**meta, "compare_entry": entry.name},
                            progress=progress, evaluate_test=False, device=device)
    runs = result.runs
    wall = sum(r["seconds"] for r in runs)
    arch = result.file.header.get("arch") if result.file is not None else None  # as the stages left it
    # measured as a user gets it: the file, read back (a model with no recorded architecture is rebuilt from
    # a copy of the dense input, which the file's recorded sizes and factors reshape)
    rebuildable = bool(arch and (arch.get("name") or arch.get("factory")))
    back = load_compressed(path, None if rebuildable else copy.deepcopy(dense), trust_code=True)
    s = _measure(back, dense, data, path, batches, threads, repeats)
    skipped = {layer: why for r in runs for layer, why in (r.get("skipped") or {}).items()}
    if skipped:  # a row that left layers as they were says so (obc on wide layers: 1.0x is not a failure to prune)
        log.warning("compare: %s left %d layer(s) as they were: %s", entry.name, len(skipped),
                    "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    return {"status": "ok", "wall_s": wall, "stage_seconds": [r["seconds"] for r in runs],
            "file": f"files/{entry.name}.nsz", **({"skipped": skipped} if skipped else {}), **s}


def compare(model: nn.Module, data: Any, out_dir: str | os.PathLike[str], *, entries: Sequence[Entry],
            plan: Plan, input_file: str | os.PathLike[str] | None = None, data_name: str = "",
            model_name: str = "", seed: int = 0, batches: Sequence[int] = (1, 256), threads: int | None = None,
            repeats: int = 30, budget_s: float | None = None, command: str = "", fingerprint: str | None = None,
            progress: bool = True, device: Any = None) -> dict[str, Any]:
    """Run every entry on a copy of ``model`` (trained, dense) and measure each result; write ``OUT/runs``,
    ``OUT/files``, ``OUT/results.json`` and ``OUT/index.html``. Returns the results dict.

    Entries already in ``OUT/runs`` with the same settings (stages, input model, data, seed, measurement) are
    not run again (``fingerprint`` identifies the input; default: the sha256 of ``input_file``, else of the
    weights). A failing entry is recorded with its error and the comparison goes on; Ctrl-C stops it
    (the finished entries are kept). ``device`` (``cpu``, ``cuda``, ``cuda:N``): where the entries' stages run;
    every file is read back and measured on the CPU, the runtime's target."""
    from .devices import parse_device
    from .pipeline import Pipeline

    parse_device(device, "device")

    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "files").mkdir(exist_ok=True)
    dense = copy.deepcopy(model).eval()
    fingerprint = fingerprint or (sha256_file(input_file) if input_file else _state_hash(dense))
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
    chance = chance_accuracy(data)
    rows: list[dict[str, Any]] = []

    def publish(complete: bool) -> dict[str, Any]:
        results = _results(rows, ref, entries, plan, chance=chance, metric=getattr(data, "metric", "accuracy"),
                           model_name=model_name, data_name=data_name,
                           seed=seed, command=command, threads=threads, budget_s=budget_s,
                           wall_s=time.perf_counter() - t_start, complete=complete, batches=batches)
        with atomic_write(out / "results.json", "w") as f:
            json.dump(results, f, indent=2)
        write_report(results, out / "index.html")  # after every entry: an interrupted run still has its page
        return results

    for i, entry in enumerate(entries, 1):
        # every option of every stage, defaults included: a changed default runs the entry again
        pipe = Pipeline.from_spec(entry.stages, defaults={"seed": seed}, source=entry.name)
        key = hashlib.sha256(json.dumps({"stages": pipe.to_dict()["stages"], **common}, sort_keys=True).encode()
                             ).hexdigest()
        r = cached(entry.name, key)
        if r is not None:
            progress_log.info("[%d/%d] %s: done before (%s), kept", i, len(entries), entry.name, r["status"])
        else:
            r = _timed_entry(i, len(entries), entry, pipe, dense, data, out, {"data": data_name, "seed": seed},
                             batches, threads, repeats, progress, seed, device)
            r.update(key=key, name=entry.name, family=entry.family, stages=entry.stages, train_steps=entry.train_steps)
            write_run(entry.name, r)
        if r["status"] == "ok":
            r["collapsed"] = bool(chance is not None and 100 - r["test_error_pct"] <= 100 * chance + 2)
            if r["collapsed"]:
                log.warning("compare: %s ended at chance accuracy (%.2f%%; the most frequent class alone gives "
                            "%.2f%%): it is kept in the table but off the Pareto fronts", entry.name,
                            100 - r["test_error_pct"], 100 * chance)
        rows.append(r)
        publish(complete=False)
    results = publish(complete=True)
    if budget_s and results["wall_s_this_run"] > 1.1 * budget_s:
        log.warning("compare: the run took %.1f min of the %.1f min budget; the budget plans the training steps "
                    "(half of it), and statistics, writing and latency measurement took the rest (see the page)",
                    results["wall_s_this_run"] / 60, budget_s / 60)
    return results


def _timed_entry(i: int, n: int, entry: Entry, pipe: Any, dense: nn.Module, data: Any, out: Path,
                 meta: dict[str, Any], batches: Sequence[int], threads: int | None, repeats: int, progress: bool,
                 seed: int, device: Any = None) -> dict[str, Any]:
    """Run one entry; a failure becomes a row that says why (one method failing must not stop the others)."""
    progress_log.info("[%d/%d] %s: %s", i, n, entry.name, " -> ".join(next(iter(s)) for s in entry.stages))
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        r = _run_entry(entry, pipe, dense, data, out, meta, batches, threads, repeats, progress, device)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - reported in the row
        r = {"status": "failed", "error": _first_line(e), "wall_s": time.perf_counter() - t0}
        log.debug("compare: %s failed", entry.name, exc_info=True)
    r["total_s"] = time.perf_counter() - t0  # compressing, writing, reading back and measuring
    if r["status"] == "ok":
        score = (f"perplexity {r['test_perplexity']:.3f}" if "test_perplexity" in r
                 else f"error {r['test_error_pct']:.2f}%")
        progress_log.info("[%d/%d] %s: %s, %s bytes (%.1fx), %.1f s", i, n, entry.name, score,
                          f"{r['file_bytes']:,}", r["compression_bytes"], r["wall_s"])
    else:
        progress_log.info("[%d/%d] %s: FAILED: %s", i, n, entry.name, r["error"])
    return r


def _results(rows: list[dict[str, Any]], ref: dict[str, Any], entries: Sequence[Entry], plan: Plan, *,
             chance: float | None, metric: str, model_name: str, data_name: str, seed: int, command: str,
             threads: int | None, budget_s: float | None, wall_s: float, complete: bool,
             batches: Sequence[int] = (1, 256)) -> dict[str, Any]:
    from . import __version__

    done = {r.get("name") for r in rows}
    return {
        "model": model_name, "data": data_name, "metric": metric, "seed": seed, "command": command,
        "version": __version__,
        "machine": _machine(threads), "date": time.strftime("%Y-%m-%d %H:%M"),
        "budget_s": budget_s, "plan": {"steps": plan.steps, "steps_per_epoch": plan.steps_per_epoch,
                                       "epochs": plan.steps / plan.steps_per_epoch, "sparsity": plan.sparsity,
                                       "batch_size": plan.batch_size},
        "batches": list(batches),
        "wall_s_this_run": wall_s, "complete": complete, "pending": [e.name for e in entries if e.name not in done],
        "chance_accuracy": chance,
        "total_s": sum(float(r.get("total_s") or 0) for r in rows),
        "dense": ref, "rows": rows, "paper_points": PAPER_POINTS.get(model_name, []) if data_name == "mnist" else [],
        "not_in_suite": not_in_suite(),
    }


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
                   threads: int | None = None, batches: Sequence[int] = (1, 256),
                   repeats: int = 30, input_file: str | os.PathLike[str] | None = None, data_name: str = "",
                   model_name: str = "", command: str = "", progress: bool = True,
                   device: Any = None) -> dict[str, Any]:
    """Compare the methods on ``model`` (trained, float weights) and ``data``: check every entry, plan the
    budget (or reuse the plan of an interrupted run in ``out_dir``), run :func:`compare`. ``budget``: seconds
    or a duration such as ``"20m"``; ``steps`` fixes the training steps of every entry instead (no timing: the
    same steps, hence the same weights, on any machine). ``device``: where training and the methods run (the
    budget's steps are timed there too). ``batches``: the batch sizes latency is timed at (a language model: 1
    and 8, where 256 sequences would take long). Returns the results dict of ``out_dir/results.json``."""
    from .devices import parse_device
    from .forms import weight_form
    from .pipeline import Pipeline

    parse_device(device, "device")
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
                                                                     sparsity=sparsity, seed=seed, device=device))
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"compare: batches must be positive integers; got {batches!r}.")
    return compare(model, data, out_dir, entries=plan_entries(plan, methods, pipelines), plan=plan,
                   batches=tuple(batches),
                   input_file=input_file, data_name=data_name, model_name=model_name, seed=seed, threads=threads,
                   repeats=repeats, budget_s=budget_s, command=command, fingerprint=fingerprint, progress=progress,
                   device=device)


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
