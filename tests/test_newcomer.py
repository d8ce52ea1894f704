"""What a new user hits first (issue 11): one test per item, CLI items in-process."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import netsurgeon as ns
from netsurgeon.cli import cli
from netsurgeon.coding.container import read_container, write_container


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def _err(result, msg):
    assert result.exit_code == 2, result.output
    assert msg in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


@pytest.fixture
def base(runner, tmp_path):
    path = tmp_path / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(path)]))
    return path


@pytest.mark.slow  # seconds (a subprocess, a large model or tensor): run by .ci/run
def test_same_seed_same_weights_for_train_and_demo(runner, tmp_path):
    for name in ("a", "b"):
        _ok(runner.invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "1", "--seed", "3",
                                "-o", str(tmp_path / f"{name}.safetensors")]))
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    _ok(runner.invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "1", "--seed", "4",
                            "-o", str(tmp_path / "c.safetensors")]))
    c = load_file(str(tmp_path / "c.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    from netsurgeon.demo import run_demo

    runs = [run_demo(tmp_path / f"demo{i}") for i in range(2)]
    assert runs[0]["after"]["test_error_pct"] == runs[1]["after"]["test_error_pct"]
    assert (tmp_path / "demo0" / "small.nsz").read_bytes() == (tmp_path / "demo1" / "small.nsz").read_bytes()


def test_arguments_are_checked_before_any_data_is_loaded(runner, base, tmp_path):
    nowhere = str(tmp_path / "nowhere")
    _err(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "sparsity=1.5", "--data",
                             "mnist", "--data-dir", nowhere, "-o", str(tmp_path / "x.nsz")]), "got 1.5.")
    _err(runner.invoke(cli, ["compress", str(base), "--method", "woodfisher", "--set", "index_bits=40", "--data",
                             "mnist", "--data-dir", nowhere, "-o", str(tmp_path / "x.nsz")]),
         "encode: index_bits must be an integer in [1, 16] or one of ['auto'] or a mapping {layer: an integer in "
         "[1, 16]}; got 40.")
    # a --data-dir is never silently ignored
    _err(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--data-dir", nowhere,
                             "-o", str(tmp_path / "x.nsz")]), "trained on the bundled digits, but --data-dir")
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--data-dir", nowhere, "-o", str(tmp_path / "y")]),
         "data directory does not exist")
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--data", "digits", "--data-dir", nowhere,
                             "-o", str(tmp_path / "y")]), "--data digits is bundled and takes no --data-dir")


def test_nan_weights_are_refused_on_every_load(runner, base, tmp_path):
    state = load_file(str(base))
    state["fc1.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match="'fc1.weight' holds 1 NaN/inf"):
        ns.modelfile.load_model(bad, ns.build_model("lenet300", (1, 8, 8)))
    good = tmp_path / "good.nsz"
    _ok(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "epochs=0", "--set",
                            "scope=global", "-o", str(good)]))
    header, blobs = read_container(good)
    name = "fc3.bias/values"   # stored dense float32
    blobs[name] = bytes(4 * 0) + b"\x00\x00\xc0\x7f" + blobs[name][4:]
    header.pop("blobs")
    write_container(tmp_path / "nan.nsz", header, blobs)
    _err(runner.invoke(cli, ["eval", str(tmp_path / "nan.nsz")]), "'fc3.bias' holds 1 NaN/inf value(s)")
    _err(runner.invoke(cli, ["compress", str(tmp_path / "nan.nsz"), "--method", "finetune",
                             "-o", str(tmp_path / "y.nsz")]), "NaN/inf")


def test_resume_with_another_models_checkpoint_is_one_line(runner, tmp_path):
    ck = tmp_path / "c.ckpt"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "--checkpoint", str(ck),
                            "-o", str(tmp_path / "a.safetensors")]))
    _err(runner.invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "1", "--checkpoint", str(ck), "--resume",
                             "-o", str(tmp_path / "b.safetensors")]), "holds another model's weights")


def test_written_files_honour_the_umask(runner, tmp_path):
    old = os.umask(0o022)
    try:
        _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(tmp_path / "a.st")]))
        _ok(runner.invoke(cli, ["compress", str(tmp_path / "a.st"), "--method", "magnitude", "--set", "epochs=0",
                                "-o", str(tmp_path / "a.nsz")]))
        os.umask(0o077)
        ns.save_compressed(ns.build_model("lenet300", (1, 8, 8)), tmp_path / "private.nsz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.st").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.nsz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.nsz").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_threads_option_on_every_command(runner, base, tmp_path):
    before = torch.get_num_threads()
    try:
        _ok(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "epochs=0", "--threads", "1",
                                "-o", str(tmp_path / "t.nsz")]))
        assert torch.get_num_threads() == 1
        s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "t.nsz"), "--threads", "1", "--json",
                                               "--batch", "2"])))
        assert s["latency"]["2"]["threads"] == 1
        for cmd in (["train"], ["demo"]):
            assert "--threads" in _ok(runner.invoke(cli, [*cmd, "--help"]))
    finally:
        torch.set_num_threads(before)


def test_data_set_comes_from_the_model_file(runner, tmp_path):
    from netsurgeon.modelfile import save_model

    save_model(ns.build_model("lenet300"), tmp_path / "m.safetensors", meta={"data": "fashion-mnist"})
    _err(runner.invoke(cli, ["compress", str(tmp_path / "m.safetensors"), "--method", "magnitude", "--set", "epochs=0",
                             "-o", str(tmp_path / "x.nsz")]), "data set 'fashion-mnist' needs --data-dir")
    _err(runner.invoke(cli, ["eval", str(tmp_path / "m.safetensors")]), "data set 'fashion-mnist' needs --data-dir")


def test_speed_columns_come_from_one_interleaved_measurement(runner, tmp_path):
    from netsurgeon.report import summarize, summary_table

    out = _ok(runner.invoke(cli, ["demo", "-o", str(tmp_path / "d")], terminal_width=120))
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    for b, lat in s["after"]["latency"].items():
        assert lat["speedup"] == pytest.approx(lat["dense_ms"] / lat["runtime_ms"])
        assert f"{lat['runtime_ms']:.3f} / {lat['dense_ms']:.3f}" in out, b
    m = ns.build_model("lenet300", (1, 8, 8))
    dense = ns.build_model("lenet300", (1, 8, 8))
    calls = []
    dense.register_forward_hook(lambda *a: calls.append(1))
    r = summarize(m, (1, 8, 8), batches=(4,), repeats=5, reference=dense)
    assert len(calls) == 5 + 10  # the reference is what "dense" was timed on (warm-up 10, then 5 runs)
    assert "batch 4: runtime / dense ms" in str(summary_table({"x": r}).columns[0]._cells)


def test_help_and_usage_errors_answer_without_importing_torch(tmp_path):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        from netsurgeon.cli import cli
        for args in (["--help"], ["compress", "--help"], ["compress", "x.st", "-o", "y.nsz"], ["train", "-o", "y"]):
            try:
                cli(args, standalone_mode=False)
            except Exception:
                pass
        print("torch imported:", "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_long_phases_show_progress_off_a_terminal(runner, base, tmp_path, monkeypatch):
    from netsurgeon.progress import Progress

    monkeypatch.setattr(Progress, "every_s", 0.0)  # a line per update instead of every few seconds
    r = runner.invoke(cli, ["compress", str(base), "--method", "woodfisher,magnitude", "--set", "num_grads=20",
                            "--set", "block_size=500", "--set", "2.sparsity=0.95", "--set", "2.epochs=1",
                            "--set", "rounds=2", "-o", str(tmp_path / "w.nsz")])
    out = _ok(r)
    for line in ("stage 1/3: woodfisher", "woodfisher: 50,200 weights, 20 gradients: about", "gradients: 10/20",
                 "woodfisher: inverting", "stage 2/3: magnitude", "magnitude round 2/2: kept",
                 "train: done", "stage 3/3: encode"):
        assert line in out, line


def test_progress_time_left_counts_only_this_runs_units(monkeypatch, caplog):
    """A resumed phase (start=500 of 4000) estimates the time left from the units done since it started: 100
    units in 10 s leave 3400 units, about 340 s (not 10 s / 600 x 3400 = 57 s)."""
    import logging

    from netsurgeon import progress

    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="netsurgeon.progress"):
        bar = progress.Progress("train", 4000, start=500)
        bar.update(600)
    assert "600/4000 (10 s, about 340 s left)" in caplog.text
