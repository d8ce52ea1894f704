"""Re-time the speed columns of committed benchmark results from their files, with today's runtime, on this machine.

    python bench/retime.py [--benchmarks han_mnist dns_mnist ...]

A benchmark's speed columns are measured when it runs; the runtime has changed since several ran (whole-model
steps for convolution networks, direct calls), and so has the measurement (the process keeps freed memory, so
the dense module no longer pays page faults by allocation history: docs/runtime.md). Training a benchmark again
on another CPU trains other models, so this re-times the committed ``.nsz`` files instead: every row that has a
file and speed columns gets the project's one definition of speed again (``_common.latency``: the runtime form
of the file against the dense model of its architecture, interleaved in one process, 2 threads, medians of
100; each file in a fresh process), in place. The row keeps its first values under ``speed_first_run``; the
result records the re-timing machine under ``retimed``. Training results (errors, sizes, wall times) and the
benchmark's own nested details stay as they were. A row whose file fails to time keeps its values and says
why. Each benchmark's file is written as soon as its rows are done, so an interrupted run keeps what it
finished; ``--skip-done`` goes on from there.

Not re-timed here: structured_mnist (``--remeasure`` re-times it with its own columns), runtime_mnist (it is a
timing benchmark: run it again), and rows whose speed has another reference: lowrank_distill's students against
their teacher (no file), and binary_mnist's, which are against the float network the binary one was trained
beside (a file records only the binary network, whose own dense form still binarizes its activations).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import REPO, RESULTS, ROOT, machine, write_result

BENCHMARKS = ("han_mnist", "dns_mnist", "int8_mnist", "missed_targets", "distributed", "lowrank_distill_mnist",
              "survey_mnist")


def latency_in_fresh_process(file: str) -> dict:
    """``_common.latency(file)`` in a process of its own: on this VM a process can run its parallel sparse
    kernels 2x slower from some point to its end (docs/runtime.md, pitfalls); then it spoils one file, not all."""
    code = f"import json; from _common import latency; print(json.dumps(latency({file!r})))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def retime(name: str, cache: dict) -> int:
    """Re-time one benchmark's rows in place and write its result; the number of rows re-timed."""
    res = json.loads((RESULTS / f"{name}.json").read_text())
    done = 0
    for row in res["table_rows"]:
        if not row.get("file") or row.get("speedup_b1") is None:
            continue
        if not (REPO / row["file"]).exists():  # not committed (bench/files_budget.py): its benchmark writes it again
            print(f"{name}: {row['model']} {row['method'][:60]}: file not here, not re-timed", flush=True)
            continue
        first = row.get("speed_first_run") or {"speedup_b1": row["speedup_b1"], "speedup_b256": row["speedup_b256"],
                                               "machine": res.get("machine")}
        try:
            if row["file"] not in cache:
                cache[row["file"]] = latency_in_fresh_process(row["file"])
            lat = cache[row["file"]]
        except Exception as e:  # noqa: BLE001 - one file that cannot be timed keeps its row as it was
            row["retime_failed"] = f"{type(e).__name__}: {e}"
            print(f"{name}: {row['model']} {row['method'][:60]}: not re-timed ({row['retime_failed']})", flush=True)
            continue
        row.pop("retime_failed", None)
        row.update(speed_first_run=first, speedup_b1=lat["1"]["speedup"], speedup_b256=lat["256"]["speedup"],
                   latency_ms={b: lat[b]["ms"] for b in ("1", "256")})
        done += 1
        print(f"{name}: {row['model']} {row['method'][:60]}: b1 {first['speedup_b1']:.2f}x -> "
              f"{row['speedup_b1']:.2f}x, b256 {first['speedup_b256']:.2f}x -> {row['speedup_b256']:.2f}x", flush=True)
    res["retimed"] = {"machine": machine(), "rows": done, "how": "bench/retime.py: the runtime form of each row's "
                      "file against the dense model of its architecture (_common.latency), interleaved, 2 threads, "
                      "medians of 100, each file in a process of its own; speed_first_run in each row holds the "
                      "values of the benchmark's own run"}
    write_result(name, res)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS, metavar="NAME",
                    help=f"which results to re-time (default: all of {', '.join(BENCHMARKS)})")
    ap.add_argument("--skip-done", action="store_true", help="leave results that already record a re-timing")
    args = ap.parse_args()
    t0, cache = time.perf_counter(), {}
    for name in args.benchmarks:
        if args.skip_done and "retimed" in json.loads((RESULTS / f"{name}.json").read_text()):
            continue
        print(f"{name}: {retime(name, cache)} rows re-timed ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
