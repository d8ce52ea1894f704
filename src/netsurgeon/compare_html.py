"""The page of ``netsurgeon compare``: one static HTML file, plots inline as SVG, nothing fetched from anywhere.

Everything shown is read from the results dict that ``compare`` also writes as ``results.json``; no number is
computed here except the Pareto fronts.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._validation import atomic_write

__all__ = ["write_report", "render"]

_FAMILY_COLOURS = {"pruning": "#1f77b4", "second order": "#17becf", "structured": "#2ca02c", "low rank": "#8c564b",
                   "quantization": "#ff7f0e", "binary": "#d62728", "sharing": "#9467bd", "pipeline": "#e377c2",
                   "dense": "#000000"}



def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    """The figure as an inline ``<svg>`` element (text as text, deterministic ids)."""
    import matplotlib

    plt = _plt()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "netsurgeon"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # same page, same bytes
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _batches(res: dict[str, Any]) -> tuple[str, str]:
    """The small and the large batch the comparison timed (``compare --batch``; default 1 and 256)."""
    bs = [str(b) for b in res.get("batches") or (1, 256)]
    return bs[0], bs[-1]


def _useful(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that ran and did not collapse to chance accuracy: only these can be on a Pareto front."""
    return [r for r in _ok(rows) if not r.get("collapsed")]


def _scatter(ax: Any, rows: list[dict[str, Any]], xs: list[float], ys: list[float], dense_x: float | None,
             dense_y: float, maximise_x: bool = False) -> None:
    """Points by family, labelled; the Pareto front (low error and low x, or high x) as a step line."""
    seen = set()
    for r, x, y in zip(rows, xs, ys, strict=True):
        fam = r.get("family", "pipeline")
        ax.scatter([x], [y], s=28, color=_FAMILY_COLOURS.get(fam, "#7f7f7f"), zorder=3,
                   label=fam if fam not in seen else None)
        seen.add(fam)
        ax.annotate(r["name"], (x, y), fontsize=6.5, xytext=(3, 2), textcoords="offset points", zorder=4)
    useful = [i for i, r in enumerate(rows) if not r.get("collapsed")]
    front = [useful[i] for i in pareto_front([(-xs[i] if maximise_x else xs[i], ys[i]) for i in useful])]
    if len(front) > 1:
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="#444", lw=1, ls="--",
                zorder=2, label="Pareto front")
    if dense_x is not None:
        ax.scatter([dense_x], [dense_y], marker="*", s=110, color="black", zorder=5, label="dense input")
    ax.grid(True, alpha=0.3)


def _score(res: dict[str, Any]) -> tuple[str, str, str]:
    """``(key, name, format)`` of the number the results are judged by: test error in %, or a language model's
    test perplexity; lower is better for both, so the fronts are the same."""
    if res.get("metric") == "perplexity":
        return "test_perplexity", "perplexity", ".3f"
    return "test_error_pct", "error %", ".2f"


def _dense_score(res: dict[str, Any]) -> str:
    key, label, spec = _score(res)
    v = res["dense"][key]
    return f"test perplexity {v:{spec}}" if label == "perplexity" else f"test error {v:{spec}}%"


