"""netsurgeon compare: the budget, the entries, resuming, bad input, and the report a browser shows."""

import json
import shlex
import shutil
import subprocess

import pytest
import torch
from torch import nn

from netsurgeon.cli import cli
from netsurgeon.compare import (
    Plan,
    layer_kept,
    not_in_suite,
    pareto_front,
    parse_budget,
    read_pipelines,
    suite,
    suite_entries,
)
from netsurgeon.pipeline import Pipeline, methods


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("text, sec", [("20m", 1200), ("90s", 90), ("1h30m", 5400), ("45", 45), ("1.5m", 90)])
def test_parse_budget(text, sec):
    assert parse_budget(text) == sec


@pytest.mark.parametrize("text", ["ten minutes", "20x", "0", "5m junk", ""])
def test_parse_budget_refuses_quoting_the_value(text):
    with pytest.raises(ValueError, match="--budget") as e:
        parse_budget(text)
    assert repr(text) in str(e.value)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(10, 5.0), (20, 1.0), (5, 9.0), (15, 6.0), (30, 1.0), (5, 8.0)]
    assert pareto_front(pts) == [5, 0, 1]  # (5, 8), (10, 5), (20, 1); (5, 9), (15, 6), (30, 1) are dominated


def test_plan_gives_steps_as_epochs_and_a_cap():
    p = Plan(steps=250, steps_per_epoch=100)
    assert p.train() == {"epochs": 3, "batch_size": 64, "max_steps": 250}
    assert p.train(0.5) == {"epochs": 2, "batch_size": 64, "max_steps": 125}
    assert Plan(steps=200, steps_per_epoch=100).train() == {"epochs": 2, "batch_size": 64}


def test_every_suite_entry_is_a_valid_pipeline_with_the_same_budget():
    plan = Plan(steps=300, steps_per_epoch=100, sparsity=0.8)
    entries = suite_entries(plan)
    assert [e.name for e in entries] == list(suite())
    for e in entries:
        pipe = Pipeline.from_spec(e.stages, source=e.name)
        pipe.check(has_data=True)
        if e.name not in ("int8", "gptq", "rtn"):  # post-training quantizers train nothing
            assert e.train_steps == 300, e.name
    # every compressor of the registry has a row (the rest are stages of rows, named with the reason)
    used = {next(iter(s)) for e in entries for s in e.stages}
    assert set(methods()) - used <= set(not_in_suite())


def test_unknown_entry_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown method\(s\) 'dsn'; valid: .*magnitude, magnitude_global"):
        suite_entries(Plan(10, 10), ["dsn"])
    with pytest.raises(ValueError, match="fine-tuning stage"):
        suite_entries(Plan(10, 10), ["distill"])


def test_read_pipelines_fills_the_budget(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("pipelines:\n  mine:\n    - magnitude: {sparsity: 0.8, budget: 0.5}\n    - kmeans: {bits: 4}\n"
                 "    - finetune: {epochs: budget, lr: 0.001}\n")
    (e,) = read_pipelines(f, Plan(steps=100, steps_per_epoch=40))
    assert e.stages[0] == {"magnitude": {"sparsity": 0.8, "epochs": 2, "batch_size": 64, "max_steps": 50}}
    assert e.stages[2]["finetune"] == {"lr": 0.001, "epochs": 3, "batch_size": 64, "max_steps": 100}
    assert e.train_steps == 150
    f.write_text("pipelines:\n  mine:\n    - magnitude: {budget: 2}\n")
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]; got 2"):
        read_pipelines(f, Plan(10, 10))
    f.write_text("stages: [magnitude]\n")
    with pytest.raises(ValueError, match="must hold 'pipelines"):
        read_pipelines(f, Plan(10, 10))


def test_a_pipeline_named_like_a_built_in_entry_is_refused(tmp_path):
    from netsurgeon.compare import plan_entries

    f = tmp_path / "p.yaml"
    f.write_text("pipelines:\n  dns:\n    - magnitude: {budget: 1}\n")
    with pytest.raises(ValueError, match=r"names \['dns'\], which are also built-in entries"):
        plan_entries(Plan(10, 10), ["dns", "int8"], f)
    assert [e.name for e in plan_entries(Plan(10, 10), None, f)] == ["dns"]  # alone, it is just a name


