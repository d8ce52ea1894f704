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
    out = _ok(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "sparsity=0.9",
                                  "--set", "rounds=2", "--set", "epochs=1", "--set", "lr=0.05",
                                  "--set", "value_dtype=float16", "-o", str(small)]))
    assert "smaller than the input model as dense float32" in out
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
    _ok(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "sparsity=0.5",
                            "--set", "epochs=0", "-o", str(tmp_path / "p.nsz")]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - magnitude: {sparsity: 0.6, scope: global, rounds: 1, epochs: 1}\n")
    _ok(runner.invoke(cli, ["compress", str(base), "--recipe", str(recipe), "--set", "sparsity=0.7",
                            "-o", str(tmp_path / "r.nsz")]))
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "r.nsz"), "--json", "--batch", "2"])))
    assert abs(s["nonzero"] / s["params"] - 0.3) < 0.02  # the --set value won over the recipe's


def test_train_resume_from_checkpoint(runner, tmp_path):
    ck = tmp_path / "c.ckpt"
    args = ["train", "--model", "digits_cnn", "--epochs", "1", "--checkpoint", str(ck), "-o", str(tmp_path / "m.st")]
    _ok(runner.invoke(cli, args))
    _ok(runner.invoke(cli, args + ["--resume"]))


@pytest.mark.parametrize("args,msg", [
    (["compress", "BASE", "--method", "magnitude", "--set", "sparsity=1.5", "-o", "X.nsz"],
     "magnitude: sparsity must be a number in [0, 1) or a mapping {layer: a number in [0, 1)}; got 1.5."),
    (["compress", "BASE", "--method", "magnitude", "--set", "sparsity=-0.1", "-o", "X.nsz"], "got -0.1."),
    (["compress", "BASE", "-o", "X.nsz"], "give --method NAME[,NAME...] or --recipe FILE"),
    (["compress", "BASE", "--method", "magnitude", "--data", "mnist", "-o", "X.nsz"], "needs --data-dir"),
    (["compress", "BASE", "--method", "dns", "--set", "sparsity=0.5", "-o", "X.nsz"],
     "no stage has an option 'sparsity'; valid keys: allow_empty_layers, batch_size, c_rate"),
    (["compress", "BASE", "--method", "prune", "-o", "X.nsz"], "unknown method 'prune'; valid methods: autoprune"),
    (["compress", "BASE", "--method", "kmeans,dns", "-o", "X.nsz"], "stage 2 'dns' needs float weights"),
    (["compress", "BASE", "--method", "woodfisher", "--set", "value_dtype=bogus", "-o", "X.nsz"],
     "encode: value_dtype must be one of ['float32', 'float16']; got 'bogus'."),
    (["compress", "BASE", "--method", "magnitude", "-o", "BASE"], "is the input file"),
    (["compress", "BASE", "--method", "magnitude", "-o", "NODIR/x.nsz"], "does not exist"),
    (["methods", "nope"], "unknown method 'nope'"),
    (["train", "--model", "lenet5", "--data", "mnist", "--data-dir", "NOWHERE", "-o", "X"],
     "data directory does not exist"),
    (["train", "--model", "resnet", "-o", "X"], "unknown model 'resnet'"),
    (["train", "--model", "no_such_pkg.mod:make", "-o", "X"], "cannot import module 'no_such_pkg.mod'"),
    (["train", "--model", "lenet300", "--resume", "-o", "X"], "--resume needs --checkpoint"),
    (["info", "BROKEN"], "truncated"),
    (["eval", "BROKEN"], "truncated"),
    (["info", "MISSING.nsz"], "no such file"),
    (["eval", "BASE", "--data", "digits"], None),
])
def test_bad_input_is_a_one_line_error_with_exit_2(runner, tmp_path, fake_mnist, args, msg):
    base = tmp_path / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))
    small = tmp_path / "s.nsz"
    _ok(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "epochs=0", "-o", str(small)]))
    broken = tmp_path / "broken.nsz"
    broken.write_bytes(small.read_bytes()[:-100])
    subst = {"BASE": str(base), "BROKEN": str(broken), "X.nsz": str(tmp_path / "x.nsz"), "X": str(tmp_path / "x"),
             "MISSING.nsz": str(tmp_path / "missing.nsz"), "NOWHERE": str(tmp_path / "nowhere"),
             "NODIR/x.nsz": str(tmp_path / "nodir" / "x.nsz"), "FAKE": str(fake_mnist)}
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
    out = _ok(runner.invoke(cli, ["compress", str(base), "--method", "dns", "--set", "c_rate=1.0", "--set", "epochs=3",
                                  "--set", "iter_stop=40", "--set", "gamma=0.01", "-o", str(tmp_path / "d.nsz")]))
    assert "test accuracy" in out
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "d.nsz"), "--json", "--batch", "4"])))
    assert s["nonzero"] < 0.3 * s["params"]


