"""Binary networks (issue 21): the binarization rules and their gradients, the update scaling and clipping, the
stored form (1 bit per weight), the XNOR + popcount kernels and the runtime modules against the float
computation of the same binarized network."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netsurgeon as ns
from netsurgeon.changes.binary_inputs import _input_scale, binary_inputs_of, install_binary_input, sign_pm
from netsurgeon.coding.container import NszError
from netsurgeon.kernels import bitops
from netsurgeon.kernels.modules import XnorConv2d, XnorLinear
from netsurgeon.models import build_model
from netsurgeon.quantization.binary import Binarize, BinarizeWeights, BinaryWeights, glorot_lr_scale
from netsurgeon.train import TrainConfig, squared_hinge

CFG = TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0)


def test_sign_maps_zero_to_plus_one_and_gradients_follow_the_papers():
    assert sign_pm(torch.tensor([-0.5, 0.0, 0.3])).tolist() == [-1.0, 1.0, 1.0]
    w = torch.tensor([[-2.0, -0.5, 0.0, 0.7]], requires_grad=True)
    BinarizeWeights("sign")(w).sum().backward()           # BinaryConnect: identity straight-through
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    x = torch.tensor([-2.0, -0.5, 0.5, 1.5], requires_grad=True)
    lin = nn.Linear(4, 1, bias=False)
    install_binary_input(lin, "sign")
    with torch.no_grad():
        lin.weight.fill_(1.0)
    lin(x).sum().backward()                                # BNN Eq. (4): cancelled where |x| > 1
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    w = torch.tensor([[0.5, -1.5, 0.25, -0.25]], requires_grad=True)
    out = BinarizeWeights("alpha")(w)                      # XNOR-Net: α = mean|W| per filter
    assert torch.allclose(out, torch.tensor([[0.625, -0.625, 0.625, -0.625]]))
    out.sum().backward()                                   # paper's rule: g·(1/n + α·1_{|W| <= 1})
    assert torch.allclose(w.grad, torch.tensor([[0.25 + 0.625, 0.25, 0.25 + 0.625, 0.25 + 0.625]]))


def test_stochastic_binarization_samples_the_hard_sigmoid_and_evaluates_real_weights():
    gen = torch.Generator().manual_seed(0)
    par = BinarizeWeights("stochastic", gen)
    w = torch.full((20_000,), 0.5)
    b = par(w)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert abs(float((b > 0).float().mean()) - 0.75) < 0.02   # P(+1) = clip((w + 1) / 2, 0, 1)
    par.eval()
    assert torch.equal(par(w), w)


def test_update_is_scaled_per_layer_and_clipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    cb = Binarize("sign")
    cb.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    real = model[0].parametrizations.weight.original
    before = real.detach().clone()
    loss = model(torch.randn(5, 6)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    grad = real.grad.clone()
    cb.after_backward()
    opt.step()
    cb.after_step()
    s = glorot_lr_scale(model[0])
    assert s == pytest.approx(1 / (1.5 / 10) ** 0.5)
    expected = before - s * 0.05 * grad
    assert torch.allclose(real.detach(), expected.clamp(-1, 1), atol=1e-6)
    assert bool((expected.abs() > 1).any()) and float(real.detach().abs().max()) == 1.0  # the clip acted


def test_xnor_input_scale_matches_the_definition():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 7, 7)
    k = _input_scale(conv, x)
    a = F.pad(x.abs().mean(1), (1, 1, 1, 1))                  # zero padding counted
    assert k.shape == (2, 1, 4, 4)
    assert torch.allclose(k[1, 0, 2, 1], a[1, 4:7, 2:5].mean())
    grouped = nn.Conv2d(4, 6, 3, groups=2)
    kg = _input_scale(grouped, x)
    assert kg.shape == (2, 6, 5, 5)
    assert torch.allclose(kg[0, 4, 0, 0], x[0, 2:4, :3, :3].abs().mean())   # channels of the second group
    assert torch.allclose(_input_scale(nn.Linear(7, 2), x[:, 0, 0]), x[:, 0, 0].abs().mean(-1, keepdim=True))


@pytest.mark.parametrize("shape", [(1, 64, 4), (3, 100, 7), (5, 130, 9), (2, 2048, 33)])
def test_xnor_kernel_is_bit_exact_against_the_float_product(shape):
    m, k, n = shape
    g = np.random.default_rng(k)
    x, w = g.standard_normal((m, k)).astype(np.float32), g.standard_normal((n, k)).astype(np.float32)
    x[0, 0] = 0.0  # sign(0) = +1 in the kernel as in training
    ref = torch.from_numpy(sign_pm(torch.from_numpy(x)).numpy() @ sign_pm(torch.from_numpy(w)).numpy().T)
    out = bitops.xnor_matmul(bitops.pack_signs(x), bitops.pack_signs(w), k, np.ones(n, np.float32))
    assert np.array_equal(out, ref.numpy())


def _binary(layer, mode, alpha=True):
    cb = Binarize("alpha" if alpha else "sign", mode)
    model = nn.Sequential(nn.Identity(), layer) if mode else nn.Sequential(layer)
    cb.prepare(nn.Sequential(nn.Linear(2, 2), layer))  # the first layer keeps a real input
    cb.finalize()
    return model


@pytest.mark.parametrize("mode", ["sign", "scaled"])
def test_runtime_xnor_layers_equal_the_binarized_float_layers(mode):
    torch.manual_seed(0)
    lin = nn.Linear(70, 9)
    _binary(lin, mode)
    par = lin.parametrizations.weight[0]
    x = torch.randn(4, 70)
    fast = XnorLinear(lin, par.signs, par.scale, mode)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x[:1]), lin(x[:1]), rtol=1e-5, atol=1e-5)
    conv = nn.Conv2d(5, 6, 3, stride=2)
    _binary(conv, mode)
    par = conv.parametrizations.weight[0]
    xc = torch.randn(2, 5, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(XnorConv2d(conv, par.signs, par.scale, mode)(xc), conv(xc), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding 0"):
        XnorConv2d(nn.Conv2d(5, 6, 3, padding=1), par.signs, par.scale, mode)


def test_file_holds_one_bit_per_weight_and_rebuilds_the_binary_network(digits, tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp_bn", digits.input_shape, widths=[64, 64], act="hardtanh")
    cb = Binarize("sign", "sign")
    ns.train(model, digits, TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0, loss="squared_hinge"),
             callbacks=[cb])
    cb.finalize(model)
    assert binary_inputs_of(model) == {"fc2": "sign", "fc3": "sign"}
    model.eval()
    path = tmp_path / "bnn.nsz"
    info = ns.save_compressed(model, path)
    recs = {r.name: r for r in info.records}
    assert recs["fc2.weight"].codec == "binary" and recs["fc2.weight"].bytes == 64 * 64 // 8 + 4
    assert recs["fc1.weight"].bytes == (64 * 64 + 7) // 8 + 4                      # the first layer too (BNN)
    x = digits.test.x[:16]
    with torch.no_grad():
        expected = model(x)
        for keep in (False, True):
            loaded = ns.load_compressed(path, keep_codecs=keep)                    # rebuilt with its sign hooks
            torch.testing.assert_close(loaded(x), expected)
        plain = build_model("mlp_bn", digits.input_shape, widths=[64, 64], act="hardtanh")
        torch.testing.assert_close(ns.load_compressed(path, plain)(x), expected)   # the user's model is filled
        fast = ns.load_compressed(path, runtime=True, batch=16, threads=1)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    assert ns.forms.weight_form(ns.load_compressed(path, keep_codecs=True)) == "binary"


def test_corrupt_binary_records_are_refused(digits, tmp_path):
    from netsurgeon.coding.container import read_container, write_container

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 4))
    nn.utils.parametrize.register_parametrization(
        model[0], "weight", BinaryWeights(sign_pm(torch.randn(4, 10)).to(torch.int8), torch.ones(())), unsafe=True)
    path = tmp_path / "b.nsz"
    ns.save_compressed(model, path)
    header, blobs = read_container(path)
    bad = dict(blobs, **{"0.weight/bits": blobs["0.weight/bits"][:-1]})
    write_container(tmp_path / "short.nsz", header, bad)
    with pytest.raises(NszError, match="bits stream is 4 bytes; the record needs 5"):
        ns.load_compressed(tmp_path / "short.nsz", nn.Sequential(nn.Linear(10, 4)))
    rec = next(t for t in header["tensors"] if t["name"] == "0.weight")
    rec["codebook_size"] = 3
    write_container(tmp_path / "scales.nsz", header, blobs)
    with pytest.raises(NszError, match="a binary record needs 1 or 4 scales"):
        ns.load_compressed(tmp_path / "scales.nsz", nn.Sequential(nn.Linear(10, 4)))
    with pytest.raises(ValueError, match="int8 tensor of ±1"):
        BinaryWeights(torch.zeros(2, 2, dtype=torch.int8), torch.ones(()))


def test_stochastic_training_is_deterministic_and_resumes_exactly(digits, tmp_path):
    def run(steps, ck=None, resume=False):
        torch.manual_seed(0)
        m = build_model("lenet300", digits.input_shape)
        cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0, max_steps=steps)
        ns.train(m, digits, cfg, callbacks=[Binarize("stochastic", seed=3)], checkpoint=ck, resume=resume)
        return m.state_dict()

    full = run(6)
    again = run(6)
    assert all(torch.equal(full[k], again[k]) for k in full)
    ck = tmp_path / "c.ckpt"
    run(3, ck)
    resumed = run(6, ck, resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_refusals_name_the_problem():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no layer left to binarize"):
        Binarize("alpha", keep_first=True).prepare(model)
    from netsurgeon.masks import attach_masks

    attach_masks(model)
    with pytest.raises(ValueError, match="already holds"):
        Binarize("sign").prepare(model)
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        install_binary_input(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "sign")
    with pytest.raises(ValueError, match="act must be 'relu' or 'hardtanh'; got 'tanh'"):
        build_model("mlp_bn", act="tanh")


def test_squared_hinge_is_the_l2_svm_loss():
    out = torch.tensor([[0.5, -2.0, 0.0]])
    # targets +1 for class 0, -1 otherwise: (1 - 0.5)^2 + 0 + (1 - 0)^2
    assert float(squared_hinge(out, torch.tensor([0]))) == pytest.approx(1.25)


def test_onnx_export_of_a_binary_network_matches(digits, tmp_path):
    pytest.importorskip("onnxruntime")
    from netsurgeon.export import export_onnx

    torch.manual_seed(0)
    model = build_model("lenet5_bn", (1, 16, 16))
    cb = Binarize("alpha", "scaled", keep_first=True, keep_last=True)
    cb.prepare(model)
    cb.finalize(model)
    ns.save_compressed(model, tmp_path / "x.nsz")
    report = export_onnx(tmp_path / "x.nsz", tmp_path / "x.onnx")
    assert report.max_abs_logit_diff < 1e-4
    assert "±1 as int8" in report.compact["conv2.weight"]


def test_table_lookup_layer_equals_the_binary_weight_layer_with_real_input():
    from netsurgeon.kernels.modules import SignLutLinear

    torch.manual_seed(0)
    lin = nn.Linear(83, 11)           # 83 inputs: a partial last byte and word
    cb = Binarize("alpha")
    cb.prepare(nn.Sequential(lin))
    cb.finalize()
    par = lin.parametrizations.weight[0]
    fast = SignLutLinear(lin, par.signs, par.scale)
    x = torch.randn(3, 83)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x[:1]), lin(x[:1]), rtol=1e-5, atol=1e-5)
    assert fast.resident_bytes() == 11 * 16 + 11 * 4 + 11 * 4   # 2 words of bits per row, scales, biases


@pytest.mark.parametrize("first_input", ["real", "sign"])
def test_bnn_chain_equals_its_layers_with_batchnorm_folded(first_input):
    from torch import fx

    from netsurgeon.runtime.compile import _binary_chains, _Tracer, chain_modules

    torch.manual_seed(0)
    model = build_model("mlp_bn", (1, 9, 9), widths=[70, 130], act="hardtanh")
    cb = Binarize("alpha", "sign")
    cb.prepare(model)
    cb.finalize(model)
    if first_input == "sign":
        install_binary_input(model.fc1, "sign")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):   # non-trivial statistics and affine parameters, one negative gain
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(0.5, 4)
            nn.init.uniform_(m.weight, -1, 2)
            nn.init.uniform_(m.bias, -1, 1)
    model.eval()
    gm = fx.GraphModule(model, _Tracer().trace(model))
    (chain,) = _binary_chains(gm)
    assert [str(n.target) for n, _, _ in chain] == ["fc1", "fc2", "fc3"]
    fast, parts = chain_modules(gm, chain)
    assert fast.real_input == (first_input == "real")
    for b in (1, 3, 40):   # table lookup (<= 8 samples) and matmul paths of a real first layer
        x = torch.randn(b, 81)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), nn.Sequential(*parts)(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fast(x), model(x.view(b, 1, 9, 9)), rtol=1e-4, atol=1e-4)


def test_loss_aware_binarization_weights_alpha_by_adams_second_moments(digits, tmp_path):
    """LAB (Hou et al. 2017, Eq. (9)): after a step, ŵ = α·sign(w) with α = ‖d ⊙ w‖₁ / ‖d‖₁, d = √v + 1e-8 from
    the optimizer's own second moments; the stored file holds that α as the layer's one scale; resume is exact."""
    from netsurgeon.quantization.binary import loss_aware_alpha

    def run(steps, ck=None, resume=False):
        torch.manual_seed(0)
        m = build_model("lenet300", digits.input_shape)
        cb = Binarize("loss_aware", lr_scale=False)
        cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-2, weight_decay=0, max_steps=steps)
        t = ns.train(m, digits, cfg, callbacks=[cb], checkpoint=ck, resume=resume)
        return m, cb, t

    m, cb, _ = run(5)
    real = m.fc2.parametrizations["weight"].original.detach()
    v = cb._binarizer("fc2").curvature
    d = v  # already √v + ε
    alpha = float((d * real.abs()).sum() / d.sum())
    assert alpha != pytest.approx(float(real.abs().mean()), rel=1e-3)  # loss-aware: not BWN's mean |w|
    assert float(loss_aware_alpha(real, d)) == pytest.approx(alpha)
    cb.finalize(m)
    assert isinstance(m.fc2.parametrizations["weight"][0], BinaryWeights)
    assert float(m.fc2.parametrizations["weight"][0].scale) == pytest.approx(alpha, rel=1e-6)
    torch.testing.assert_close(m.fc2.weight.detach().abs(), torch.full_like(real, alpha))
    full = run(6)[0].state_dict()
    ck = tmp_path / "c.ckpt"
    run(3, ck)
    resumed = run(6, ck, resume=True)[0].state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_loss_aware_binarization_needs_adam(digits):
    torch.manual_seed(0)
    m = build_model("lenet300", digits.input_shape)
    with pytest.raises(ValueError, match="lab: needs Adam's second moments"):
        ns.train(m, digits, TrainConfig(epochs=1, optimizer="sgd", lr=1e-2, max_steps=2),
                 callbacks=[Binarize("loss_aware")])
    with pytest.raises(ValueError, match="lab: optimizer must be one of"):
        ns.pipeline.Pipeline.from_spec([{"lab": {"optimizer": "sgd"}}])


def test_bnn_replaces_a_relu_feeding_a_binarized_input_and_the_file_rebuilds_it(digits, tmp_path):
    """sign(ReLU(x)) = +1 everywhere: BNN on lenet300 computed a constant (11.1% on digits before the fix). The
    ReLUs feeding binarized inputs become HardTanh (BNN's activation), recorded so a file rebuilds them; the
    output layer, with no BatchNorm after it, stays real (its ±1 sums cannot scale the logits)."""
    torch.manual_seed(0)
    model = build_model("lenet300", digits.input_shape)
    cb = Binarize("sign", "sign")
    ns.train(model, digits, TrainConfig(epochs=3, optimizer="adam", lr=1e-3, weight_decay=0), callbacks=[cb])
    cb.finalize(model)
    model.eval()
    assert isinstance(model.relu1, nn.Hardtanh) and isinstance(model.relu2, nn.ReLU)  # relu2 feeds the real fc3
    assert set(cb.layers) == {"fc1", "fc2"} and binary_inputs_of(model) == {"fc2": "sign"}
    assert ns.models.arch_of(model)["activations"] == {"relu1": "hardtanh"}
    acc = ns.evaluate(model, digits.test)[1]
    assert acc > 0.75
    x = digits.test.x[:32]
    with torch.no_grad():
        assert model(digits.test.x).argmax(1).unique().numel() == 10           # not a constant function
        path = tmp_path / "bnn.nsz"
        ns.save_compressed(model, path)
        torch.testing.assert_close(ns.load_compressed(path)(x), model(x))
        plain = build_model("lenet300", digits.input_shape)               # the user's own ReLU model is filled
        torch.testing.assert_close(ns.load_compressed(path, plain)(x), model(x))
        assert isinstance(plain.relu1, nn.Hardtanh)
        fast = ns.load_compressed(path, runtime=True, batch=32, threads=1)      # the BNN chain fc1 -> fc2 fused
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_mlp_bn_with_relu_trains_as_bnn_like_with_hardtanh(digits):
    """mlp_bn's ReLU variant gave 9.5% under BNN (sign of a ReLU); now it is the HardTanh network exactly."""
    accs = []
    for act in ("relu", "hardtanh"):
        torch.manual_seed(0)
        model = build_model("mlp_bn", digits.input_shape, widths=[64, 64], act=act)
        ns.train(model, digits, TrainConfig(epochs=2, optimizer="adam", lr=1e-3, weight_decay=0),
                 callbacks=[Binarize("sign", "sign")])
        accs.append(ns.evaluate(model, digits.test)[1])
    assert accs[0] == accs[1] and accs[0] > 0.8


def test_a_binarized_input_that_cannot_be_negative_is_refused_by_name(digits):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc3(torch.sigmoid(self.fc2(F.relu(self.fc1(x.flatten(1))))))

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"binary: layer 'fc2' binarizes its input, which has no negative value"):
        ns.train(Functional(), digits, TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0),
                 callbacks=[Binarize("sign", "sign", keep_last=False)])
    with pytest.raises(NszError, match="field 'activations' must map module names to 'hardtanh'"):
        from netsurgeon.architecture import check_arch

        check_arch("f.nsz", {"name": "lenet300", "input_shape": [1, 8, 8], "num_classes": 10,
                             "activations": {"relu1": "gelu"}})