@pytest.mark.slow  # end to end, seconds: run by .ci/run with the slow cases
def test_python_api_compares_a_users_model(tmp_path, digits):
    """ns.run_comparison on a model built in Python (no file): the same results as the CLI's."""
    import netsurgeon as ns

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ns.train(model, digits, ns.TrainConfig(epochs=3, lr=0.05))
    r = ns.run_comparison(model, digits, tmp_path / "rep", methods=["magnitude", "l1_filters"], budget=1,
                          repeats=5, threads=1, data_name="digits", progress=False, batches=(1, 8))
    rows = {x["name"]: x for x in r["rows"]}
    assert r["batches"] == [1, 8] and set(rows["magnitude"]["latency"]) == {"1", "8"}  # compare --batch 1,8
    assert "b8 x" in (tmp_path / "rep" / "index.html").read_text()
    assert rows["magnitude"]["status"] == "ok" and rows["l1_filters"]["status"] == "ok"
    assert rows["l1_filters"]["layer_kept_pct"]["1"] == pytest.approx(50.0)  # half of the hidden neurons gone
    assert (tmp_path / "rep" / "index.html").is_file() and (tmp_path / "rep" / "files" / "_dense.safetensors").is_file()


@pytest.mark.slow  # end to end, seconds: run by .ci/run with the slow cases
def test_fixed_steps_give_the_same_files_in_any_run(tmp_path, digits):
    import netsurgeon as ns

    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.05))
    for d in ("a", "b"):
        r = ns.run_comparison(model, digits, tmp_path / d, methods=["magnitude"], steps=30, repeats=5, threads=1,
                              progress=False)
        assert r["plan"]["steps"] == r["rows"][0]["train_steps"] == 30
    assert (tmp_path / "a/files/magnitude.nsz").read_bytes() == (tmp_path / "b/files/magnitude.nsz").read_bytes()


