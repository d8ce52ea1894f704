"""Low-rank factorization and compact filters (issue 16): truncated SVD of Linear layers, spatial / CP / Tucker /
depthwise-separable convolutions, ranks by energy or one weight budget, output matching, and files that rebuild."""

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.architecture import check_arch, original_model
from netsurgeon.coding import NszError
from netsurgeon.lowrank import (
    factorize_conv,
    factorize_layers,
    factorize_linear,
    lowrank_factorize,
    match_outputs,
    separable_factorize,
    svd_ranks,
)


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


# -- convolutions (Jaderberg spatial, CP, Tucker-2, depthwise separable) ------------------------------------------



def _conv_and_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    return conv, torch.randn(3, 6, 11, 13)


@pytest.mark.parametrize("kind,rank", [("spatial", 18), ("separable", 8), ("tucker", [6, 8])])
def test_conv_factorizations_at_full_rank_are_exact(kind, rank):
    conv, x = _conv_and_input()
    seq = factorize_conv(conv, kind, rank)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), conv(x), rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, nn.Conv2d) for m in seq) == {"spatial": 2, "separable": 2, "tucker": 3}[kind]
    assert seq[-1].bias is not None and seq[0].bias is None


def test_cp_recovers_a_low_rank_kernel_and_truncation_costs_what_svd_says():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=False)
    a = [torch.randn(d, 3) for d in (7, 5, 3, 3)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("nr,cr,yr,xr->ncyx", *a))
    seq = factorize_conv(conv, "cp", 3)
    x = torch.randn(2, 5, 9, 9)
    with torch.no_grad():
        err = float((seq(x) - conv(x)).norm() / conv(x).norm())
    assert err < 1e-3 and [m.groups for m in seq] == [1, 3, 3, 1]
    conv, _ = _conv_and_input()
    seq = factorize_conv(conv, "spatial", 4)  # Tai et al.'s closed form: the error is the SVD's tail
    with torch.no_grad():
        w = torch.einsum("kcy,nkx->ncyx", seq[0].weight[..., 0], seq[1].weight[:, :, 0, :])
        s = torch.linalg.svdvals(conv.weight.permute(1, 2, 0, 3).reshape(18, 40))
        tail = float((w - conv.weight).norm())
    assert tail == pytest.approx(float(s[4:].pow(2).sum().sqrt()), rel=1e-4)


def test_global_budget_spans_linear_and_conv_layers():
    for kind in ("spatial", "tucker", "cp"):
        torch.manual_seed(0)
        model = ns.build_model("lenet5")
        before = sum(m.weight.numel() for m in (model.conv1, model.conv2, model.fc1, model.fc2))
        rep = lowrank_factorize(model, params=0.1, conv=kind)
        after = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        assert after == sum(r["weights_after"] for r in rep.values()) and after <= 0.1 * before, kind
        assert isinstance(model.conv2, nn.Sequential) and rep["conv2"]["kind"] == kind
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="conv must be one of none, spatial, cp, tucker, separable; got 'fft'"):
        lowrank_factorize(ns.build_model("lenet5"), params=0.5, conv="fft")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer '0' cannot be factorized by 'spatial': it is a grouped convolution"):
        lowrank_factorize(grouped, params=0.5, layers=["0"])
    assert set(lowrank_factorize(grouped, params=0.5)) == {"2"}  # unlisted misfits are skipped


def test_separable_keeps_a_channel_separable_kernel_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():  # each input channel's filters are one spatial pattern times per-output gains
        conv.weight.copy_(torch.einsum("nc,cyx->ncyx", torch.randn(16, 3), torch.randn(3, 3, 3)))
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    rep = separable_factorize(model, multiplier=1)
    assert rep["0"]["rank"] == 1 and rep["0"]["weights_after"] == 3 * (9 + 16) and rep["0"]["energy_kept"] > 0.9999
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_conv_factorized_file_rebuilds_on_our_model_and_the_users(tmp_path):
    for plan in ({"conv1": ("cp", 3), "conv2": ("tucker", [8, 10]), "fc1": ("linear", 20)},
                 {"conv1": ("spatial", 2), "conv2": ("separable", 2)}):
        torch.manual_seed(0)
        model = ns.build_model("lenet5")
        factorize_layers(model, plan)
        model.eval()
        info = ns.save_compressed(model, tmp_path / "f.nsz")
        record = info.header["arch"]["factorized"]
        assert record["conv2"]["kind"] == plan["conv2"][0] and record["conv2"]["rank"] == plan["conv2"][1]
        x = torch.randn(4, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(ns.load_compressed(tmp_path / "f.nsz")(x), model(x))
            plain = ns.build_model("lenet5")
            torch.testing.assert_close(ns.load_compressed(tmp_path / "f.nsz", plain)(x), model(x))
        assert isinstance(original_model(info.header["arch"]).conv2, nn.Conv2d)


def test_schema_checks_conv_factor_records():
    base = {"name": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10}
    check_arch("f.nsz", {**base, "factorized": {"conv2": {"kind": "tucker", "rank": [3, 4]}, "fc1": 5}})
    for bad, msg in (({"kind": "fft", "rank": 2}, "must be a rank or"),
                     ({"kind": "tucker", "rank": 3}, "must be \\[R_in, R_out\\]"),
                     ({"kind": "cp", "rank": 0}, "factorized.conv2.rank"),
                     ({"kind": "cp", "rank": 2, "extra": 1}, "must be a rank or")):
        with pytest.raises(NszError, match=msg):
            check_arch("f.nsz", {**base, "factorized": {"conv2": bad}})


def test_output_matching_fits_each_layer_to_the_original(digits):
    torch.manual_seed(0)
    model = ns.build_model("digits_cnn", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=1, lr=0.05))
    originals = {"conv2": model.conv2, "fc1": model.fc1}
    x = digits.val.x[:200]

    def errors():
        acts = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: acts.__setitem__(n, (i[0], o))) for n in originals]
        with torch.no_grad():
            model(x)
            out = {n: float((o - originals[n](i)).norm() / originals[n](i).norm()) for n, (i, o) in acts.items()}
        for h in hooks:
            h.remove()
        return out

    factorize_layers(model, {"conv2": ("spatial", 3), "fc1": ("linear", 4)})
    before = errors()
    frozen = model.conv1.weight.clone()
    fitted = match_outputs(model, originals, digits, steps=60, lr=3e-3, seed=0)
    after = errors()
    assert set(fitted) == set(originals) and all(after[n] < before[n] for n in originals), (before, after)
    assert torch.equal(model.conv1.weight, frozen) and model.conv1.weight.requires_grad
