"""Issue 39 (what a review and a run on real architectures found), the items of the storage, architecture and
command-line layers: each test failed before its fix."""

import json
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import netsurgeon as ns
from netsurgeon.cli import cli
from netsurgeon.forms.hashed import HashedWeights


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def _err(result, msg):
    assert result.exit_code == 2, result.output
    assert msg in result.output, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's model module in its own directory (importable as ``mynets``)."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def classifier(num_classes=1000, width=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))

        def staged(depth=3):
            # a RegNet-like width rule computed with tensor ops (.tolist() fails on the meta device)
            widths = (torch.arange(depth) * 4 + 8).tolist()
            layers, c = [nn.Flatten()], 64
            for w in widths:
                layers += [nn.Linear(c, w), nn.ReLU()]
                c = w
            return nn.Sequential(*layers, nn.Linear(c, 10))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynets", None)
    yield tmp_path
    sys.modules.pop("mynets", None)


def test_hashed_layer_without_sign_hash_round_trips(tmp_path):
    """#39.2: use_sign=False was not stored; the reader applied signs and outputs differed by up to 0.2."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8))
    torch.nn.utils.parametrize.register_parametrization(m[0], "weight", HashedWeights((8, 16), 20, 5, use_sign=False),
                                                        unsafe=True)
    x = torch.randn(3, 16)
    ref = m(x).detach()
    ns.nsz.save_compressed(m, tmp_path / "h.nsz", arch={"factory": "netsurgeon.nope:x", "kwargs": {}})
    plain = nn.Sequential(nn.Linear(16, 8))
    back = ns.load_compressed(tmp_path / "h.nsz", plain, keep_codecs=True)
    assert ns.forms.stored_parametrization(back[0], "weight")[1].use_sign is False
    torch.testing.assert_close(back(x), ref)
    dense = ns.load_compressed(tmp_path / "h.nsz", nn.Sequential(nn.Linear(16, 8)))
    torch.testing.assert_close(dense(x), ref)


def test_a_factorys_own_num_classes_reaches_it(user_module, tmp_path):
    """#39.4 / #36.3: build_model's own num_classes swallowed the factory's (1,000 classes were built)."""
    m = ns.build_model("mynets:classifier", (1, 8, 8), num_classes=10)
    assert m[-1].out_features == 10 and ns.models.arch_of(m)["kwargs"] == {"num_classes": 10}
    path = tmp_path / "c.nsz"
    ns.nsz.save_compressed(m, path)
    assert ns.load_compressed(path, trust_code=True)[-1].out_features == 10


def test_a_factory_that_builds_with_tensor_ops_rebuilds_from_its_file(user_module, tmp_path):
    """#39.4 / #36.3: the meta-device build of a factory calling .tolist() failed, so the file never loaded."""
    torch.manual_seed(0)
    m = ns.build_model("mynets:staged", (1, 8, 8), depth=3)
    ns.pruning.magnitude.prune_magnitude(m, sparsity=0.5)
    path = tmp_path / "s.nsz"
    ns.nsz.save_compressed(m, path)
    back = ns.load_compressed(path, trust_code=True)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x), m(x))
    with pytest.raises(ValueError, match="cannot rebuild the recorded architecture on the meta device.*more than"):
        ns.architecture.rebuild_matching(ns.models.arch_of(m), {k: tuple(v.shape) for k, v in m.state_dict().items()},
                                         trust_code=True, real_build_bytes=100)


def test_structured_pruning_of_a_tensor_op_factory_counts_against_its_original(runner, user_module, tmp_path,
                                                                              monkeypatch):
    """#39.4b: compress --method l1_filters on such a factory wrote the file, then crashed building the original
    architecture on the meta device (and the file's size was put against the pruned tensors)."""
    monkeypatch.chdir(user_module)
    base = tmp_path / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "mynets:staged", "--epochs", "1", "--max-steps", "3",
                            "-o", str(base)]))
    out = _ok(runner.invoke(cli, ["compress", str(base), "--method", "l1_filters", "--set", "fraction=0.5",
                                  "--trust-code", "-o", str(tmp_path / "s.nsz")]))
    orig = ns.build_model("mynets:staged", (1, 8, 8), depth=3)
    assert f"({ns.stats.dense_bytes(orig):,} bytes)" in out, out


def test_model_arg_a_factory_does_not_take_is_one_line(runner, user_module, tmp_path, monkeypatch):
    """#39.9: --model-arg width=3 for a model without that argument was a traceback (exit 1)."""
    monkeypatch.chdir(user_module)
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--model-arg", "width=3", "--epochs", "1",
                             "-o", str(tmp_path / "a.safetensors")]),
         "model 'lenet300' does not take argument(s) ['width']; it takes ['input_shape', 'num_classes']")
    _err(runner.invoke(cli, ["train", "--model", "mynets:staged", "--model-arg", "width=3", "--epochs", "1",
                             "-o", str(tmp_path / "b.safetensors")]),
         "model 'mynets:staged' does not take argument(s) ['width']; it takes ['depth']")


