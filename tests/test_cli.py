import json

import pytest

from netsurgeon.cli import cli


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_writes_everything_and_reports(runner, tmp_path):
    out = _ok(runner.invoke(cli, ["demo", "-o", str(tmp_path / "d")]))
    assert "before / after" in out and "speedup vs dense" in out
    for f in ("base.safetensors", "small.nsz", "kept.png", "summary.json"):
        assert (tmp_path / "d" / f).is_file()
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert s["after"]["file_bytes"] < s["before"]["file_bytes"] / 10
    assert s["after"]["nonzero"] < 0.1 * s["before"]["nonzero"]
    assert s["after"]["test_error_pct"] < 8.0


def test_train_compress_eval_info_pipeline(runner, tmp_path):
    base, small = tmp_path / "base.safetensors", tmp_path / "small.nsz"
    out = _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    assert "test accuracy" in out and base.is_file()
    out = _ok(runner.invoke(cli, ["compress", str(base), "--sparsity", "0.9", "--rounds", "2",
                                  "--finetune-epochs", "1", "--value-dtype", "float16", "-o", str(small)]))
    assert "smaller than dense float32" in out
    out = _ok(runner.invoke(cli, ["eval", str(small), "--json", "--batch", "8"]))
    s = json.loads(out)
    assert s["file_bytes"] == small.stat().st_size
    assert s["nonzero"] < 0.15 * s["params"] and s["test_accuracy"] > 0.85
    assert set(s["latency"]) == {"8"}
    out = _ok(runner.invoke(cli, ["info", str(small)]))
    assert "fc1.weight" in out and "sparse" in out and "kept %" in out


def test_compress_with_recipe_and_prune_only(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "1", "-o", str(base)]))
    _ok(runner.invoke(cli, ["compress", str(base), "--sparsity", "0.5", "--finetune-epochs", "0",
                            "-o", str(tmp_path / "p.nsz")]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\nsparsity: 0.6\nscope: global\nrounds: 1\nfinetune: {epochs: 1}\n")
    _ok(runner.invoke(cli, ["compress", str(base), "--recipe", str(recipe), "-o", str(tmp_path / "r.nsz")]))


def test_train_resume_from_checkpoint(runner, tmp_path):
    ck = tmp_path / "c.ckpt"
    args = ["train", "--model", "digits_cnn", "--epochs", "1", "--checkpoint", str(ck), "-o", str(tmp_path / "m.st")]
    _ok(runner.invoke(cli, args))
    _ok(runner.invoke(cli, args + ["--resume"]))


@pytest.mark.parametrize("args,msg", [
    (["compress", "BASE", "--sparsity", "1.5", "-o", "X.nsz", "--finetune-epochs", "0"],
     "sparsity must be a number in [0, 1)"),
    (["compress", "BASE", "-o", "X.nsz"], "give --sparsity, --quality or --recipe"),
    (["compress", "BASE", "--sparsity", "0.5", "--data", "mnist", "-o", "X.nsz"], "needs --data-dir"),
    (["train", "--model", "lenet5", "--data", "mnist", "--data-dir", "NOWHERE", "-o", "X"],
     "data directory does not exist"),
    (["train", "--model", "resnet", "-o", "X"], "Invalid value for '--model'"),
    (["train", "--model", "lenet300", "--resume", "-o", "X"], "--resume needs --checkpoint"),
    (["info", "BROKEN"], "truncated"),
    (["eval", "BROKEN"], "truncated"),
    (["info", "MISSING.nsz"], "no such file"),
    (["eval", "BASE", "--data", "digits"], None),
])
def test_bad_input_is_a_one_line_error_with_exit_2(runner, tmp_path, args, msg):
    base = tmp_path / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))
    small = tmp_path / "s.nsz"
    _ok(runner.invoke(cli, ["compress", str(base), "--sparsity", "0.5", "--finetune-epochs", "0", "-o", str(small)]))
    broken = tmp_path / "broken.nsz"
    broken.write_bytes(small.read_bytes()[:-100])
    subst = {"BASE": str(base), "BROKEN": str(broken), "X.nsz": str(tmp_path / "x.nsz"), "X": str(tmp_path / "x"),
             "MISSING.nsz": str(tmp_path / "missing.nsz"), "NOWHERE": str(tmp_path / "nowhere")}
    r = runner.invoke(cli, [subst.get(a, a) for a in args])
    if msg is None:
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert "Traceback" not in r.output
    error_lines = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    assert not (tmp_path / "x.nsz").exists()


def test_compress_with_dns(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["compress", str(base), "--method", "dns", "--c-rate", "1.0", "--epochs", "3",
                                  "--iter-stop", "40", "--gamma", "0.01", "-o", str(tmp_path / "d.nsz")]))
    assert "test accuracy" in out
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "d.nsz"), "--json", "--batch", "4"])))
    assert s["nonzero"] < 0.3 * s["params"]


def test_compress_with_woodfisher(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "mlpnet", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["compress", str(base), "--method", "woodfisher", "--sparsity", "0.8",
                                  "--num-grads", "200", "--block-size", "500", "--finetune-epochs", "0",
                                  "-o", str(tmp_path / "w.nsz")]))
    assert "test accuracy" in out
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "w.nsz"), "--json", "--batch", "4"])))
    assert abs(s["nonzero"] / s["params"] - 0.2) < 0.01
    r = runner.invoke(cli, ["compress", str(base), "--method", "woodfisher", "-o", str(tmp_path / "x.nsz")])
    assert r.exit_code == 2 and "needs --sparsity" in r.output


def test_deep_compression_from_cli(runner, tmp_path):
    base, pruned, small = tmp_path / "b.safetensors", tmp_path / "p.nsz", tmp_path / "s.nsz"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    _ok(runner.invoke(cli, ["compress", str(base), "--sparsity", "0.9", "--rounds", "1", "--finetune-epochs", "1",
                            "-o", str(pruned)]))
    out = _ok(runner.invoke(cli, ["compress", str(pruned), "--method", "none", "--share-bits", "fc=4",
                                  "--centroid-epochs", "1", "-o", str(small)]))
    assert "test accuracy" in out
    assert small.stat().st_size < 0.4 * pruned.stat().st_size
    info = _ok(runner.invoke(cli, ["info", str(small)]))
    assert "shared (15 values," in info and "Huffman)" in info and "bytes before" in info
    r = runner.invoke(cli, ["compress", str(pruned), "--method", "none", "--share-bits", "fc:4", "-o", str(small)])
    assert r.exit_code == 2 and "--share-bits" in r.output


def test_compress_with_autoprune(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    _ok(runner.invoke(cli, ["compress", str(base), "--method", "autoprune", "--mu", "5", "--epochs", "3",
                            "-o", str(tmp_path / "a.nsz")]))
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "a.nsz"), "--json", "--batch", "4"])))
    assert s["nonzero"] < 0.7 * s["params"] and s["test_accuracy"] > 0.85


def test_eval_table_lists_tensors(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["eval", str(base), "--batch", "2"]))
    assert "nonzeros per tensor" in out and "fc1.weight" in out and "speedup vs dense" in out
