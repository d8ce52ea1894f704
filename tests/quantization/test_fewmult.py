import pytest
import torch
import torch.nn.functional as F

import netsurgeon as ns
from netsurgeon.pipeline import Pipeline
from netsurgeon.quantization.fewmult import FewMultiplications, _QuantizedBackprop, pow2_stochastic


def test_power_of_two_rounding_is_unbiased_and_hits_powers_of_two():
    x = torch.tensor([0.3, -0.75, 3.0, 0.0]).repeat(20000, 1)
    q = pow2_stochastic(x, torch.Generator().manual_seed(0))
    nz = q[q != 0].abs()
    assert torch.equal(torch.exp2(torch.log2(nz)), nz) and torch.equal(torch.log2(nz), torch.log2(nz).round())
    torch.testing.assert_close(q.mean(0), x[0], atol=0.01, rtol=0.01)
    assert (q[:, 3] == 0).all() and set(q[:, 0].unique().tolist()) == {0.25, 0.5}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_gradient_uses_the_quantized_input_and_input_gradient_does_not(kind):
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Linear(6, 4) if kind == "linear" else torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn((5, 6) if kind == "linear" else (2, 3, 5, 5), generator=g, requires_grad=True)
    qx = pow2_stochastic(x.detach(), g)
    y = _QuantizedBackprop.apply(x, m.weight, m.bias, m, qx)
    up = torch.randn(y.shape, generator=g)
    gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), up)
    ref = F.linear if kind == "linear" else (lambda a, w, b: F.conv2d(a, w, b, padding=1))
    torch.testing.assert_close(y, ref(x, m.weight, m.bias))
    rx, = torch.autograd.grad(ref(x, m.weight, m.bias), x, up)
    rw, rb = torch.autograd.grad(ref(qx, m.weight, m.bias), (m.weight, m.bias), up)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)


def test_ternary_training_stores_two_bit_codes_and_reloads(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("mlp_bn", digits.input_shape, widths=[64, 64])
    Pipeline.from_spec([{"fewmult": {"epochs": 1, "max_steps": 40, "lr": 0.01}}]).run(model, digits)
    model.eval()
    w = model.fc2.weight.detach()
    w0 = (6 / (64 + 64)) ** 0.5 / 2
    torch.testing.assert_close(w.unique(), torch.tensor([-w0, 0.0, w0]))  # ternary: -W0, 0, +W0
    assert "forward" not in model.fc2.__dict__
    x = digits.test.x[:8]
    with torch.no_grad():
        ref = model(x)
    info = ns.save_compressed(model, tmp_path / "t.nsz")
    rec = next(r for r in info.records if r.name == "fc2.weight")
    assert rec.codec == "shared" and rec.code_bits == 2
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "t.nsz")(x), ref)
    with pytest.raises(ValueError, match="fewmult: weights must be one of"):
        FewMultiplications("quaternary")