def test_layer_kept_counts_factor_and_pruned_layers_against_the_dense_layer():
    dense = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    small = nn.Sequential(nn.Sequential(nn.Linear(10, 2, bias=False), nn.Linear(2, 8)), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        small[2].weight[:, :4] = 0
    kept = layer_kept(small, dense)
    assert kept == {"0": pytest.approx(100 * (20 + 16) / 80), "2": pytest.approx(50.0)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One small comparison on the bundled digits: two methods that run and one that cannot on this model."""
    from click.testing import CliRunner

    d = tmp_path_factory.mktemp("cmp")
    runner = CliRunner()
    base = d / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["compare", str(base), "--methods", "magnitude,int8,slimming", "--steps", "30",
                                  "--repeats", "5", "--threads", "1", "-o", str(d / "rep")]))
    return d, out, runner


def test_compare_writes_a_report_of_measured_files(report):
    d, out, _ = report
    assert "2 of 3 methods ran" in out
    res = json.loads((d / "rep" / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["slimming"]["status"] == "failed" and "BatchNorm" in rows["slimming"]["error"]
    mag = rows["magnitude"]
    assert mag["file_bytes"] == (d / "rep" / mag["file"]).stat().st_size  # the number is the file's
    assert mag["compression_weights"] == pytest.approx(10.0, rel=0.05)  # 90% of the weights removed
    assert mag["train_steps"] == res["plan"]["steps"] > 0
    assert rows["int8"]["compression_bytes"] > 3.0 and rows["int8"]["train_steps"] == 0
    assert set(mag["latency"]) == {"1", "256"} and mag["latency"]["1"]["speedup"] > 0
    assert res["dense"]["file_bytes"] == (d / "base.safetensors").stat().st_size
    assert "--steps 30" in res["command"] and res["command"].startswith("netsurgeon compare ")
    words = shlex.split(res["command"])  # paths as typed from the working directory: no machine's absolute prefix
    assert not any(w.startswith("/") for w in words) and any(w.endswith("base.safetensors") for w in words)
    page = (d / "rep" / "index.html").read_text()
    assert page.count("<svg") == 5 and "magnitude" in page and "BatchNorm" in page and "http" not in page.split(
        "<svg")[0]


def test_the_page_is_a_pure_function_of_results_json(report):
    """The page can be re-made from results.json alone, byte for byte (no dates or random ids in the SVGs)."""
    from netsurgeon.compare_html import render

    d, _, _ = report
    res = json.loads((d / "rep" / "results.json").read_text())
    assert render(res) == render(res) == (d / "rep" / "index.html").read_text()


def test_compare_resumes_without_rerunning_finished_methods(report):
    d, _, runner = report
    (d / "rep" / "runs" / "int8.json").unlink()  # as if interrupted while int8 ran
    before = json.loads((d / "rep" / "runs" / "magnitude.json").read_text())
    out = _ok(runner.invoke(cli, ["compare", str(d / "base.safetensors"), "--methods", "magnitude,int8,slimming",
                                  "--steps", "30", "--repeats", "5", "--threads", "1", "-o", str(d / "rep")]))
    assert "magnitude: done before" in out and "int8: done before" not in out
    assert json.loads((d / "rep" / "runs" / "magnitude.json").read_text()) == before
    assert (d / "rep" / "runs" / "int8.json").is_file()


@pytest.mark.parametrize("args, msg", [
    (["missing.safetensors", "-o", "r"], "model file 'missing.safetensors' does not exist"),
    (["BASE", "--budget", "ten", "-o", "r"], "--budget takes a duration like 20m, 90s, 1h or 1h30m; got 'ten'"),
    (["BASE", "--methods", "magnitude,dsn", "-o", "r"], "unknown method(s) 'dsn'"),
    (["BASE"], "give -o/--output DIR"),
    (["BASE", "--batch", "1,x", "-o", "r"], "give positive batch sizes separated by commas"),
    (["-o", "r"], "give MODEL_FILE"),
])
def test_compare_bad_input_is_one_line_before_any_work(report, tmp_path, args, msg):
    d, _, runner = report
    args = [str(d / "base.safetensors") if a == "BASE" else str(tmp_path / a) if a == "r" else a for a in args]
    r = runner.invoke(cli, ["compare", *args])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_compare_list_names_every_entry(runner):
    out = _ok(runner.invoke(cli, ["compare", "--list"]))
    assert all(name in out for name in suite())


def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser (apt-get install chromium)")
def test_report_renders_in_a_real_browser(report, tmp_path):
    """Chromium opens the page: no console message or script error, the table and plots are in the DOM after
    the script ran, and the screenshot is a real picture (not blank)."""
    d, _, _ = report
    url = (d / "rep" / "index.html").as_uri()
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1800"]
    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr") == 1 + 1 + 3 and dom.count("<svg") == 5  # header, dense, three methods
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert img[..., :3].std() > 0.05  # text and plots, not an empty page


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("lenet300", {"obs": "4096 weights", "slimming": "BatchNorm", "separable": "Conv2d", "heads": "attention only"}),
    ("digits_cnn", {"obs": "4096 weights", "slimming": "BatchNorm", "heads": "attention only"}),
    ("vgg_small", {"obs": "4096 weights", "heads": "attention only"}),  # slimming runs; K-FAC prunes the Linears
])
def test_every_built_in_entry_runs_or_says_why(tmp_path, digits, name, expected):
    """All 36 entries on an MLP, a CNN and a CNN with BatchNorm (10 steps each): each writes a file that reads
    back and is measured, or fails with its one-line reason (no convolution, no BatchNorm, too many weights for an
    exact Hessian, no attention to remove heads from)."""
    import netsurgeon as ns

    torch.manual_seed(0)
    model = ns.build_model(name, digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.05))
    r = ns.run_comparison(model, digits, tmp_path / "all", steps=10, repeats=5, threads=1, data_name="digits",
                          progress=False)
    failed = {x["name"]: x["error"] for x in r["rows"] if x["status"] != "ok"}
    assert set(failed) == set(expected), failed
    assert all(expected[k] in failed[k] for k in expected), failed
    for x in r["rows"]:
        if x["status"] == "ok":
            assert (tmp_path / "all" / x["file"]).stat().st_size == x["file_bytes"]
            assert 0 <= x["test_error_pct"] <= 100 and x["latency"]["1"]["speedup"] > 0


# -- issue 39, items 9i-9k: a collapsed entry, the budget, the page of an interrupted run -------------------------
@pytest.fixture(scope="module")
def small_mlp(digits):
    import netsurgeon as ns

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.05))
    return model


def _compare(model, digits, out, **kw):
    import netsurgeon as ns

    return ns.run_comparison(model, digits, out, **{"methods": ["magnitude", "int8"], "steps": 3, "repeats": 2,
                                                    "threads": 1, "data_name": "digits", "progress": False, **kw})


@pytest.mark.slow  # end to end, seconds: run by .ci/run with the slow cases
def test_an_entry_at_chance_accuracy_is_warned_about_and_kept_off_the_fronts(tmp_path, digits, small_mlp,
                                                                              monkeypatch, caplog):
    """9i: an entry that ends at chance (DNS at 200 steps: 11.35%) is flagged and logged; the page keeps it in the
    table without a star although its file is the smallest, says why, and the error axes stay on the useful range
    (the DNS row once stretched them to 130%)."""
    import logging

    from netsurgeon import compare as cmp
    from netsurgeon import compare_html
    from netsurgeon.stats import chance_accuracy

    chance = chance_accuracy(digits)
    real = cmp._run_entry

    def collapse_magnitude(entry, *a, **k):
        r = real(entry, *a, **k)
        if entry.name == "magnitude":  # a constant prediction: the most frequent class's share
            r.update(test_accuracy=chance, test_error_pct=100 * (1 - chance))
        return r

    monkeypatch.setattr(cmp, "_run_entry", collapse_magnitude)
    with caplog.at_level(logging.WARNING):
        res = _compare(small_mlp, digits, tmp_path / "rep")
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["magnitude"]["collapsed"] is True and rows["int8"]["collapsed"] is False
    assert rows["magnitude"]["file_bytes"] < rows["int8"]["file_bytes"]  # it would be on the front
    assert "magnitude ended at chance accuracy" in caplog.text and "int8 ended" not in caplog.text
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "magnitude <small>(collapsed: chance accuracy)</small>" in page and "int8 &#9733;" in page
    assert "magnitude &#9733;" not in page and "<b>Collapsed to chance accuracy</b>" in page
    tops = []
    monkeypatch.setattr(compare_html, "_svg", lambda fig: tops.append(fig.axes[0].get_ylim()[1]) or "<svg></svg>")
    compare_html.render(res)
    assert len(tops) >= 4 and all(top < rows["magnitude"]["test_error_pct"] / 2 for top in tops[:4]), tops  # fronts


@pytest.mark.slow  # end to end, seconds: run by .ci/run with the slow cases
def test_a_run_over_its_budget_is_warned_about_and_the_page_says_what_the_budget_excludes(tmp_path, digits,
                                                                                            small_mlp, caplog):
    """9j: `compare --budget 3m` ran 4.6 min with no word: the budget plans the training steps; a run that takes
    longer is logged and its page says what the budget does not cap."""
    import logging

    from netsurgeon.compare_html import render

    with caplog.at_level(logging.WARNING):
        res = _compare(small_mlp, digits, tmp_path / "rep", methods=["int8"], budget=0.01)
    assert res["wall_s_this_run"] > 0.011
    assert "of the 0.0 min budget" in caplog.text and "the budget plans the training steps" in caplog.text
    note = "The run took longer than its budget"
    assert note in (tmp_path / "rep" / "index.html").read_text()
    assert note not in render({**res, "budget_s": 3600.0})  # within budget: no note


def test_the_page_is_written_after_each_entry(tmp_path, digits, small_mlp, monkeypatch):
    """9k: an interrupted comparison (Ctrl-C in the second entry) leaves a page with the finished entry and the
    pending ones named, not only runs/*.json."""
    from netsurgeon import compare as cmp

    out = tmp_path / "rep"
    real, seen = cmp._run_entry, []

    def interrupt_int8(entry, *a, **k):
        if entry.name == "int8":
            seen.append((out / "index.html").read_text())  # the page as it stood when the second entry began
            raise KeyboardInterrupt
        return real(entry, *a, **k)

    monkeypatch.setattr(cmp, "_run_entry", interrupt_int8)
    with pytest.raises(KeyboardInterrupt):
        _compare(small_mlp, digits, out)
    (page,) = seen
    assert ">magnitude" in page and "<b>Incomplete:</b> 1 entries not run yet (int8)" in page
    assert (out / "index.html").read_text() == page
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and res["pending"] == ["int8"] and [r["name"] for r in res["rows"]] == [
        "magnitude"]


def test_a_row_that_left_layers_as_they_were_says_which_and_why(tmp_path, digits, small_mlp, caplog):
    """obc skips layers wider than its max_columns; the LeNet-5 report showed its row at 1.0x with no word why."""
    import logging

    from netsurgeon.compare import Entry, Plan, compare

    plan = Plan(steps=3, steps_per_epoch=Plan.epoch_steps(digits))
    entry = Entry("obc_narrow", "pruning", [{"obc": {"sparsity": 0.5, "max_columns": 40}}])
    with caplog.at_level(logging.WARNING):
        res = compare(small_mlp, digits, tmp_path / "rep", entries=[entry], plan=plan, batches=(1,), repeats=2,
                      threads=1, data_name="digits", progress=False)
    row = next(r for r in res["rows"] if r["name"] == "obc_narrow")
    assert set(row["skipped"]) == {"1"} and "max_columns=40" in row["skipped"]["1"]
    assert "obc_narrow left 1 layer(s) as they were: 1 (" in caplog.text
    assert "(left 1 layer(s) as they were: 1)" in (tmp_path / "rep" / "index.html").read_text()
