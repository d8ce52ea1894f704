"""bench/results stays small (issue 35): only files the result rows cite are committed, under the budget that
bench/files_budget.py enforces, and every row whose file is not committed carries the file's size and sha256."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
files_budget = pytest.importorskip("files_budget")


def _rows():
    for path in sorted(RESULTS.glob("*.json")):
        for row in json.loads(path.read_text()).get("table_rows", []):
            yield path.name, row


def test_bench_results_fit_the_budget():
    assert files_budget.total_mb() <= files_budget.BUDGET_MB


def test_every_committed_file_is_cited_by_a_row_or_started_from():
    cited = {(REPO / row["file"]).resolve() for _, row in _rows() if row.get("file")}
    cited |= {(files_budget.FILES / n).resolve() for n in files_budget.starts()}
    stray = [str(p.relative_to(REPO)) for p in files_budget.FILES.rglob("*")
             if p.is_file() and p.resolve() not in cited]
    assert not stray, f"files no result row cites (run bench/files_budget.py): {stray[:5]}"


def test_a_row_whose_file_is_gone_records_what_it_was():
    for name, row in _rows():
        if row.get("file") and not (REPO / row["file"]).exists():
            assert row.get("file_committed") is False, (name, row["file"])
            recorded = len(row.get("file_sha256", "")) == 64 and row.get("file_bytes", 0) > 0
            assert recorded or row.get("file_note"), (name, row["file"])


@pytest.mark.parametrize("name", ["survey_mnist.json", "lowrank_distill_mnist.json"])
def test_file_x_smaller_has_one_denominator(name):
    """Issue 39.6b: "file x smaller" is stats.dense_bytes of the model before compression (every parameter and
    buffer) over the file's bytes, in every row; these two once divided weights x 4 instead. A row whose file is
    here must agree with the file's header; every row records the two numbers it divides, and rows of one model
    share one dense size (the header's, where one of its files is here)."""
    import netsurgeon as ns

    dense_of: dict[str, set[int]] = {}
    rows = [r for r in json.loads((RESULTS / name).read_text())["table_rows"]
            if r.get("file") and r.get("compression_bytes") is not None]
    assert rows
    for row in rows:
        path = REPO / row["file"]
        if path.is_file():
            info = ns.nsz.read_header(path)
            assert row["compression_bytes"] == pytest.approx(info.dense_bytes / info.file_bytes, rel=1e-9), row["file"]
            dense_of.setdefault(row["model"], set()).add(info.dense_bytes)
        assert row["compression_bytes"] == pytest.approx(row["dense_bytes"] / row["file_bytes"], rel=1e-9), row["file"]
        dense_of.setdefault(row["model"], set()).add(row["dense_bytes"])
    assert all(len(v) == 1 for v in dense_of.values()), dense_of
