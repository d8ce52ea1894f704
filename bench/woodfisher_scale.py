"""WoodFisher at scale in bounded memory (issue 37 item 5): one-shot WoodFisher (blocks of 128 consecutive weights,
64 gradients, ``low_memory``) on a random-init stack of Linear layers shaped like a transformer's MLPs
(d_model 1024, hidden 4096, 12 layers: 100.7M weights), with real gradients from random data, each run in a
fresh process: the estimate logged before the run, wall time of the fit and of one prune to 50%, and the peak RSS
above the process's RSS before the fit (the model, data and torch are already there).

    python bench/woodfisher_scale.py [--layers 12] [--max-memory 8] [--threads 2]

Writes bench/results/woodfisher_scale.json. Random data and weights: this measures time and memory, not accuracy.
Not through ns.Pipeline: it measures OneShotPruner's fit and prune apart (the peak RSS of the fit, then the prune's
time), which a woodfisher stage runs as one call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import RESULTS, ROOT, machine, write_result

RUN = """
import json, logging, sys, time
import torch
from torch import nn
from netsurgeon.data import Split
from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

a = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
layers = []
for _ in range(a["layers"]):
    layers += [nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(1024, 10))
g = torch.Generator().manual_seed(1)
data = Split(torch.randn(1024, 1024, generator=g), torch.randint(10, (1024,), generator=g))

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def hwm():  # this process image's peak RSS (ru_maxrss keeps the parent's peak across a vfork + exec)
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))

base = rss()
cfg = FisherConfig(num_grads=a["num_grads"], block_size=a["block_size"], damp=1e-5, low_memory=True,
                   max_memory=a["max_memory"])
p = OneShotPruner("woodfisher", cfg)
t = time.perf_counter()
p.fit(model, data)
fit_s = time.perf_counter() - t
rep = p.prune(model, 0.5)
peak = hwm()
print(json.dumps({"weights": sum(p.sizes_), "estimate_bytes": p.memory_, "fit_s": fit_s,
                  "fit_phases_s": p.phase_seconds_, "prune_s": rep["seconds"], "sparsity": rep["sparsity"],
                  "rss_before_fit_bytes": base, "peak_rss_bytes": peak, "peak_above_start_bytes": peak - base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--max-memory", type=float, default=8.0, help="GiB (the machine's memory is shared)")
    ap.add_argument("--num-grads", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    spec = {"layers": args.layers, "max_memory": args.max_memory, "num_grads": args.num_grads,
            "block_size": args.block_size, "threads": args.threads}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    run = json.loads(out.stdout.strip().splitlines()[-1])
    res = {"benchmark": "woodfisher_scale", "machine": machine(), "config": spec, "run": run,
           "wall_s": time.perf_counter() - t0, "log": [ln for ln in out.stderr.splitlines() if "weights" in ln]}
    write_result("woodfisher_scale", res)
    est = run["estimate_bytes"]["total"]
    print(f"{run['weights']:,} weights: estimate {est / 2**30:.2f} GiB ({run['estimate_bytes']['groups']} groups), "
          f"peak above start {run['peak_above_start_bytes'] / 2**30:.2f} GiB, fit {run['fit_s']:.0f} s, "
          f"prune {run['prune_s']:.0f} s -> {RESULTS / 'woodfisher_scale.json'}")


if __name__ == "__main__":
    main()
