import pytest
import torch

import netsurgeon as ns
from netsurgeon.quantization.distortion import Distort, distort, distort_model


def test_each_distortion_does_what_it_says():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * 0.1
    b = distort(w, "binarize")
    torch.testing.assert_close(b.abs(), torch.full_like(w, float(w.abs().mean())))
    assert torch.equal(torch.sign(b), torch.sign(w))
    p = distort(w, "pow2", levels=4)
    nz = p[p != 0].abs()
    assert torch.equal(torch.exp2(torch.log2(nz).round()), nz)  # powers of two
    assert len(nz.unique()) <= 4 and float(nz.max()) <= float(w.abs().max()) * 2 ** 0.5
    n = distort(w, "noise", sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert float((n - w).std()) == pytest.approx(0.5 * float(w.std()), rel=0.1)
    with pytest.raises(ValueError, match="distortion must be one of"):
        distort(w, "cubic")


def test_training_under_a_distortion_is_straight_through_and_saves_the_distorted_network(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    before = model.fc1.weight.detach().clone()
    cb = Distort("pow2", levels=6)
    ns.train(model, digits, ns.TrainConfig(epochs=1, max_steps=20, lr=0.05), callbacks=[cb])
    assert not torch.equal(before, model.fc1.weight.detach())  # the real weights learned
    w = model.fc1.weight.detach()
    nz = w[w != 0].abs()
    assert torch.equal(torch.exp2(torch.log2(nz).round()), nz)
    acc = ns.evaluate(model, digits.test)[1]
    assert acc > 0.5 and ns.evaluate(distort_model(model, "pow2", levels=6), digits.test)[1] == acc
    ns.save_compressed(model, tmp_path / "m.nsz")
    torch.testing.assert_close(ns.load_compressed(tmp_path / "m.nsz").fc1.weight, w)
