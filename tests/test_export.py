import numpy as np
import pytest
import torch
from click.testing import CliRunner

import netsurgeon as ns
from netsurgeon.cli import cli
from netsurgeon.pruning.magnitude import prune_magnitude
from netsurgeon.quantization.kmeans import share_weights
from netsurgeon.quantization.uniform import quantize_model_int8

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from netsurgeon.export import export_onnx  # noqa: E402


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("kind", ["pruned", "kmeans", "int8", "conv_kmeans"])
def test_export_matches_pytorch_and_stays_small(tmp_path, kind):
    torch.manual_seed(0)
    m = ns.build_model("lenet5" if kind == "conv_kmeans" else "lenet300")
    if kind != "int8":
        prune_magnitude(m, sparsity=0.95)
    if kind in ("kmeans", "conv_kmeans"):
        share_weights(m, {"conv": 6, "fc": 5})
    if kind == "int8":
        quantize_model_int8(m)
    ns.save_compressed(m, tmp_path / "m.nsz")
    info = export_onnx(tmp_path / "m.nsz", tmp_path / "m.onnx")
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        ref = ns.load_compressed(tmp_path / "m.nsz")(x).numpy()
    assert np.abs(_run(tmp_path / "m.onnx", x) - ref).max() <= 1e-4 and info.max_abs_logit_diff <= 1e-4
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert info.file_bytes < info.dense_onnx_bytes / (3 if kind == "int8" else 8)
    forms = set(info.compact.values())
    expect = {"pruned": "ScatterElements", "kmeans": "Gather", "int8": "DequantizeLinear",
              "conv_kmeans": "Gather"}[kind]
    assert any(expect in f for f in forms), forms


def test_export_cli_and_its_errors(tmp_path):
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=0.9)
    ns.save_compressed(m, tmp_path / "m.nsz")
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.nsz"), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "max |logit diff|" in r.output and (tmp_path / "m.onnx").is_file()
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.nsz"), "-o", str(tmp_path / "m.pb")])
    assert r.exit_code == 2 and "writes a .onnx file; got -o" in r.output
    r = CliRunner().invoke(cli, ["bench-latency", str(tmp_path / "m.nsz"), "--batch", "0,2"])
    assert r.exit_code == 2 and "got '0,2'" in r.output
    r = CliRunner().invoke(cli, ["bench-latency", str(tmp_path / "m.nsz"), "--batch", "1,4", "--repeats", "5",
                                 "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "ort_export" in r.output and "FLOP-ratio bound" in r.output


def test_export_of_a_factorized_model(tmp_path):
    from netsurgeon.lowrank import factorize_layers

    torch.manual_seed(0)
    m = ns.build_model("lenet5")
    factorize_layers(m, {"conv1": ("spatial", 2), "conv2": ("cp", 6), "fc1": ("linear", 16)})
    ns.save_compressed(m, tmp_path / "f.nsz")
    info = export_onnx(tmp_path / "f.nsz", tmp_path / "f.onnx")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = m.eval()(x).numpy()
    assert np.abs(_run(tmp_path / "f.onnx", x) - ref).max() <= 1e-4 and info.max_abs_logit_diff <= 1e-4
    assert info.file_bytes < 0.1 * 4 * sum(p.numel() for p in ns.build_model("lenet5").parameters())
