import pytest
import torch

import netsurgeon as ns
from netsurgeon.pruning.magnitude import prune_magnitude
from netsurgeon.quantization.uniform import QuantizationAwareTraining, quantize_int8, quantize_model_int8


def test_quantize_int8_exact_values_and_zero_preserved():
    w = torch.tensor([[1.27, -0.635, 0.0], [0.5, 0.25, -0.125]])
    q, s = quantize_int8(w, per_channel=True)
    assert s.tolist() == pytest.approx([0.01, 0.5 / 127])
    assert q[0].tolist() == [127, -64, 0]         # -63.5 rounds half to even
    assert q[1].tolist() == [127, 64, -32]
    qt, st = quantize_int8(w, per_channel=False)
    assert st.dim() == 0 and qt[0].tolist() == [127, -64, 0]


def test_ptq_file_runtime_and_speed_path(tmp_path):
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=0.5)
    zeros = m.fc1.weight == 0
    x = torch.randn(8, 1, 28, 28)
    ref = m(x)
    quantize_model_int8(m)
    assert (m.fc1.weight[zeros] == 0).all()
    torch.testing.assert_close(m(x), ref, atol=0.05, rtol=0.05)
    info = ns.save_compressed(m, tmp_path / "q.nsz")
    rec = {r.name: r for r in info.records}["fc1.weight"]
    assert rec.codec == "int8" and rec.bytes == 300 * 784 + 300 * 4
    plain = ns.load_compressed(tmp_path / "q.nsz")
    assert torch.equal(plain(x), m(x))
    from netsurgeon.runtime import compile_runtime

    fast, plan = compile_runtime(ns.load_compressed(tmp_path / "q.nsz", keep_codecs=True), 64, forms=("int8",),
                                 repeats=3)
    assert plan.runs[0].weights == "int8" and set(plan.runs[0].latency_ms) == {"int8", "dense"}
    x64 = torch.randn(64, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(fast(x64), m(x64), atol=0.05, rtol=0.05)


def test_qat_trains_through_fake_quantization(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=3, lr=0.05), callbacks=[QuantizationAwareTraining()])
    w = m.fc1.weight.detach()
    q, s = quantize_int8(w)
    torch.testing.assert_close(w, q.float() * s[:, None])   # the forward weight is on the int8 grid
    assert ns.evaluate(m, digits.test)[1] > 0.9
    quantize_model_int8(m)
    assert ns.evaluate(m, digits.test)[1] > 0.9
