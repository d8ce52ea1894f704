"""The seed papers' methods on a language model (issue 36, part 6): the byte-level GPT of bench/lm_train.py
(4 layers, width 256, 3.3M parameters, trained on the CPython standard library's source), compressed by each
method THROUGH THE PRODUCT (``ns.Pipeline`` stages, as a recipe or ``netsurgeon compress`` runs them) and judged
by test perplexity.

    python bench/lm_text.py [--steps 120] [--threads 1] [--quick] [--fresh]

Rows: dense; dense + the same fine-tuning (the control: every fine-tuned row gets the same data, steps and
optimizer); magnitude 50% + fine-tune (Han et al. 2015); DNS (Guo et al. 2016, trained for the same steps);
WoodFisher 50% one-shot + fine-tune (Singh & Alistarh 2020); k-means 4-bit sharing (Han et al. 2016); int8;
low rank (SVD, half the factorized weights) + fine-tune; attention heads 25% + fine-tune (Michel et al. 2019);
distillation into a 2-layer student (Hinton et al. 2015) for the same steps.

Evaluation: perplexity on a fixed subset of the test split (every ``--test-stride``-th sequence of 128 bytes;
the JSON records which) and hyper-parameters (the fine-tuning LR, WoodFisher's dampening) chosen on a fixed
subset of the validation split; the test subset is only evaluated. Fine-tuning draws its batches with seed 1
(the dense model was trained with seed 0's order: seed 1 shows mostly other sequences). Latency: the runtime
form of each row's file against the dense model, interleaved, at batch 1 and 8 (256 sequences of 128 tokens
take seconds per run on this machine), 1 thread.
Stages are cached in bench/.cache/lm_text/, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import netsurgeon as ns
from _common import CACHE, REPO, RESULTS, cached_json, content_key, machine, pyplot, rel, save_figure, write_result
from netsurgeon.modelfile import load_model

NAME = "lm_text"
DENSE_FILE = "bench/results/files/lm_gpt_dense.safetensors"
STAGE_CACHE = CACHE / NAME
BATCHES = (1, 8)
LRS = (5e-5, 2e-4)  # fine-tuning LR candidates, chosen on validation with the magnitude row
DAMPS = (1e-4, 1e-3)  # WoodFisher relative dampening candidates, chosen on validation (one-shot)

# What each paper reports for a language model, where it does (else null with a note)
PAPER = {
    "magnitude": None, "dns": None, "woodfisher": None, "kmeans": None, "int8": None, "lowrank": None,
    "heads": None, "distill": None,
}
PAPER_NOTE = ("none of the seed papers reports a byte-level language model: Han 2015/2016, Guo 2016 and Singh & "
              "Alistarh 2020 measure image classifiers, Denton 2014 and Hinton 2015 vision/speech, Michel et al. "
              "2019 report BLEU (WMT) and accuracy (MNLI) for head pruning; so paper_* columns are null")


def _sub(split: ns.data.Split, stride: int) -> ns.data.Split:
    return ns.data.Split(split.x[::stride], split.y[::stride])


def _ppl(model: torch.nn.Module, split: ns.data.Split) -> float:
    return float(ns.evaluate(model, split).perplexity)


def _dense() -> torch.nn.Module:
    """The checkpoint as every row starts from it; its record gains ``input_dtype: int64`` (token ids), which
    lm_train.py's file predates (a pipeline adds it from the data too)."""
    from netsurgeon.changes import arch_of, set_arch

    m = load_model(REPO / DENSE_FILE)[0]
    return set_arch(m, {**arch_of(m), "input_dtype": "int64"})


