"""Regenerate the README's results table from bench/results/*.json (the only source of its numbers).

    python bench/make_readme.py

Each result JSON carries ``table_rows``: dicts with model, method, error and paper error, compression by
nonzeros and by file bytes, latency ratios, wall time and whether the issue's target was met.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
RT_START, RT_END = "<!-- runtime:start -->", "<!-- runtime:end -->"
CMP_START, CMP_END = "<!-- compare:start -->", "<!-- compare:end -->"
DIST_START, DIST_END = "<!-- distributed:start -->", "<!-- distributed:end -->"
COMPARE = ROOT / "docs" / "compare" / "lenet5_mnist" / "results.json"  # `netsurgeon compare`'s own results


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pm(r: dict, key: str, fmt: str) -> str:
    """``value`` or ``mean ± std`` when the row holds several seeds."""
    sd = r.get(f"{key}_std")
    return _f(r.get(key), fmt) + ("" if sd is None else f" ± {format(sd, fmt)}")


def _paper_x(v) -> str:
    return f" ({v:.0f}x)" if v else ""


def _pattern(r: dict) -> str:
    return f" {r['pattern']}" if r.get("pattern") and r["pattern"] != "-" else ""


def _score(r: dict) -> str:
    """Test error % (paper), or for a language model its perplexity (paper's relative increase and ours)."""
    if r.get("perplexity") is not None:
        rel = r.get("paper_relative_increase")
        return (f"ppl {r['perplexity']:.3f}, {100 * r['relative_increase']:+.1f}% "
                f"(paper {'-' if rel is None else format(100 * rel, '+.1f') + '%'})")
    if r.get("metric") == "perplexity":  # lm_text's rows: test perplexity, no paper reports one
        return f"ppl {_f(r.get('test_perplexity'), '.3f')} ({_f(r.get('paper_perplexity'), '.2f')})"
    return f"{_pm(r, 'error_pct', '.2f')} ({_f(r.get('paper_error_pct'), '.2f')})"


def _dense(r: dict) -> str:
    if r.get("metric") == "perplexity":
        return f"ppl {_f(r.get('dense_test_perplexity'), '.3f')} (-)"
    if r.get("perplexity") is not None:
        return f"ppl {_f(r.get('dense_perplexity'), '.3f')} ({_f(r.get('paper_dense_perplexity'), '.2f')})"
    return f"{_f(r.get('dense_error_pct'), '.2f')} ({_f(r.get('paper_dense_error_pct'), '.2f')})"


def _big_batch(r: dict) -> str:
    if "speedup_b64" in r and "speedup_b256" not in r:  # language-model rows time batch 64 (sequences of 128)
        return f"{_f(r['speedup_b64'], '.2f')} (b64)"
    if r.get("speedup_b256") is None and "speedup_b8" in r:  # lm_text times 8 sequences of 128
        return f"{_f(r['speedup_b8'], '.2f')} (b8)"
    return _f(r.get("speedup_b256"), ".2f")


def render() -> str:
    lines, machines, retimed = [], set(), {}
    head = ("| benchmark | model | method | test error % (paper) | dense error % (paper) | kept weights | "
            "compression: weights (paper) | biases kept | compression: .nsz bytes (paper) | speedup b1 / b256 | "
            "compress wall s | target |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        res = json.loads(path.read_text())
        m = res.get("machine", {})
        machines.add(f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')} "
                     f"({m.get('date', '?')}, commit {m.get('commit', '?')})")
        if "retimed" in res:
            rm = res["retimed"]["machine"]
            retimed.setdefault(f"{rm['cpu']}, {rm['cores']} cores, torch {rm['torch']} ({rm['date']}, commit "
                               f"{rm['commit']})", []).append(res["benchmark"])
        for r in res.get("table_rows", []):
            lines.append(
                f"| {res['benchmark']} | {r['model']} | {r['method']}{_pattern(r)} | {_score(r)} | {_dense(r)} | "
                f"{_f(100 * r['weights_nonzero'] / r['weights'], '.2f')}% | "
                f"{_pm(r, 'compression_weights', '.1f')}x ({_f(r.get('paper_compression'), '.0f')}"
                f"{'x' if r.get('paper_compression') else ''}) | {r['biases_nonzero']}/{r['biases']} | "
                f"{_f(r['compression_bytes'], '.1f')}x"
                f"{_paper_x(r.get('paper_compression_bytes'))}"
                f" | {_f(r.get('speedup_b1'), '.2f')} / "
                f"{_big_batch(r)} | {_f(r.get('wall_s'), '.0f')} | "
                f"{'-' if r.get('target_met') is None else 'met' if r['target_met'] else 'MISSED'} |")
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        res = json.loads(path.read_text())
        if "sweep" in res:
            lines += ["", _sweep_table(res)]
        if res.get("benchmark") == "fixed_point_mnist":
            lines += ["", "fixed_point_mnist (Gupta et al. 2015; paper: 16-bit stochastic rounding matches float32, "
                      "round-to-nearest does not), LeNet-300-100, 5 epochs plain SGD, test error % "
                      + ("(mean ± std over seeds " + ", ".join(map(str, next(iter(res["runs"].values()))["seeds"]))
                         + "; without 'params only' the layer outputs and back-propagated errors are in fixed point "
                           "too)" if "seeds" in next(iter(res["runs"].values())) else "") + ": " + ", ".join(
                          f"{k} {v['test_error_pct']:.2f}" + (f" ± {v['test_error_std']:.2f}" if "test_error_std" in v
                                                              else "") for k, v in res["runs"].items()) + "."]
        if res.get("benchmark") == "autoprune_mnist":
            def fmt(d: dict) -> str:
                return "; ".join(f"{k}: {v['compression_nonzero']:.1f}x at {v['test_error_pct']:.2f}%"
                                 for k, v in d.items())

            lines += ["", "autoprune_mnist, LeNet-300-100, 3 epochs, strength one decade each way (compression by "
                      f"nonzeros at test error): AutoPrune mu {fmt(res['mu_sweep'])}; L1 penalty on the weights "
                      f"lambda {fmt(res['l1_sweep'])}.", "",
                      f"autoprune_mnist ablation (LeNet-300-100, mu 100, 3 epochs): {fmt(res['ablation'])}."]
            if res.get("data_note"):
                lines += ["", f"autoprune_mnist data: {res['data_note']}."]
            for name, r in res["models"].items():
                lines += ["", f"autoprune_mnist {name}: FLOPs kept {r['autoprune']['flops_kept_pct']:.1f}% "
                          "(paper, LeNet-5: 7%)."]
        if res.get("benchmark") == "structured_mnist":
            for name, r in res["models"].items():
                tp = r["torch_pruning"]
                if "latency" not in tp:
                    lines += ["", f"structured_mnist {name}: Torch-Pruning comparison skipped ({tp.get('skipped')})."]
                    continue
                lines += ["", f"structured_mnist {name}, l1_filters one-shot vs Torch-Pruning removing the same "
                          f"channels: same shapes {tp['same_shapes']}, max |output difference| "
                          f"{tp['max_abs_output_diff']:.1e}, test error {tp['error_pct_ours']:.2f}% / "
                          f"{tp['error_pct_torch_pruning']:.2f}%, latency ours / theirs batch 1 "
                          f"{tp['latency']['1']['ours_ms']:.3f} / {tp['latency']['1']['torch_pruning_ms']:.3f} ms, "
                          f"batch 256 {tp['latency']['256']['ours_ms']:.2f} / "
                          f"{tp['latency']['256']['torch_pruning_ms']:.2f} ms; FLOP ratio and measured speedup "
                          "per method: " + "; ".join(
                              f"{k} {v['flop_ratio']:.2f}x FLOPs, {v['latency']['256']['speedup']:.2f}x at batch 256 "
                              + (f"({v['latency']['256']['speedup_over_dense_runtime']:.2f}x over the dense model's "
                                 "runtime form: " if "speedup_over_dense_runtime" in v["latency"]["256"] else "(")
                              + f"{100 * v['speedup_over_flop_bound_b256']:.0f}% of the FLOP ratio; goal 80%)"
                              for k, v in r["methods"].items()) + "."]
        if res.get("benchmark") == "survey_mnist" and "retimed" not in res:
            lines += ["", "survey_mnist: its speed columns were timed while another benchmark shared the two cores "
                      "(noisy; each ratio is still one interleaved measurement of the runtime form against dense)."]
            for name, r in res.get("datafree", {}).items():
                lines += ["", f"survey_mnist data-free neuron removal, {name} ({'+'.join(r['layers'])}), no retraining,"
                          " "
                          f"test error % by fraction of neurons removed (dense {r['dense_test_error_pct']:.2f}%; "
                          f"operating point {r['chosen_fraction']:g}, {r['chosen_how']}): " + "; ".join(
                              f"{kind}: " + ", ".join(f"{f} {v['test_error_pct']:.2f}" for f, v in rows.items())
                              for kind, rows in r["sweep"].items()) + "."]
            for row, d in res.get("decay", {}).items():
                lines += ["", f"survey_mnist decay, {row}: validation error by strength "
                          + ", ".join(f"{k}: {v:.2f}%" for k, v in d["val_error_by_strength"].items())
                          + f" -> chosen {d['chosen_strength']}."]
            if res.get("distortion"):
                lines += ["", "survey_mnist distortions (Merolla et al. 2016), LeNet-300-100, test error % of each "
                          "trained network (rows) under each test-time distortion: " + "; ".join(
                              f"trained with {t}: " + ", ".join(f"{k} {v:.2f}"
                                                                for k, v in r["test_error_under"].items())
                              for t, r in res["distortion"].items()) + "."]
            for what, why in res.get("pq", {}).get("skipped", {}).items():
                lines += ["", f"survey_mnist vector quantization, {what}: not run ({why})"]
            for n, g in res.get("kfac", {}).get("grads", {}).items():
                lines += ["", f"survey_mnist K-FAC damping ({n} gradients): {g['kfac_damp']['how']} -> "
                          f"{g['kfac_damp']['chosen']:g}."]
        if res.get("benchmark") == "fuzz_nsz":
            o, t = res["outcomes"], res["targets"]
            verdict = "all targets met" if res["met"] else "MISSED: " + ", ".join(k for k, v in t.items() if not v)
            lines += ["", f"fuzz_nsz ({verdict}): "
                      f"{res['inputs']:,} crafted .nsz files in {res['wall_s']:.0f} s ({res['workers']} workers): "
                      f"{o.get('NszError', 0):,} clean NszError, {o.get('ok', 0):,} loaded with finite weights, "
                      f"{res['other_exceptions']} other exceptions, {res['over_2s']} over 2 s (slowest "
                      f"{res['slowest_s']:.2f} s), peak memory "
                      f"+{res['peak_memory_above_baseline_bytes'] / 2**20:.1f} MB "
                      f"(budget {res['memory_budget_bytes'] / 2**20:.1f} MB = 10x the largest valid file + the "
                      f"largest model's dense size; {res['memory_method']})."]
        if res.get("benchmark") == "binary_mnist":
            k = res["kernel_2048"]
            lines += ["", "binary_mnist: one 2048x2048 binary layer, XNOR + popcount on packed 64-bit words (input "
                      "packing included, bit-exact: " + ("yes" if all(v["bit_exact"] for v in k.values()) else "NO")
                      + f") vs float32 F.linear, interleaved: batch 1 {k['1']['speedup']:.1f}x "
                      f"({k['1']['xnor_ms'] * 1e3:.0f} vs {k['1']['float32_ms'] * 1e3:.0f} us; goal 20x "
                      f"{'met' if k['1']['speedup'] >= 20 else 'MISSED'}), batch 256 {k['256']['speedup']:.1f}x "
                      f"(goal 4x {'met' if k['256']['speedup'] >= 4 else 'MISSED'})"
                      + (f"; each run back to back with warm caches instead: {k['1']['back_to_back_speedup']:.1f}x / "
                         f"{k['256']['back_to_back_speedup']:.1f}x" if "back_to_back_speedup" in k["1"] else "")
                      + ". Binary layers in the file: "
                      + ", ".join(f"{r['method']} {r['binary_layers_compression_bytes']:.1f}x smaller than float32"
                                  for r in res["table_rows"] if r.get("binary_layers_compression_bytes"))
                      + ". Stochastic BinaryConnect evaluated with its real weights (the paper's protocol): "
                      + ", ".join(f"{r['error_real_weights_pct']:.2f}%" for r in res["table_rows"]
                                  if r.get("error_real_weights_pct") is not None)
                      + " (the table row is the stored binary model). Epochs are cut to the CPU budget (papers: "
                      "250-1000); one seed; test error at the best-validation epoch."]
        if res.get("benchmark") == "sharing_mnist":
            h = res["hashednets"]
            lat = res.get("hashednets_runtime_1/8", {})
            lines += ["", "sharing_mnist HashedNets (784-1000-10, dropout 0.25, trained from scratch for "
                      f"{h['1/1']['hashednets']['epochs']} epochs; test error % at each factor, HashedNets / plain "
                      "net with the same real parameters): " + "; ".join(
                          f"{lb} {v['hashednets']['test_error_pct']:.2f} / {v['plain']['test_error_pct']:.2f} "
                          f"({v['plain']['hidden']} hidden)" for lb, v in h.items() if "plain" in v)
                      + f"; dense {h['1/1']['hashednets']['test_error_pct']:.2f}. Paper (HashNet, 3-layer): 1.45 at "
                      "1/8, 2.79 at 1/64."
                      + (f" Computing the 1/8 net from its buckets (hashes per multiply-add, no virtual matrix) "
                         f"against the materialized matrices: batch 1 {lat['1']['speedup']:.2f}x, batch 256 "
                         f"{lat['256']['speedup']:.2f}x (below 1 = slower), so the runtime keeps them materialized."
                         if lat else "")]
            for key, r in res["sws"].items():
                lines += ["", f"sharing_mnist soft weight sharing {key} (τ {r['tau']}, {r['epochs']} epochs): start "
                          f"{r['start_error_pct']:.2f}% → retrained {r['retrained_error_pct']:.2f}% → quantized "
                          f"{r['auto']['test_error_pct']:.2f}%; {100 * r['kept']:.2f}% of weights nonzero; "
                          f"{r['components_used']} of {r['components_after_merge']} merged components used; file "
                          f"{r['auto']['compression_bytes']:.0f}x (ours) / "
                          f"{r['paper_widths']['compression_bytes']:.0f}x (the paper's 8/5-bit index widths) smaller "
                          "than float32."]
        if res.get("benchmark") == "int8_mnist":
            for name, r in res["models"].items():
                lat = r["latency_int8_linear_vs_float32"]
                lines += ["", f"int8_mnist {name}: float32 error {r['float32_error_pct']:.2f}%; " + ", ".join(
                    f"{k} {v['test_error_pct']:.2f}% at {v['compression_bytes']:.2f}x bytes" for k, v in r.items()
                    if isinstance(v, dict) and "test_error_pct" in v)
                    + f"; int8 Linear kernels vs float32: batch 1 {lat['1']['speedup']:.2f}x, batch 256 "
                    f"{lat['256']['speedup']:.2f}x."]
        if res.get("benchmark") == "deep_compression_mnist":
            for name, r in res["models"].items():
                hw = r.get("hessian_weighted", {})
                if hw:
                    lines += ["", f"deep_compression_mnist {name}, one codebook for all layers, no fine-tuning "
                              f"(test error %, compression by bytes): " + "; ".join(
                                  f"{label}: " + ", ".join(f"{b} bits {v['test_error_pct']:.2f}% "
                                                           f"{v['compression_bytes']:.1f}x" for b, v in d.items())
                                  for label, d in hw.items())
                              + f" (Choi et al. 2017 report {res.get('choi_2017_lenet_compression')}x for LeNet)."]
                fixed = {k: v["fixed"]["compression_bytes"] for k, v in r["pipelines"].items()}
                lines += ["", f"deep_compression_mnist {name}, before Huffman: " + ", ".join(
                    f"{k} {v:.1f}x" for k, v in fixed.items()) + f" (paper {r['paper']['before_huffman']}x)."]
    lines.append("")
    lines += [f"Measured on: {m}." for m in sorted(machines)]
    lines += [f"Speed columns of {', '.join(names)} re-timed from their files (bench/retime.py; each row keeps its "
              f"first values under speed_first_run) on: {m}." for m, names in sorted(retimed.items())]
    return "\n".join(lines)


def render_runtime() -> str:
    """The "Is it faster?" section from bench/results/runtime_mnist.json."""
    path = ROOT / "bench" / "results" / "runtime_mnist.json"
    if not path.is_file():
        return "(run `python bench/runtime_mnist.py --data-dir DIR`)"
    res = json.loads(path.read_text())
    m = res["machine"]
    cols = ["runtime", "dense_runtime", "torch_csr", "ort_dense", "ort_export"]
    out = [f"Measured on {m['cpu']}, {res['threads']} threads, torch {m['torch']} ({m['date']}, commit "
           f"{m['commit']}); medians of {res['repeats']} interleaved runs. Each cell: milliseconds (speedup over "
           "the dense float32 nn.Module of the same architecture, timed interleaved with it in its own pass; the dense "
           "column is the runtime pass's). \"Dense model, runtime form\" is the uncompressed model through the same "
           "kernels and whole-model steps (for LeNet-5: max-pooling, channels-last order): the runtime's own gain, "
           "which is not the compression's; the runtime column over it (\"of which compression\") is.", "",
           "| file | batch | dense ms | netsurgeon runtime | dense model, runtime form | of which compression | "
           "torch CSR | onnxruntime, dense ONNX | onnxruntime, compact ONNX | FLOP bound | runtime forms | goal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["files"].items():
        lat = r["latency"]
        for b, v in lat["batches"].items():
            cells = [f"{v['ms'][c]:.4f} ({v['speedup'][c]:.2f}x)" if c in v["ms"] else "-" for c in cols]
            cells.insert(2, f"{v['runtime_over_dense_runtime']:.2f}x" if "runtime_over_dense_runtime" in v else "-")
            cells = " | ".join(cells)
            forms = ", ".join(f"{'+'.join(x['layers'])}: {x['form']}" for x in v["plan"]["runs"])
            goal = [f"{k.replace('speedup_b', 'b')} >= {g:g}x: {'met' if r['met'][k] else 'MISSED'}"
                    for k, g in r["goal"].items() if k == f"speedup_b{b}"]
            if b == "1" and "resident_over_file" in r["goal"]:
                goal.append(f"resident <= {r['goal']['resident_over_file']:g}x file: "
                            f"{'met' if r['met']['resident_over_file'] else 'MISSED'}")
            dense_ms = v["dense_ms_per_pass"]["runtime"] if "dense_ms_per_pass" in v else v["ms"]["dense"]
            out.append(f"| {key} ({r['label']}) | {b} | {dense_ms:.4f} | {cells} | "
                       f"{lat['flop_ratio_bound']:.1f}x | {forms} | {'; '.join(goal) or '-'} |")
    out += ["", "| file | .nsz bytes | runtime resident weight bytes (batch 1 / 256) | dense float32 weight bytes | "
            "compact ONNX bytes (dense ONNX) | test error %: dense / runtime b1 / b256 / onnxruntime | "
            "predictions equal to dense (b1 / b256 / onnxruntime) |", "|---|---|---|---|---|---|---|"]
    for key, r in res["files"].items():
        lat, rt, ox = r["latency"], r["runtime"], r["onnx"]
        n = rt["1"]["of"]
        out.append(f"| {key} | {lat['file_bytes']:,} | {lat['batches']['1']['runtime_resident_bytes']:,} / "
                   f"{lat['batches']['256']['runtime_resident_bytes']:,} | {lat['dense_weight_bytes']:,} | "
                   f"{ox['file_bytes']:,} ({ox['dense_onnx_bytes']:,}) | {r['dense_error_pct']:.2f} / "
                   f"{rt['1']['error_pct']:.2f} / {rt['256']['error_pct']:.2f} / {ox['error_pct']:.2f} | "
                   f"{rt['1']['same_predictions']:,} / {rt['256']['same_predictions']:,} / "
                   f"{ox['same_predictions']:,} of {n:,} |")
    sw = res["sparsity_sweep"]
    out += ["", "LeNet-300-100 pruned one-shot (global magnitude) to each sparsity, runtime speedup at batch 1 / 256 "
            "(FLOP-ratio bound): " + "; ".join(
                f"{100 * r['sparsity']:g}%: {r['speedup_b1']:.2f}x / {r['speedup_b256']:.2f}x "
                f"({r['flop_ratio_bound']:.0f}x)" for r in sw) + ".", "",
            "![speedup vs sparsity](bench/results/runtime_mnist.png)"]
    return "\n".join(out)


def _sweep_table(res: dict) -> str:
    """One-shot accuracy-vs-sparsity table (mean ± std over seeds) of a sweep benchmark."""
    sp = list(next(iter(res["sweep"].values()))["mean"])
    out = [f"{res['benchmark']}: one-shot test accuracy % of MLPNet (dense {res['dense_test_acc']:.2f}%), "
           f"{res['num_grads']} gradients, seeds {res['seeds']}, no fine-tuning:", "",
           "| method | " + " | ".join(sp) + " |", "|---|" + "---|" * len(sp)]
    for name, r in res["sweep"].items():
        out.append(f"| {name} | " + " | ".join(f"{r['mean'][s]:.1f} ± {r['std'][s]:.1f}" for s in sp) + " |")
    a = res.get("anchor")
    if a:
        n = str(a["num_grads"])
        ld = {k: v[n] for k, v in res["limited_data"].items()}
        out += ["", f"Limited data, 95% sparsity, {n} gradients: ours WoodFisher-block {ld['woodfisher']:.2f}%, "
                f"diagonal Fisher {ld['diag_fisher']:.2f}%, magnitude {ld['magnitude']:.2f}% (official repo from a "
                f"{a['dense_acc']}% model: WoodFisher-block {a['woodfisher_block']}%, K-FAC {a['kfac']}%, "
                f"diagonal Fisher {a['diag_fisher']}%)."]
    ac = res.get("anchor_conditions")
    if ac:
        r = ac["runs"]
        out += ["", f"The same under the official conditions (dense MLPNet trained until 94% validation accuracy: "
                    f"{ac['dense_test_acc']:.2f}% test, vs their {a['dense_acc']}%), 95% sparsity, 100 gradients, "
                    f"mean ± std over seeds: WoodFisher-block {r['woodfisher']['mean']:.2f} ± "
                    f"{r['woodfisher']['std']:.2f}% (official {a['woodfisher_block']}%), diagonal Fisher "
                    f"{r['diag_fisher']['mean']:.2f} ± {r['diag_fisher']['std']:.2f}% (official {a['diag_fisher']}%), "
                    f"magnitude {r['magnitude']['mean']:.2f}%."]
    js = res.get("joint_vs_single_update")
    if js:
        out += ["", "Several weights at once (WoodFisher block 2000, seed 0), test accuracy %: " + "; ".join(
            f"{s}: none {js['none'][s]['test_acc']:.1f} / summed single {js['single'][s]['test_acc']:.1f} / "
            f"exact joint {js['joint'][s]['test_acc']:.1f}" for s in js["none"]) + "."]
    gr = res.get("gradual_to_95")
    if gr:
        out += ["", "Gradual pruning to 95% (cubic schedule, 3 epochs, same schedule): " + ", ".join(
            f"{k} {v['test_acc']:.2f}%" for k, v in gr.items()) + "."]
    le = res.get("lenets_one_shot_then_finetune")
    if le:
        out += ["", "| model | method | " + " | ".join(f"{s}: one-shot -> 1 epoch fine-tune" for s in
                                                      ("0.9", "0.95", "0.98")) + " |", "|---|---|---|---|---|"]
        for model, methods in le.items():
            for meth, r in methods.items():
                out.append(f"| {model} | {meth} | " + " | ".join(
                    f"{r[s]['one_shot_acc']:.2f} -> {r[s]['finetuned_acc']:.2f}" for s in ("0.9", "0.95", "0.98"))
                    + " |")
    return "\n".join(out)


def render_compare() -> str:
    """The README's table of the committed `netsurgeon compare` run (docs/compare/lenet5_mnist/results.json)."""
    if not COMPARE.is_file():
        return "(no committed comparison)"
    r = json.loads(COMPARE.read_text())
    d, m, p = r["dense"], r["machine"], r["plan"]
    out = [f"{r['model']} on {r['data']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {r['date']}: "
           f"{len(r['rows'])} entries, {p['steps']:,} training steps each ({p['epochs']:.2f} epochs), "
           f"{r['total_s'] / 60:.1f} min of compressing in all (budget {r['budget_s'] / 60:.0f} min). Dense input: "
           f"{d['test_error_pct']:.2f}% test error, {d['file_bytes']:,} bytes.", "",
           "| method | stages | error % | weights / nonzero | file x smaller | speedup b1 | speedup b256 | "
           "compress s |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        stages = " + ".join(next(iter(s)) for s in x.get("stages", []))
        if x["status"] != "ok":
            out.append(f"| {x['name']} | {stages} | did not run: {x['error']} | | | | | |")
            continue
        lat = x["latency"]
        out.append(f"| {x['name']} | {stages} | {x['test_error_pct']:.2f} | {x['compression_weights']:.1f}x | "
                   f"{x['compression_bytes']:.1f}x | {lat['1']['speedup']:.2f}x | {lat['256']['speedup']:.2f}x | "
                   f"{x['wall_s']:.0f} |")
    return "\n".join(out)


def render_distributed() -> str:
    """The table of bench/results/distributed.json (README and docs/distributed.md): 1 vs 2 ranks."""
    path = ROOT / "bench" / "results" / "distributed.json"
    if not path.is_file():
        return "(bench/distributed.py not run yet)"
    r = json.loads(path.read_text())
    m, ratio = r["machine"], r["memory_ratio_2_vs_1_rank"]
    out = [f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; LeNet-5 (MNIST), WoodFisher B = "
           f"{r['fisher']['block_size']}, m = {r['fisher']['num_grads']}, one-shot to {100 * r['sparsity']:.0f}% "
           "(no fine-tuning). Memory per rank (the largest rank).", "",
           "| ranks x threads | fit s | inverses held GiB | estimate GiB | peak RSS in fit GiB (above start) | "
           "test error % | same mask as 1 rank | DNS step ms (batch 64) |", "|---|---|---|---|---|---|---|---|"]
    for row in r["table_rows"]:
        key = f"{row['ranks']}r{row['threads_per_rank']}t"
        above = max(a - b for a, b in zip(row["peak_rss_fit_gib_per_rank"], row["rss_before_fit_gib_per_rank"],
                                          strict=True))
        out.append(f"| {row['ranks']} x {row['threads_per_rank']} | {max(row['fit_s_per_rank']):.1f} | "
                   f"{max(row['held_inverse_gib_per_rank']):.2f} | {max(row['estimate_gib_per_rank']):.2f} | "
                   f"{max(row['peak_rss_fit_gib_per_rank']):.2f} ({above:.2f}) | {row['error_pct']:.2f} | "
                   f"{'yes' if r['same_mask_as_1_rank'][key] else 'NO'} | {row['dns_step_ms']:.1f} |")
    ref = r.get("reference_1_rank", "1 rank x 1 thread")
    out += ["", f"2 ranks vs {ref}: inverses held x{ratio['held_inverses']:.2f}, peak memory of the fit "
                f"above start x{ratio['peak_rss_fit_above_start']:.2f} (whole process x{ratio['peak_rss_fit']:.2f}). "
                f"Target (per-rank memory roughly halves, same mask): "
                f"{'met' if r['target_met'] else 'MISSED'}."]
    return "\n".join(out)


def _fill(text: str, start: str, end: str, body: str) -> str:
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text, flags=re.S)


def main() -> None:
    doc = ROOT / "docs" / "distributed.md"
    doc.write_text(_fill(doc.read_text(), DIST_START, DIST_END, render_distributed()))
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{render()}\n{END}", text, flags=re.S)
    new = re.sub(re.escape(RT_START) + ".*?" + re.escape(RT_END), lambda _: f"{RT_START}\n{render_runtime()}\n{RT_END}",
                 new, flags=re.S)
    new = re.sub(re.escape(CMP_START) + ".*?" + re.escape(CMP_END),
                 lambda _: f"{CMP_START}\n{render_compare()}\n{CMP_END}", new, flags=re.S)
    new = _fill(new, DIST_START, DIST_END, render_distributed())
    readme.write_text(new)
    print(render())


if __name__ == "__main__":
    main()