def _error_limits(ax: Any, ys: list[float], dense_y: float) -> None:
    """Keep the axis on the useful range: a method that collapsed to chance would flatten every other point;
    it stays in the table and is drawn at the top edge."""
    good = sorted(ys)
    top = max(dense_y * 2 + 1, good[len(good) * 3 // 4] * 1.5 if good else 1.0)
    ax.set_ylim(0, top)


def _clip(ys: list[float], ax: Any) -> list[float]:
    top = ax.get_ylim()[1]
    return [min(y, top * 0.98) for y in ys]


def _front_plot(res: dict[str, Any], what: str) -> str:
    plt = _plt()
    rows = _ok(res["rows"])
    dense = res["dense"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    key, name, _ = _score(res)
    word = name.split()[0]
    ys = [r[key] for r in rows]
    _error_limits(ax, [r[key] for r in _useful(rows)], dense[key])
    if what == "bytes":
        xs = [r["file_bytes"] for r in rows]
        _scatter(ax, rows, xs, _clip(ys, ax), dense.get("file_bytes"), dense[key])
        for p in res.get("paper_points", []):
            if "compression_bytes" in p:
                x = dense["dense_bytes"] / p["compression_bytes"]
                ax.scatter([x], [p["error_pct"]], marker="D", facecolors="none", edgecolors="red", s=40, zorder=4)
                ax.annotate(p["paper"], (x, p["error_pct"]), fontsize=6, color="red", xytext=(3, -8),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("file bytes (.nsz; dense: the input file)")
        ax.set_title(f"{word} vs file size")
    elif what == "nonzero":
        xs = [r["compression_weights"] for r in rows]
        _scatter(ax, rows, xs, _clip(ys, ax), None, dense[key], maximise_x=True)
        for p in res.get("paper_points", []):
            if "compression_nonzero" in p:
                ax.scatter([p["compression_nonzero"]], [p["error_pct"]], marker="D", facecolors="none",
                           edgecolors="red", s=40, zorder=4)
                ax.annotate(p["paper"], (p["compression_nonzero"], p["error_pct"]), fontsize=6, color="red",
                            xytext=(3, -8), textcoords="offset points")
        ax.axhline(dense[key], color="black", lw=0.8, ls=":", label="dense input")
        ax.set_xscale("log")
        ax.set_xlabel("weights / nonzero weights (biases excluded)")
        ax.set_title(f"{word} vs nonzero weights")
    else:  # the paired ratio: each method's time against the dense model's, timed interleaved with it
        b = what
        xs = [r["latency"][b]["speedup"] for r in rows]
        _scatter(ax, rows, xs, _clip(ys, ax), 1.0, dense[key], maximise_x=True)
        ax.set_xlabel(f"speedup at batch {b} (dense time / runtime-form time, timed interleaved)")
        ax.set_title(f"{word} vs speed, batch {b}")
    ax.set_ylabel("test perplexity" if word == "perplexity" else "test error (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6.5, loc="upper right")
    return _svg(fig)


def _kept_plot(res: dict[str, Any]) -> str:
    plt = _plt()
    rows = [r for r in _ok(res["rows"]) if r.get("layer_kept_pct")]
    layers = list(res["dense"].get("layer_kept_pct") or (rows[0]["layer_kept_pct"] if rows else {}))
    if not rows or not layers:
        return "<p>No per-layer counts.</p>"
    import numpy as np

    m = np.array([[r["layer_kept_pct"].get(k, 0.0) for k in layers] for r in rows])
    fig, ax = plt.subplots(figsize=(1.0 * len(layers) + 3.0, 0.26 * len(rows) + 1.2))
    im = ax.imshow(np.minimum(m, 100.0), aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] < 55 else "black")
    fig.colorbar(im, ax=ax, label="kept % of the dense layer")
    ax.set_title("nonzero weights per layer, % of the dense layer")
    return _svg(fig)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(res: dict[str, Any]) -> str:
    rows = res["rows"]
    dense = res["dense"]
    ok = _useful(rows)
    key, label, spec = _score(res)
    b1, b2 = _batches(res)
    front = {ok[i]["name"] for i in pareto_front([(r["file_bytes"], r[key]) for r in ok])}
    cols = [("method", "s"), ("family", "s"), ("stages", "s"), (label, "n"), ("&Delta; dense", "n"),
            ("nonzero x", "n"), ("file bytes", "n"), ("bytes x", "n"), ("MFLOPs", "n"),
            (f"b{b1} ms (dense)", "n"), (f"b{b1} x", "n"), (f"b{b2} ms (dense)", "n"), (f"b{b2} x", "n"),
            ("steps", "n"), ("time s", "n")]
    head = "".join(f'<th data-t="{t}" title="click to sort">{c}</th>' for c, t in cols)
    body = []

    def lat(r: dict[str, Any], b: str, key: str) -> Any:
        return (r.get("latency") or {}).get(b, {}).get(key)

    for r in [dense, *rows]:
        is_dense = r is dense
        name = "dense (input)" if is_dense else r["name"]
        stages = "" if is_dense else " &rarr; ".join(html.escape(next(iter(s))) for s in r.get("stages", []))
        if r.get("status") != "ok":
            body.append(f'<tr class="failed"><td>{html.escape(name)}</td><td>{html.escape(r.get("family", ""))}</td>'
                        f'<td>{stages}</td><td colspan="{len(cols) - 3}">failed: {html.escape(r.get("error", ""))}'
                        "</td></tr>")
            continue
        err = r[key]
        mark = " &#9733;" if name in front else " <small>(collapsed: chance accuracy)</small>" if r.get("collapsed") \
            else ""
        if r.get("skipped"):  # layers the method left as they were, with why, on hover
            why = "; ".join(f"{k}: {v}" for k, v in r["skipped"].items())
            mark += (f' <small title="{html.escape(why)}">(left {len(r["skipped"])} layer(s) as they were: '
                     f'{html.escape(", ".join(r["skipped"]))})</small>')
        cells = [
            (name + mark, name), (html.escape(r.get("family", "")), ""),
            (stages, ""), (_fmt(err, spec), err), (_fmt(err - dense[key], "+" + spec), err - dense[key]),
            (_fmt(r.get("compression_weights"), ".1f"), r.get("compression_weights")),
            (_fmt(r.get("file_bytes"), ","), r.get("file_bytes")),
            (_fmt(r.get("compression_bytes"), ".1f"), r.get("compression_bytes")),
            (_fmt(r["flops_effective"] / 1e6, ".2f"), r["flops_effective"]),
            (f'{_fmt(lat(r, b1, "runtime_ms"), ".3f")} <small>({_fmt(lat(r, b1, "dense_ms"), ".3f")})</small>',
             lat(r, b1, "runtime_ms")),
            (_fmt(lat(r, b1, "speedup"), ".2f") + "x", lat(r, b1, "speedup")),
            (f'{_fmt(lat(r, b2, "runtime_ms"), ".2f")} <small>({_fmt(lat(r, b2, "dense_ms"), ".2f")})</small>',
             lat(r, b2, "runtime_ms")),
            (_fmt(lat(r, b2, "speedup"), ".2f") + "x", lat(r, b2, "speedup")),
            (_fmt(r.get("train_steps", 0), ","), r.get("train_steps", 0)),
            (_fmt(r.get("wall_s"), ".1f"), r.get("wall_s")),
        ]
        tds = "".join(f'<td data-v="{html.escape(str(v))}">{c}</td>' if v != "" else f"<td>{c}</td>" for c, v in cells)
        body.append(f'<tr{" class=dense" if is_dense else ""}>{tds}</tr>')
    return f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


_SCRIPT = """
(function () {
  var table = document.getElementById('results');
  var heads = table.querySelectorAll('th');
  heads.forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows).filter(function (r) { return !r.classList.contains('dense'); });
      var numeric = th.getAttribute('data-t') === 'n';
      var up = th.getAttribute('data-dir') !== 'up';
      heads.forEach(function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', up ? 'up' : 'down');
      function key(r) {
        var c = r.cells[col];
        if (!c) { return numeric ? Infinity : ''; }
        var v = c.getAttribute('data-v');
        if (numeric) { var x = parseFloat(v); return isNaN(x) ? Infinity : x; }
        return (c.textContent || '').toLowerCase();
      }
      rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 11px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; position: sticky; top: 0; }
td:nth-child(-n+3) { text-align: left; }
tr.dense td { background: #f7f7e8; font-weight: 600; }
tr.failed td { color: #a00; } tr.failed td:last-child { white-space: normal; text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots > div { flex: 0 0 auto; } .plots svg { max-width: 640px; height: auto; }
td small { color: #777; }
.meta { font-size: 13px; color: #444; } code { background: #f3f3f3; padding: 1px 3px; }
"""


def render(res: dict[str, Any]) -> str:
    """The whole page as one string."""
    dense = res["dense"]
    plan = res["plan"]
    m = res.get("machine", {})
    n_ok = len(_ok(res["rows"]))
    failed = [r for r in res["rows"] if r.get("status") != "ok"]
    title = f"netsurgeon compare: {res.get('model') or 'model'} on {res.get('data') or 'data'}"
    budget = f"{res['budget_s'] / 60:.0f} min budget; " if res.get("budget_s") else ""
    over = ""
    if res.get("budget_s") and res["wall_s_this_run"] > res["budget_s"]:
        over = (" The run took longer than its budget: the budget plans the training steps (half of it, from a "
                "timed probe); statistics, writing and latency measurement are not capped by it.")
    pending = ""
    if res.get("pending"):
        pending = (f"<p class=\"meta\"><b>Incomplete:</b> {len(res['pending'])} entries not run yet "
                   f"({html.escape(', '.join(res['pending']))}); run the same command again to continue.</p>")
    chance = res.get("chance_accuracy")
    collapsed = [r["name"] for r in _ok(res["rows"]) if r.get("collapsed")]
    if collapsed:
        pending += (f"<p class=\"meta\"><b>Collapsed to chance accuracy</b> (always predicting the most frequent "
                    f"class gives {100 * chance:.2f}%): {html.escape(', '.join(collapsed))}; kept in the table, "
                    "left off the Pareto fronts and the error axes.</p>")
    papers = ""
    if res.get("paper_points"):
        items = "".join(f"<li>{html.escape(p['paper'])}: {p['error_pct']:.2f}% at "
                        + (f"{p['compression_nonzero']:g}x fewer nonzero weights" if "compression_nonzero" in p
                           else f"{p['compression_bytes']:g}x smaller file") + "</li>" for p in res["paper_points"])
        papers = ("<p>Red diamonds: the papers' own figures on this model (their dense models and training "
                  f"lengths, not this run's budget):</p><ul>{items}</ul>")
    fails = ""
    if failed:
        fails = "<h2>Methods that did not run on this model</h2><ul>" + "".join(
            f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r.get('error', ''))}</li>" for r in failed) + "</ul>"
    b1, b2 = _batches(res)
    plots = "".join(f"<div>{_front_plot(res, w)}</div>" for w in ("bytes", "nonzero", b1, b2))
    lat = dense.get("latency", {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">{n_ok} of {len(res['rows'])} methods ran; dense input: {_dense_score(res)},
{dense.get('file_bytes', 0):,} bytes, {dense['flops_dense'] / 1e6:.2f} MFLOPs,
{_fmt(lat.get(b1, {}).get('runtime_ms'), '.3f')} ms at batch {b1},
{_fmt(lat.get(b2, {}).get('runtime_ms'), '.2f')} ms at batch {b2}.<br>
Budget: {budget}every method got the same {plan['steps']:,} training steps of batch {plan['batch_size']}
({plan['epochs']:.2f} epochs), spent compressing or fine-tuning; pruning methods aim at
{100 * plan['sparsity']:.0f}% sparsity. Compressing took {res['total_s'] / 60:.1f} min in all
(this run: {res['wall_s_this_run'] / 60:.1f} min).{over}<br>
Measured on {html.escape(str(m.get('cpu', '?')))}, {m.get('threads', '?')} threads, torch
{html.escape(str(m.get('torch', '?')))}, {html.escape(res.get('date', ''))}; netsurgeon {html.escape(res.get('version',
''))}.<br>
Command: <code>{html.escape(res.get('command', ''))}</code></p>
{pending}
<h2>Results</h2>
<p class="meta">Error: on the test split (never used for a choice); &Delta; dense in points. Nonzero x: dense
Linear and Conv weights over the nonzero weights kept (biases excluded). File bytes: the <code>.nsz</code> file on
disk (dense row: the input file); bytes x: how much smaller. Latency: the runtime form of the file against the dense
input, timed interleaved in one process, medians of
{res.get('dense', {}).get('latency', {}).get('1', {}).get('threads', '?')}-thread runs; the dense time of the same
measurement is in brackets and the speedup (x) is the ratio of those two. Steps: training steps the entry got;
time: seconds it took to compress. &#9733;: on the Pareto front of error vs file bytes. Click a column to sort.</p>
{_table(res)}
{fails}
<h2>Pareto fronts</h2>
{papers}
<div class="plots">{plots}</div>
<h2>Where each method keeps its weights</h2>
{_kept_plot(res)}
<p class="meta">Files: <code>files/NAME.nsz</code> (load with <code>netsurgeon.load_compressed</code>), every number in
<code>results.json</code>.</p>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(res: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`render`'s page atomically; returns its path."""
    p = Path(path)
    page = render(res)
    with atomic_write(p, "w") as f:
        f.write(page)
    return p