def _biases(model: torch.nn.Module) -> tuple[int, int]:
    bs = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return sum(b.numel() for b in bs), sum(int((b != 0).sum()) for b in bs)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        data = ns.data.stdlib_text(seq_len=128)
        self.full = data
        self.val = _sub(data.val, args.val_stride)
        self.test = _sub(data.test, args.test_stride)
        # what the stages see: the whole training split; validation = the selection subset (training ends
        # within its first epoch, so it is not read there); no test split (never read by a stage)
        self.data = dataclasses.replace(data, val=self.val, test=self.test)
        self.q = "_quick" if args.quick else ""
        self.out_dir = STAGE_CACHE if args.quick else RESULTS / "files"
        self.dense_key = content_key(DENSE_FILE)
        self.missing: list[str] = []

    def train_cfg(self, lr: float, steps: int | None = None) -> dict[str, Any]:
        return {"epochs": 1, "max_steps": steps or self.args.steps, "batch_size": self.args.batch_size,
                "optimizer": "adam", "lr": lr, "weight_decay": 0.0, "schedule": "cosine", "seed": 1}

    def run(self, tag: str, stages: list[dict], *, model: torch.nn.Module | None = None,
            teacher: torch.nn.Module | None = None, note: str = "") -> dict[str, Any]:
        """Run ``stages`` through ns.Pipeline on the dense model (or ``model``), save the file, score it on the
        validation subset (the file as it loads again): cached by its stages and starting point."""

        def compute() -> dict[str, Any]:
            m = model if model is not None else _dense()
            torch.manual_seed(0)
            t0 = time.perf_counter()
            pipe = ns.Pipeline.from_spec(stages)
            runs = pipe.run(m, self.data, teacher=teacher, progress=True)
            wall = time.perf_counter() - t0
            f = self.out_dir / f"{NAME}_{tag}{self.q}.nsz"
            pipe.save(m, f, runs=runs, meta={"benchmark": NAME, "data": "stdlib", "metric": "perplexity"})
            back = ns.load_compressed(f)
            r = {"tag": tag, "stages": pipe.to_dict()["stages"], "wall_s": wall, "file": rel(f) if not self.q
                 else str(f), "val_perplexity": _ppl(back, self.val),
                 "stage_seconds": [x["seconds"] for x in runs],
                 "skipped": {x["method"]: sorted(x["skipped"]) for x in runs if x.get("skipped")},
                 "reports": [_jsonable(x["report"]) for x in runs]}
            if note:
                r["note"] = note
            logging.info("%s: val perplexity %.4f (%.0f s)", tag, r["val_perplexity"], wall)
            return r

        source = {"stages": stages, "dense": self.dense_key, "val_stride": self.args.val_stride, "extra": note}
        if self.args.only_cached and not (CACHE / f"{NAME}/{tag}{self.q}_{content_key(source)}.json").is_file():
            logging.warning("%s: not run yet (--only-cached): left out", tag)
            self.missing.append(tag)
            return None
        return cached_json(f"{NAME}/{tag}{self.q}", compute, self.args.fresh, source=source)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def dns_c_rate(model: torch.nn.Module, kept: float) -> dict[str, float]:
    """c per DNS layer (the Linear layers DNS covers) such that |w| >= mu + c*sigma first keeps ``kept`` of it."""
    from netsurgeon.pruning.dns import calibrate_c_rate

    out = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:  # out_proj (NonDynamicallyQuantizableLinear) is attention: DNS leaves it
            out[name] = calibrate_c_rate([m.weight] + ([m.bias] if m.bias is not None else []), kept)
    return out


def student_from(teacher: torch.nn.Module, layers: tuple[int, ...]) -> torch.nn.Module:
    """A GPT with ``len(layers)`` blocks, initialized from the teacher's embedding, positions, head and the given
    blocks (layer dropping, as DistilBERT initializes its student from every other layer)."""
    arch = ns.changes.arch_of(teacher) or {}
    kwargs = {**(arch.get("kwargs") or {}), "n_layer": len(layers)}
    s = ns.build_model("gpt", (128,), 256, **{k: v for k, v in kwargs.items() if k in ("width", "n_head", "n_layer",
                                                                                           "dropout")})
    state = teacher.state_dict()
    new = {}
    for k in s.state_dict():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            new[k] = state[f"blocks.{layers[int(i)]}.{rest}"]
        else:
            new[k] = state[k]
    s.load_state_dict(new)
    return s


