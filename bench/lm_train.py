"""Train the dense language model the LM benchmarks start from: ``gpt`` (4 layers, width 256, 4 heads, context
128, byte vocabulary, 3.3M parameters) on the CPython standard library's source (``ns.data.stdlib_text``, split
by file), and record its validation and test perplexity.

    python bench/lm_train.py [--steps 900] [--threads 1] [--quick]

Seeded (weights, batch order); resumable: a checkpoint is written to bench/.cache/ every 50 steps, and running
the same command again continues from it (bit-identical to an uninterrupted run on the same machine and thread
count). Progress is logged every few seconds. The weights are stored as float16 (half the bytes; every later
measurement loads them into a float32 model, so the dense reference is the float16-rounded model, whose
perplexity is recorded next to the float32 one).

Writes bench/results/lm_gpt_dense.json and bench/results/files/lm_gpt_dense.safetensors.
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

import torch

import netsurgeon as ns
from _common import CACHE, RESULTS, machine, rel, write_result
from netsurgeon.modelfile import load_model, save_model

NAME = "lm_gpt_dense"
MODEL = {"n_layer": 4, "width": 256, "n_head": 4}


def _scores(model: torch.nn.Module, data: ns.data.Dataset) -> dict[str, float]:
    out = {}
    for split in ("val", "test"):
        t0 = time.perf_counter()
        ev = ns.evaluate(model, getattr(data, split))
        out.update({f"{split}_perplexity": ev.perplexity, f"{split}_loss_nats": ev.loss,
                    f"{split}_bits_per_byte": ev.loss / 0.6931471805599453, f"{split}_accuracy": ev.accuracy,
                    f"{split}_eval_s": time.perf_counter() - t0})
        logging.info("%s: perplexity %.4f (%.1f s)", split, ev.perplexity, out[f"{split}_eval_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=900, help="optimizer steps (batch 32 x 128 tokens)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="20 steps of a 1-layer width-32 model, written under "
                                                         "bench/.cache/ (checks the script, not a result)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    facts = machine()  # the commit that runs, taken now: the code may move on while this trains
    load_start = os.getloadavg()
    kwargs = {"n_layer": 1, "width": 32, "n_head": 2} if args.quick else MODEL
    steps = 20 if args.quick else args.steps
    tag = f"{NAME}_quick" if args.quick else NAME
    out_file = (CACHE if args.quick else RESULTS / "files") / f"{tag}.safetensors"

    data = ns.data.stdlib_text(seq_len=args.seq_len)
    logging.info("corpus: Python %s, files %s, bytes %s, sha256 %s", data.info["python"], data.info["files"],
                 data.info["bytes"], data.info["sha256"])
    torch.manual_seed(args.seed)
    model = ns.build_model("gpt", data.input_shape, data.num_classes, **kwargs)
    cfg = ns.TrainConfig(epochs=1, batch_size=args.batch_size, optimizer="adam", lr=args.lr, weight_decay=0.0,
                         schedule="cosine", seed=args.seed, max_steps=steps)
    if cfg.max_steps and cfg.max_steps > len(data.train) // args.batch_size:
        sys.exit(f"--steps {steps} is more than one epoch ({len(data.train) // args.batch_size} steps)")
    ckpt = CACHE / f"{tag}.ckpt"
    resume = ckpt.is_file()
    t0 = time.perf_counter()
    # the run ends at max_steps (within the first epoch), so the cosine schedule spans exactly the run
    # no validation pass inside training (the empty split skips it): the splits are scored once, below
    quiet = dataclasses.replace(data, val=ns.data.Split(data.val.x[:0], data.val.y[:0]))
    ns.train(model, quiet, cfg, checkpoint=ckpt, checkpoint_every=50, resume=resume, progress=True)
    train_s = time.perf_counter() - t0
    dense32 = _scores(model, data)
    half = copy.deepcopy(model).half()
    save_model(half, out_file, meta={"data": "stdlib", "data_options": {"seq_len": args.seq_len},
                                     "metric": "perplexity", "train": cfg.to_dict(), "weights": "float16"})
    stored, _ = load_model(out_file)  # what every later benchmark loads: float16 values in a float32 model
    dense16 = _scores(stored, data)
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "command": "python " + shlex.join(["bench/lm_train.py", *sys.argv[1:]]),
        "model": {"name": "gpt", **kwargs, "context": args.seq_len, "vocab": 256, "params": n_params,
                  "head": "untied nn.Linear"},
        "data": {k: v for k, v in data.info.items() if k != "root"},
        "train": {**cfg.to_dict(), "steps": steps, "tokens_seen": steps * args.batch_size * args.seq_len,
                  "wall_s": train_s, "resumed": resume,
                  "note": "wall_s counts this process only (a resumed run: the part after the resume)"},
        "file": rel(out_file) if not args.quick else str(out_file), "file_bytes": out_file.stat().st_size,
        "file_dtype": "float16",
        "dense_float16_weights": dense16,  # the file as every later benchmark loads it: the reference numbers
        "dense_float32_weights": dense32,  # the trained weights before rounding to float16, for comparison
        "machine": {**facts, "threads": args.threads,
                    "loadavg_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
                    "load_note": "2-core machine shared with other sessions while this ran: times are noisy"},
    }
    if args.quick:
        logging.info("quick run: %s", {k: result[k] for k in ("file_bytes", "dense_float16_weights")})
        return
    path = write_result(NAME, result)
    logging.info("wrote %s and %s (%d bytes)", path, out_file, out_file.stat().st_size)


if __name__ == "__main__":
    main()