def test_model_arg_num_classes_or_input_shape_is_used_or_refused_in_one_line(runner, tmp_path):
    """#39.9a: --model-arg num_classes=10 / input_shape=[...] on a built-in model was a TypeError traceback."""
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--model-arg", "num_classes=10", "--epochs", "1",
                            "--max-steps", "2", "-o", str(tmp_path / "a.safetensors")]))
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--model-arg", "num_classes=5", "--epochs", "1",
                             "-o", str(tmp_path / "b.safetensors")]),
         "num_classes=5 disagrees with the data's 10")
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--model-arg", "input_shape=[1,4,4]", "--epochs", "1",
                             "-o", str(tmp_path / "c.safetensors")]),
         "input_shape=[1, 4, 4] disagrees with the data's [1, 8, 8]")
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_a_factorys_own_input_shape_reaches_it():
    """A factory argument named like build_model's positional ``input_shape`` is the factory's."""
    seen = {}

    def factory(input_shape):
        seen["shape"] = input_shape
        return torch.nn.Linear(2, 2)

    import types

    mod = types.ModuleType("_ns_shape_factory")
    mod.factory = factory
    sys.modules["_ns_shape_factory"] = mod
    try:
        ns.build_model("_ns_shape_factory:factory", (1, 8, 8), input_shape=[3, 4])
    finally:
        del sys.modules["_ns_shape_factory"]
    assert seen["shape"] == [3, 4]


def test_outputs_with_the_wrong_extension_are_refused(runner, tmp_path):
    """#39.9: train -o y.nsz wrote safetensors under a .nsz name; compress -o x.txt was accepted."""
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(tmp_path / "y.nsz")]),
         "train writes a dense .safetensors file; the output")
    _err(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(tmp_path / "y.onnx")]),
         "names a .onnx file")
    base = tmp_path / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))
    _err(runner.invoke(cli, ["compress", str(base), "--method", "int8", "-o", str(tmp_path / "x.txt")]),
         "compress writes a .nsz file; the output")
    assert not (tmp_path / "y.nsz").exists() and not (tmp_path / "x.txt").exists()


def test_a_plain_state_dict_without_a_model_names_the_flag(runner, tmp_path):
    """#39.9: the message said 'pass the model to fill' (the Python API's words) instead of --model."""
    torch.manual_seed(0)
    path = tmp_path / "plain.safetensors"
    save_file(ns.build_model("lenet300", (1, 8, 8)).state_dict(), str(path))
    out = _err(runner.invoke(cli, ["compress", str(path), "--method", "int8", "-o", str(tmp_path / "q.nsz")]),
               "records no architecture; name the model it holds (CLI: --model NAME")
    assert "pass the model to fill" not in out
    _ok(runner.invoke(cli, ["compress", str(path), "--model", "lenet300", "--model-arg", "input_shape=[1, 8, 8]",
                            "--method", "int8", "-o", str(tmp_path / "q.nsz")]))


def test_a_per_layer_option_naming_no_layer_fails_before_data_loads(runner, tmp_path):
    """#39.9: --set "sparsity={fc9: 0.5}" failed only after the data loaded; messages named layers two ways."""
    base = tmp_path / "base.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "-o", str(base)]))
    nowhere = str(tmp_path / "nowhere")
    _err(runner.invoke(cli, ["compress", str(base), "--method", "magnitude", "--set", "sparsity={fc9: 0.5}",
                             "--data", "mnist", "--data-dir", nowhere, "-o", str(tmp_path / "x.nsz")]),
         "stage 1 'magnitude': option 'sparsity' names 'fc9', which is not a layer of the model; its layers: fc1, fc2, "
         "fc3 (or conv/fc/embedding for every layer of a kind).")
    ns.Pipeline.from_spec(["magnitude"], ["sparsity={fc1.weight: 0.5, fc: 0.2}"]).check_layers(
        ns.build_model("lenet300", (1, 8, 8)))   # the tensor's name and a layer kind are layer names too


@pytest.mark.slow  # end to end, seconds: run by .ci/run with the slow cases
def test_a_factory_in_the_working_directory_imports_from_the_command_line(user_module, tmp_path, monkeypatch):
    """#39.9: --model mynets:factory for a module in the current directory failed unless PYTHONPATH=."""
    import subprocess

    monkeypatch.chdir(user_module)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    script = __import__("pathlib").Path(sys.executable).parent / "netsurgeon"  # no '' on sys.path, unlike python -c
    r = subprocess.run([str(script), "train", "--model", "mynets:classifier", "--model-arg", "num_classes=10",
                        "--epochs", "1", "-o", "m.safetensors"],
                       capture_output=True, text=True, env=env, cwd=user_module, timeout=300)
    assert r.returncode == 0, r.stderr
    header = json.loads(__import__("safetensors").safe_open(str(user_module / "m.safetensors"), "pt").metadata()[
        "netsurgeon"])
    assert header["arch"]["kwargs"] == {"num_classes": 10}


def test_the_runtime_form_refuses_tracing_and_names_netsurgeon_export(tmp_path):
    """#39.9: torch.onnx.export of load_compressed(p, runtime=True) silently wrote a 199-byte graph with no input."""
    torch.manual_seed(0)
    m = ns.build_model("lenet300", (1, 8, 8))
    ns.pruning.magnitude.prune_magnitude(m, sparsity=0.9)
    ns.nsz.save_compressed(m, tmp_path / "m.nsz")
    fast = ns.load_compressed(tmp_path / "m.nsz", runtime=True)
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)   # it still runs
    with pytest.raises(RuntimeError, match="cannot be traced or exported; export the file itself: netsurgeon export"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # the TorchScript exporter's notice
            torch.onnx.export(fast, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    assert not (tmp_path / "m.onnx").exists()