def test_compress_with_woodfisher(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "mlpnet", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["compress", str(base), "--method", "woodfisher", "--set", "sparsity=0.8",
                                  "--set", "num_grads=200", "--set", "block_size=500", "-o", str(tmp_path / "w.nsz")]))
    assert "test accuracy" in out
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "w.nsz"), "--json", "--batch", "4"])))
    assert abs(s["nonzero"] / s["params"] - 0.2) < 0.01


def test_deep_compression_from_cli(runner, tmp_path):
    base, pruned, small = tmp_path / "b.safetensors", tmp_path / "p.nsz", tmp_path / "s.nsz"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    _ok(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "sparsity=0.9",
                            "--set", "rounds=1", "--set", "epochs=1", "--set", "value_dtype=float16",
                            "-o", str(pruned)]))
    out = _ok(runner.invoke(cli, ["compress", str(pruned), "--method", "kmeans,finetune", "--set", "bits={fc: 4}",
                                  "--set", "epochs=1", "--set", "lr=0.001", "-o", str(small)]))
    assert "test accuracy" in out
    assert small.stat().st_size < 0.5 * pruned.stat().st_size
    info = _ok(runner.invoke(cli, ["info", str(small)]))
    assert "shared/15+H" in info and "pre-Huffman" in info
    assert max(len(line) for line in info.splitlines()) <= 100   # fits 100 columns off a terminal
    # the whole history survives chaining, and the input's float16 values stay float16
    assert "stage 1: magnitude (" in info and "stage 3: kmeans (bits={'fc': 4})" in info
    assert "stage 5: encode (value_dtype=float16)" in info
    r = runner.invoke(cli, ["compress", str(pruned), "--method", "kmeans", "--set", "bits=fc:4", "-o", str(small)])
    assert r.exit_code == 2 and "kmeans: bits must be" in r.output and "'fc:4'" in r.output
    r = runner.invoke(cli, ["compress", str(pruned), "--method", "kmeans", "--set", "bits={conv: 8}", "-o", str(small)])
    assert r.exit_code == 2 and "nothing was shared" in r.output


def test_compress_with_autoprune(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    _ok(runner.invoke(cli, ["compress", str(base), "--method", "autoprune", "--set", "mu=5", "--set", "epochs=3",
                            "-o", str(tmp_path / "a.nsz")]))
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(tmp_path / "a.nsz"), "--json", "--batch", "4"])))
    assert s["nonzero"] < 0.7 * s["params"] and s["test_accuracy"] > 0.85


def test_eval_table_lists_tensors(runner, tmp_path):
    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["eval", str(base), "--batch", "2"]))
    assert "nonzeros per tensor" in out and "fc1.weight" in out and "speedup vs dense" in out


def test_methods_lists_every_registered_method_and_its_options(runner):
    from netsurgeon.pipeline import methods

    out = _ok(runner.invoke(cli, ["methods"], terminal_width=200))
    for name in methods():
        assert f" {name} " in out
    out = _ok(runner.invoke(cli, ["methods", "woodfisher"], terminal_width=200))
    assert "Singh & Alistarh 2020" in out
    for key in ("sparsity", "num_grads", "block_size", "damp", "update"):
        assert f" {key} " in out


def test_compress_help_is_short(runner):
    out = _ok(runner.invoke(cli, ["compress", "--help"]))
    options = [line for line in out.split("Options:")[1].splitlines() if line.strip().startswith("-")]
    assert len(options) <= 16, options  # the run's own options only (16th: --checkpoint-dir); methods' go in --set
    assert "--c-rate" not in out and "--num-grads" not in out


USER_MODEL = """
import torch
from torch import nn


class TinyNet(nn.Module):
    \"\"\"A user's model: depthwise and grouped convs, Conv1d, BatchNorm and a residual add.\"\"\"

    def __init__(self, width=8, num_classes=10, pixels=64):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, width, 1, groups=2)
        self.seq = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width * pixels, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.pw(torch.relu(self.dw(h)))
        s = self.seq(h.flatten(2))
        return self.head(torch.relu(s).flatten(1))


def make(width=8, num_classes=10):
    return TinyNet(width, num_classes)
"""


