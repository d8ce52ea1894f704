"""Low-rank factorization (issue 16): truncated SVD per Linear layer, rank by energy or a global weight budget,
and a file that rebuilds the factor pairs."""

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.lowrank import factorize_linear, lowrank_factorize, svd_ranks
from netsurgeon.models import original_model


def test_factor_pair_is_the_truncated_svd():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    x = torch.randn(5, 30)
    full = factorize_linear(lin, 20)
    with torch.no_grad():
        torch.testing.assert_close(full(x), lin(x), rtol=1e-4, atol=1e-5)
        s = torch.linalg.svdvals(lin.weight)
        pair = factorize_linear(lin, 6)
        w = pair[1].weight @ pair[0].weight
        assert float((w - lin.weight).norm()) == pytest.approx(float(s[6:].pow(2).sum().sqrt()), rel=1e-4)
    assert pair[0].bias is None and torch.equal(pair[1].bias, lin.bias)


def test_rank_by_energy_and_by_global_budget():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert svd_ranks({"a": (s, 4, 4)}, energy=0.5) == {"a": 1}               # 16 of 22 >= 11
    assert svd_ranks({"a": (s, 4, 4)}, energy=0.95) == {"a": 3}            # 21 of 22
    assert svd_ranks({"a": (s, 4, 4)}, energy=0.96) == {"a": 4}
    torch.manual_seed(0)
    model = ns.build_model("lenet300")
    before = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    rep = lowrank_factorize(model, params=0.2)
    after = sum(r["weights_after"] for r in rep.values())
    assert after <= 0.2 * before and after > 0.1 * before
    assert isinstance(model.fc1, nn.Sequential) and model.fc1[0].out_features == rep["fc1"]["rank"]
    with pytest.raises(ValueError, match="give exactly one of energy or params"):
        svd_ranks({"a": (s, 4, 4)})
    with pytest.raises(ValueError, match="lowrank: give exactly one of energy or params"):
        ns.pipeline.get_method("lowrank").make_config({"energy": 0.9})


def test_file_rebuilds_the_factorized_model(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.05))
    lowrank_factorize(model, energy=0.9)
    model.eval()
    path = tmp_path / "lr.nsz"
    info = ns.save_compressed(model, path)
    assert info.header["arch"]["factorized"]["fc1"] == model.fc1[0].out_features
    x = digits.test.x[:8]
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(path)(x), model(x))
        plain = ns.build_model("lenet300", digits.input_shape)           # the user's unfactorized model is filled
        torch.testing.assert_close(ns.load_compressed(path, plain)(x), model(x))
    orig = original_model(info.header["arch"])
    assert isinstance(orig.fc1, nn.Linear)


def test_refuses_masked_layers():
    from netsurgeon.masks import attach_masks

    model = nn.Sequential(nn.Linear(5, 4))
    attach_masks(model)
    with pytest.raises(ValueError, match="holds a parametrization"):
        lowrank_factorize(model, energy=0.9)