def measure(b: Bench, r: dict[str, Any], reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """Test perplexity (test subset), nonzeros, bytes, FLOPs and runtime latency of a row's file."""
    from netsurgeon.report import summarize

    f = REPO / r["file"]
    m = ns.load_compressed(f)
    data = dataclasses.replace(b.data, test=b.test)
    s = summarize(m, (128,), data=data, file_path=f, batches=BATCHES, threads=1, repeats=b.args.repeats,
                  reference=reference)
    nb, nbz = _biases(m)
    import hashlib

    return {"file_sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
            **{k: v for k, v in s.items() if k not in ("test_accuracy", "test_error_pct", "metric")},
            "test_next_byte_accuracy": s.get("test_accuracy"), "biases": nb, "biases_nonzero": nbz}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="fine-tuning / training steps of every trained row")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-stride", type=int, default=4, help="test subset: every N-th 128-byte sequence")
    ap.add_argument("--val-stride", type=int, default=8, help="validation subset: every N-th sequence")
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per latency measurement")
    ap.add_argument("--rows", nargs="+", default=None,
                    help="only run (and cache) these rows' stages, measure nothing, write nothing: two processes "
                         "can share the stages; a run without --rows then measures every row from the caches")
    ap.add_argument("--only-cached", action="store_true",
                    help="leave out rows whose stages have not finished (recorded under missing_rows)")
    ap.add_argument("--measure", action="store_true", help="with --rows: also measure those rows (cached)")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS), help="fine-tuning LR candidates")
    ap.add_argument("--fresh", action="store_true", help="ignore cached stages")
    ap.add_argument("--quick", action="store_true", help="3 steps, strides 64 (checks the script; no result)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.steps, args.test_stride, args.val_stride, args.repeats = 3, 64, 64, 5
    torch.set_num_threads(args.threads)
    facts = machine()
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    STAGE_CACHE.mkdir(parents=True, exist_ok=True)
    b = Bench(args)
    want = set(args.rows or [])

    def on(row: str) -> bool:
        return not want or row in want

    dense = _dense()
    dense_val = cached_json(f"{NAME}/dense_val_s{args.val_stride}", lambda: {"val_perplexity": _ppl(dense, b.val)},
                            args.fresh, source=b.dense_key)["val_perplexity"]
    logging.info("dense: val perplexity %.4f on %d sequences", dense_val, len(b.val))
    rows: dict[str, dict[str, Any]] = {}
    choices: dict[str, Any] = {}

    # -- the fine-tuning LR, chosen on validation with magnitude 50% + fine-tune ------------------------------
    lrs = tuple(args.lrs)
    ft_rows = {"magnitude", "dense_ft", "dns", "woodfisher", "lowrank", "heads", "distill"}
    if want and not want & ft_rows:  # only one-shot rows: no fine-tuning LR needed
        lrs = ()
    mag = {lr: b.run(f"magnitude50_ft_lr{lr:g}", [{"magnitude": {"sparsity": 0.5, "rounds": 1, "epochs": 0}},
                                                  {"finetune": b.train_cfg(lr)}]) for lr in lrs}
    lr = min(lrs, key=lambda x: mag[x]["val_perplexity"]) if lrs else args.lrs[0]
    choices["finetune_lr"] = {"candidates": list(lrs), "chosen": lr, "how": "lowest validation perplexity of "
                              "magnitude 50% + fine-tune; the same LR for every fine-tuned row",
                              "val_perplexity": {str(k): v["val_perplexity"] for k, v in mag.items()}}
    ft = b.train_cfg(lr)
    if lrs:
        rows["magnitude"] = mag[lr]

    rows["dense"] = {"tag": "dense", "file": None, "wall_s": 0.0, "val_perplexity": dense_val, "stages": []}
    if on("dense_ft"):
        rows["dense_ft"] = b.run("dense_ft", [{"finetune": ft}])
    if on("dns"):
        c = dns_c_rate(dense, 0.5)
        rows["dns"] = b.run("dns", [{"dns": {**ft, "c_rate": c, "iter_stop": int(args.steps * 7 / 8)}}],
                            note="c per layer calibrated so the first masks keep 50% of each Linear layer "
                                 "(dns_mnist's rule); masks freeze at 7/8 of the steps")
    if on("woodfisher") or on("woodfisher_oneshot"):
        def wf_stage(d: float) -> dict[str, Any]:
            return {"woodfisher": {"sparsity": 0.5, "num_grads": 64 if not args.quick else 4, "grad_batch": 4,
                                   "block_size": 128, "damp": d, "relative_damp": True, "seed": 0}}

        wf = {d: b.run(f"woodfisher50_d{d:g}", [wf_stage(d)]) for d in DAMPS}
        d = min(DAMPS, key=lambda x: wf[x]["val_perplexity"])
        choices["woodfisher_damp"] = {"candidates": list(DAMPS), "chosen": d, "relative": True,
                                      "how": "lowest validation perplexity one-shot (before fine-tuning)",
                                      "val_perplexity": {str(k): v["val_perplexity"] for k, v in wf.items()}}
        rows["woodfisher_oneshot"] = wf[d]
        if on("woodfisher"):
            rows["woodfisher"] = b.run("woodfisher50_ft", [wf_stage(d), {"finetune": ft}])
    if on("magnitude_oneshot"):
        rows["magnitude_oneshot"] = b.run("magnitude50", [{"magnitude": {"sparsity": 0.5, "rounds": 1,
                                                                         "epochs": 0}}])
    if on("kmeans"):
        rows["kmeans"] = b.run("kmeans4", [{"kmeans": {"bits": 4}}])
    if on("int8"):
        rows["int8"] = b.run("int8", [{"int8": {"per_channel": True}}])
    if on("lowrank"):
        rows["lowrank"] = b.run("lowrank50_ft", [{"lowrank": {"params": 0.5, "conv": "none"}}, {"finetune": ft}])
    if on("heads"):
        rows["heads"] = b.run("heads25_ft", [{"heads": {"fraction": 0.25, "importance": "taylor", "scope": "global",
                                                        "samples": 128, "seed": 0}}, {"finetune": ft}])
    if on("distill"):
        student = student_from(dense, (0, 2))
        choices["student"] = {"layers": 2, "init": "teacher's embedding, positions, head and blocks 0 and 2 "
                              "(every other layer, as DistilBERT)", "temperature": 2.0, "alpha": 0.5,
                              "how": "fixed a priori (no validation sweep: one training run fits the budget)"}
        rows["distill"] = b.run("distill2", [{"distill": {**ft, "temperature": 2.0, "alpha": 0.5}}],
                                model=student, teacher=copy.deepcopy(dense).eval(),
                                note="student 2 layers from teacher blocks 0,2")

    if want and not args.measure:
        return
    rows = {k: v for k, v in rows.items() if v is not None}
    # -- measure every row's file (test subset, sizes, latency), after all training -------------------------
    dense_file = b.out_dir / f"{NAME}_dense{b.q}.nsz"
    ns.save_compressed(dense, dense_file)  # float32 .nsz of the dense model: the bytes every row is compared to
    rows["dense"]["file"] = rel(dense_file) if not b.q else str(dense_file)
    measured = {}
    for key, r in rows.items():
        ref = _dense().eval() if key == "distill" else None
        measured[key] = cached_json(f"{NAME}/measure_{key}{b.q}", lambda r=r, ref=ref: measure(b, r, ref),
                                    args.fresh, source={"row": r, "test_stride": args.test_stride,
                                                        "batches": BATCHES})
        logging.info("%s: test perplexity %.4f", key, measured[key]["test_perplexity"])
    d0 = measured["dense"]
    if "distill" in measured:  # the student against the teacher: its weights and FLOPs are the compression
        s = measured["distill"]
        s["params_original"] = d0["params"]
        s["compression_nonzero"] = d0["params"] / max(s["nonzero"], 1)
        s["compression_bytes"] = d0["file_bytes"] / s["file_bytes"]
        s["flops_dense"] = d0["flops_dense"]

    labels = {
        "dense": "dense (float16 checkpoint in float32)",
        "dense_ft": f"dense + the same fine-tuning ({args.steps} steps, control)",
        "magnitude_oneshot": "magnitude 50% one-shot, no fine-tuning",
        "magnitude": f"magnitude 50% + fine-tune {args.steps} steps",
        "dns": f"DNS (c for 50% kept at start), {args.steps} steps",
        "woodfisher_oneshot": "WoodFisher 50% one-shot, no fine-tuning",
        "woodfisher": f"WoodFisher 50% one-shot + fine-tune {args.steps} steps",
        "kmeans": "k-means sharing 4-bit, no fine-tuning",
        "int8": "int8 per channel, no fine-tuning",
        "lowrank": f"low rank (SVD, 50% of factorized weights) + fine-tune {args.steps} steps",
        "heads": f"attention heads 25% removed (Taylor) + fine-tune {args.steps} steps",
        "distill": f"distilled into 2 layers (T=2), {args.steps} steps",
    }
    order = ["dense", "dense_ft", "magnitude_oneshot", "magnitude", "dns", "woodfisher_oneshot", "woodfisher",
             "kmeans", "int8", "lowrank", "heads", "distill"]
    rows = {k: rows[k] for k in sorted(rows, key=lambda k: order.index(k) if k in order else len(order))}
    table = []
    for key, r in rows.items():
        m = measured[key]
        table.append({
            "model": "gpt 4x256 byte-level", "method": labels[key], "row": key,
            "error_pct": None, "metric": "perplexity", "test_perplexity": m["test_perplexity"],
            "val_perplexity": r["val_perplexity"], "dense_test_perplexity": d0["test_perplexity"],
            "paper_perplexity": PAPER.get(key), "paper_error_pct": None,
            "weights": m.get("params_original", m["params"]), "weights_nonzero": m["nonzero"],
            "biases": m["biases"], "biases_nonzero": m["biases_nonzero"],
            "compression_weights": m.get("params_original", m["params"]) / max(m["nonzero"], 1),
            "compression_nonzero": m["compression_nonzero"], "compression_bytes": m["compression_bytes"],
            "file_bytes": m["file_bytes"], "flops_ratio": m["flops_dense"] / max(m["flops_effective"], 1),
            "speedup_b1": m["latency"]["1"]["speedup"], "speedup_b8": m["latency"]["8"]["speedup"],
            "speedup_b256": None, "ms_b1": m["latency"]["1"]["runtime_ms"], "ms_b8": m["latency"]["8"]["runtime_ms"],
            "wall_s": r["wall_s"], "file": r["file"], "target_met": None,
        })
        t = table[-1]
        if not (REPO / t["file"]).is_file():  # bench/files_budget.py removed it (over 300 KB): say what it was
            t["file_committed"] = False
            if m.get("file_sha256"):
                t["file_sha256"] = m["file_sha256"]
            else:
                t["file_note"] = (f"{m['file_bytes']:,} bytes, written by this benchmark and removed by "
                                  "bench/files_budget.py (over 300 KB); its sha256 was not recorded before removal")
    result = {
        "benchmark": NAME, "command": "python " + shlex.join(["bench/lm_text.py", *sys.argv[1:]]),
        "model": {"file": DENSE_FILE, "from": "bench/results/lm_gpt_dense.json", "layers": 4, "width": 256,
                  "heads": 4, "context": 128, "vocab": 256},
        "data": {"name": "stdlib", "source": "CPython standard library source (ns.data.stdlib_text, split by file)",
                 "test_subset": {"rule": f"test split sequences [::{args.test_stride}]", "sequences": len(b.test),
                                 "tokens": int(b.test.y.numel()), "of_sequences": len(b.full.test)},
                 "val_subset": {"rule": f"validation split sequences [::{args.val_stride}]",
                                "sequences": len(b.val), "tokens": int(b.val.y.numel())},
                 "note": "perplexity on a fixed subset of the test split (the full split: "
                         "bench/results/lm_gpt_dense.json, dense 7.4117); every row on the same subset"},
        "finetune": {**ft, "note": "every trained row (fine-tune, DNS, distillation) gets these steps, batch, "
                                   "optimizer, schedule and seed (1: other batches than the dense model's training)"},
        "choices": choices, "paper_note": PAPER_NOTE,
        "latency": {"batches": list(BATCHES), "threads": 1, "repeats": args.repeats,
                    "note": "runtime form of each file vs the dense 4-layer model, interleaved medians; batch 8 "
                            "instead of 256 (256 x 128 tokens is seconds per run here); speedup_b256 is null"},
        "rows": {k: {**rows[k], **{f"measured_{x}": y for x, y in measured[k].items() if x != "latency"},
                     "latency": measured[k]["latency"]} for k in rows},
        "wall_note": "wall_s of a row: its stages (saving excluded), from the run that computed them; this "
                     "session ran up to 7 stage processes at once on the 2 shared cores (load average 11-17), so "
                     "walls compare only roughly",
        "table_rows": table, "wall_s": time.perf_counter() - t_all,
        "missing_rows": {t: "its stages had not finished by the session's deadline (--only-cached)"
                         for t in b.missing},
        "machine": {**facts, "threads": args.threads,
                    "loadavg_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
                    "load_note": "2-core machine shared with other sessions: times are noisy"},
    }
    for t in table:
        print(f"{t['row']:20s} ppl {t['test_perplexity']:.4f} (val {t['val_perplexity']:.4f}) | nz "
              f"{t['compression_nonzero']:.2f}x | bytes {t['compression_bytes']:.2f}x | b1 {t['speedup_b1']:.2f}x "
              f"b8 {t['speedup_b8']:.2f}x | {t['wall_s']:.0f} s")
    if want:
        return
    if args.quick:
        plot(result, STAGE_CACHE / f"{NAME}_quick.png")
        write_doc(result, STAGE_CACHE / f"{NAME}_quick.md")
        return
    path = write_result(NAME, result)
    plot(result, RESULTS / f"{NAME}.png")
    write_doc(result, REPO / "docs" / f"{NAME}.md")
    print(f"wrote {path}")


def write_doc(res: dict, path: Path) -> None:
    """docs/lm_text.md: what was run and the table, every number from the result JSON."""
    d, m, c = res["data"], res["machine"], res["choices"]
    ft = res["finetune"]
    lines = [
        "# The seed papers' methods on a language model (issue 36)", "",
        "Generated by `bench/lm_text.py` from `bench/results/lm_text.json` (do not edit by hand).", "",
        f"Model: the byte-level GPT of `bench/lm_train.py` ({res['model']['layers']} layers, width "
        f"{res['model']['width']}, {res['model']['heads']} heads, context {res['model']['context']}, 3.3M "
        f"parameters), trained on the CPython standard library's source, stored as float16 "
        f"(`{res['model']['file']}`) and loaded into float32. Every row is that checkpoint compressed by "
        "`ns.Pipeline` stages (the recipe stages are in the JSON's `rows.*.stages`), saved as `.nsz`, loaded "
        "back and measured from the file.", "",
        f"**Perplexity is on a fixed subset of the test split**: {d['test_subset']['rule']} = "
        f"{d['test_subset']['sequences']:,} of {d['test_subset']['of_sequences']:,} sequences "
        f"({d['test_subset']['tokens']:,} next-byte predictions), the same for every row. The full test split's "
        "dense perplexity is 7.4117 (`bench/results/lm_gpt_dense.json`). Hyper-parameters were chosen on "
        f"{d['val_subset']['rule']} ({d['val_subset']['sequences']:,} sequences); the test subset was only "
        "evaluated.", "",
        f"Every trained row (the dense control, fine-tuning after pruning, DNS, low rank, heads, distillation) "
        f"gets the same budget: {ft['max_steps']} steps of batch {ft['batch_size']} x 128 bytes, Adam, LR "
        f"{ft['lr']:g} with a cosine decay, no weight decay, batch order seed {ft['seed']} (the dense model was "
        "trained with seed 0's order, so these are mostly sequences it saw once or never).", "",
        "Choices on validation: fine-tuning LR " + ", ".join(
            f"{k}: {v:.4f}" for k, v in c["finetune_lr"]["val_perplexity"].items())
        + f" -> {c['finetune_lr']['chosen']:g} ({c['finetune_lr']['how']})"
        + ("; WoodFisher relative dampening (one-shot) " + ", ".join(
            f"{k}: {v:.4f}" for k, v in c["woodfisher_damp"]["val_perplexity"].items())
           + f" -> {c['woodfisher_damp']['chosen']:g}" if "woodfisher_damp" in c else "")
        + (f"; student: {c['student']['init']}, T {c['student']['temperature']:g}, alpha "
           f"{c['student']['alpha']:g} ({c['student']['how']})" if "student" in c else "") + ".", "",
        "| method | test ppl | val ppl | weights / nonzero | file bytes x smaller | FLOP ratio | speedup b1 | "
        "speedup b8 | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["table_rows"]:
        lines.append(f"| {r['method']} | {r['test_perplexity']:.3f} | {r['val_perplexity']:.3f} | "
                     f"{r['compression_nonzero']:.2f}x | {r['compression_bytes']:.2f}x | {r['flops_ratio']:.2f}x | "
                     f"{r['speedup_b1']:.2f}x | {r['speedup_b8']:.2f}x | {r['wall_s']:.0f} |")
    lat = res["latency"]
    if res.get("missing_rows"):
        lines += ["", "Not in this table: " + "; ".join(f"{k} ({v})" for k, v in res["missing_rows"].items()) + "."]
    lines += [
        "", f"Speed: {lat['note']}; {lat['threads']} thread, {lat['repeats']} runs each. Measured on {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}, {m['date']}, commit {m['commit']} ({m['load_note']}; load "
        f"average {m['loadavg_1min']['start']:.1f} at the start). Wall s: {res['wall_note']}.", "",
        "Weights / nonzero counts every weight site (embedding, attention projections, MLP, head) against the "
        "dense model; for the student, the teacher's weights over the student's. File bytes: the dense "
        "model's float32 bytes over the `.nsz` file. No paper figure applies: " + res["paper_note"] + ".", "",
        "What the methods covered (each method lists the layers it left and why, in the JSON's "
        "`rows.*.skipped`): magnitude, WoodFisher, k-means and int8 cover every weight site (embedding, packed "
        "attention projections, MLP, head); DNS and low rank cover the Linear layers outside attention; heads "
        "removes whole attention heads (q/k/v rows and out_proj columns).", "",
        "![perplexity vs size and speed](../bench/results/lm_text.png)", ""]
    path.write_text("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = result["table_rows"]
    dense = next(r for r in rows if r["row"] == "dense")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "compression_bytes", "file bytes: dense float32 / file (x)"),
                           (axes[1], "speedup_b1", "runtime speedup at batch 1 (x)")):
        for i, r in enumerate(rows):
            ax.scatter([r[key]], [r["test_perplexity"]], color=f"C{i % 10}", zorder=3)
            ax.annotate(r["row"], (r[key], r["test_perplexity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(dense["test_perplexity"], color="grey", ls="--", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("test perplexity (subset; lower is better)")
    axes[0].set_xscale("log")
    axes[0].set_title("GPT 4x256 on Python source: perplexity vs size")
    axes[1].set_title("perplexity vs measured speed")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