def test_users_model_by_import_path_round_trips_and_needs_trust(runner, tmp_path, monkeypatch, digits):
    import torch
    from safetensors.torch import save_file

    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import userpkg.nets as nets

    torch.manual_seed(0)
    net = nets.make(width=6)
    import netsurgeon as ns

    ns.train(net, digits, ns.TrainConfig(epochs=2, lr=0.05))
    save_file(net.state_dict(), str(tmp_path / "mine.safetensors"))  # a plain state dict, no netsurgeon metadata
    out = tmp_path / "mine.nsz"
    _ok(runner.invoke(cli, ["compress", str(tmp_path / "mine.safetensors"), "--model", "userpkg.nets:make",
                            "--model-arg", "width=6", "--method", "magnitude,int8", "--set", "sparsity=0.5",
                            "--set", "epochs=1", "-o", str(out)]))
    r = runner.invoke(cli, ["eval", str(out), "--batch", "2"])
    assert r.exit_code == 2 and "code outside netsurgeon" in r.output and "--trust-code" in r.output
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(out), "--trust-code", "--json", "--batch", "2"])))
    assert s["test_accuracy"] > 0.5 and s["nonzero"] < 0.65 * s["params"]
    loaded = ns.load_compressed(out, trust_code=True)
    assert isinstance(loaded, nets.TinyNet) and loaded.dw.groups == 6
    without_file_meta = runner.invoke(cli, ["compress", str(tmp_path / "mine.safetensors"), "--method", "magnitude",
                                            "-o", str(tmp_path / "x.nsz")])
    assert without_file_meta.exit_code == 2 and "records no architecture" in without_file_meta.output


@pytest.mark.mnist
def test_model_and_data_that_do_not_fit_are_one_line_before_any_work(runner, tmp_path, mnist_dir):
    base = tmp_path / "digits.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))  # 8x8 inputs
    r = runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--data", "mnist", "--data-dir",
                            str(mnist_dir), "-o", str(tmp_path / "x.nsz")])
    assert r.exit_code == 2 and "does not accept inputs of shape [1, 28, 28] (mnist)" in r.output
    assert not (tmp_path / "x.nsz").exists()


def _quick_overrides(recipe):
    """--set values that shrink a recipe to seconds on the bundled digits (same stages, same options otherwise)."""
    from netsurgeon.pipeline import Pipeline

    out = []
    for i, st in enumerate(Pipeline.from_yaml(recipe).stages, 1):
        keys = st.config.to_dict()
        for key, value in (("epochs", 1), ("max_steps", 20), ("iter_stop", 10), ("stop", 10), ("num_grads", 16),
                           ("block_size", 256)):
            if key in keys and (key != "block_size" or keys[key] is not None):
                out += ["--set", f"{i}.{key}={value}"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["autoprune_lenet300", "deep_compression_lenet300", "dns_lenet300",
                                    "magnitude_lenet300", "magnitude_quality", "woodfisher_lenet300"])
def test_bundled_recipes_run_end_to_end(runner, tmp_path, recipe):
    from tests.conftest import REPO

    base = tmp_path / "b.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "3", "--lr", "0.05", "-o", str(base)]))
    path = REPO / "recipes" / f"{recipe}.yaml"
    out = _ok(runner.invoke(cli, ["compress", str(base), "--recipe", str(path), "--data", "digits",
                                  *_quick_overrides(path), "-o", str(tmp_path / "r.nsz")]))
    assert "test accuracy" in out
    info = _ok(runner.invoke(cli, ["info", str(tmp_path / "r.nsz")], terminal_width=200))
    assert "stage 1:" in info and "encode (value_dtype=float16" in info


@pytest.mark.slow
def test_small_resnet_through_the_cli_reloads_to_the_accuracy_compress_measured(runner, tmp_path):
    base = tmp_path / "r.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "resnet_small", "--model-arg", "width=4", "--model-arg",
                            "blocks=[1, 1]", "--epochs", "2", "--lr", "0.05", "-o", str(base)]))
    runs = {"dns,finetune,kmeans,finetune": ["1.epochs=1", "2.epochs=1", "4.epochs=1", "4.lr=0.001"],
            "woodfisher,int8": ["num_grads=16", "block_size=null"], "autoprune,qat": ["1.epochs=1", "2.epochs=1"]}
    for i, (methods, sets) in enumerate(runs.items()):
        out_file = tmp_path / f"m{i}.nsz"
        out = _ok(runner.invoke(cli, ["compress", str(base), "--method", methods,
                                      *[a for kv in sets for a in ("--set", kv)], "-o", str(out_file)]))
        acc = float(out.rsplit("test accuracy ", 1)[1].split("%")[0])
        s = json.loads(_ok(runner.invoke(cli, ["eval", str(out_file), "--json", "--batch", "2"])))
        assert s["test_accuracy"] * 100 == pytest.approx(acc, abs=0.006)
