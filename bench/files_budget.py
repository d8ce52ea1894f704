"""Keep bench/results small (issue 35): commit only the result files the README's rows cite, under a size budget.

Every benchmark writes the ``.nsz`` file of each row into ``bench/results/files/`` and records its path in the
row's ``file``. This script, run after a benchmark and before committing:

1. records, for every row that names a file, the file's ``file_bytes`` and ``file_sha256`` (once, while the file
   is here), so a re-run can be checked byte for byte even where the file itself is not committed;
2. keeps a cited file when it is at most ``--max-file-kb`` (default 300 KB: the compressed models the headline
   numbers come from) or when another benchmark starts from it (``STARTS``); the others get
   ``file_committed: false`` in their row and are deleted (their benchmark writes them again);
3. deletes files no row cites;
4. fails when bench/results would exceed ``BUDGET_MB`` (25 MB).

``tests/test_bench_files.py`` checks the same rules on every commit, so a benchmark that writes big files is
caught before it lands. ``--dry-run`` prints what would go.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FILES = RESULTS / "files"
BUDGET_MB = 25.0
MAX_FILE_KB = 300
# files other benchmarks (or the README's demo of loading a result) start from: kept whatever their size
STARTS = ("lm_gpt_dense.safetensors", "han_lenet300_layer_float32.nsz", "han_lenet5_layer_float32.nsz",
          "han_lenet5_global_float32.nsz",
          # bench/runtime_mnist.py times these
          "dc_lenet300_dns_huffman.nsz", "int8_lenet300_channel.nsz", "dc_lenet5_dns_huffman.nsz",
          "int8_lenet5_channel.nsz")


def _rows(res: dict):
    """Every row of a result that can name a file (``table_rows`` and the per-model records)."""
    yield from res.get("table_rows", [])


def starts() -> set[str]:
    """Names under files/ that another benchmark opens: STARTS, the DNS runs dns_mnist chose, soft sharing's."""
    out = set(STARTS)
    dns = RESULTS / "dns_mnist.json"
    if dns.exists():
        for rec in json.loads(dns.read_text()).get("models", {}).values():
            f = rec.get("dns", {}).get("file")
            if f:
                out.add(Path(f).name)
    out.update(p.name for p in FILES.glob("sharing_sws_*_auto.nsz"))
    return out


def total_mb() -> float:
    return sum(p.stat().st_size for p in RESULTS.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-file-kb", type=float, default=MAX_FILE_KB)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    keep_always = starts()
    cited: set[Path] = set()
    for path in sorted(RESULTS.glob("*.json")):
        res = json.loads(path.read_text())
        changed = False
        for row in _rows(res):
            if row.get("files") and row.get("files_sha256") is None and all((REPO / f).exists() for f in row["files"]):
                row["files_sha256"] = [hashlib.sha256((REPO / f).read_bytes()).hexdigest() for f in row["files"]]
                changed = True
            f = row.get("file")
            if not f:
                continue
            p = REPO / f
            if p.exists():
                data = p.read_bytes()
                if row.get("file_sha256") is None:
                    row["file_bytes"] = len(data)
                    row["file_sha256"] = hashlib.sha256(data).hexdigest()
                    changed = True
                keep = p.name in keep_always or len(data) <= 1000 * args.max_file_kb
                if keep:
                    cited.add(p.resolve())
                if row.get("file_committed") is not keep:
                    row["file_committed"] = keep
                    changed = True
        if changed and not args.dry_run:
            path.write_text(json.dumps(res, indent=2) + "\n")
    cited |= {(FILES / n).resolve() for n in keep_always if (FILES / n).exists()}
    gone = [p for p in FILES.rglob("*") if p.is_file() and p.resolve() not in cited]
    freed = sum(p.stat().st_size for p in gone) / 1e6
    print(f"{len(gone)} files ({freed:.1f} MB) not kept{' (dry run)' if args.dry_run else ''}")
    if not args.dry_run:
        for p in gone:
            p.unlink()
        for d in sorted((d for d in FILES.rglob("*") if d.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
    mb = total_mb() - (freed if args.dry_run else 0.0)
    print(f"bench/results: {mb:.1f} MB (budget {BUDGET_MB:.0f} MB)")
    if mb > BUDGET_MB:
        raise SystemExit(f"bench/results is {mb:.1f} MB, over the {BUDGET_MB:.0f} MB budget: lower --max-file-kb")


if __name__ == "__main__":
    main()
