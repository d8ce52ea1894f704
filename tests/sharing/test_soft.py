"""Soft weight sharing (issue 15): the mixture prior, component merging (Eq. 8), quantization to one shared
codebook, and the file."""

import math

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.sharing.soft import GaussianMixturePrior, SoftWeightSharing, merge_components


def test_prior_nll_is_the_mixture_density():
    w = torch.tensor([-0.3, 0.0, 0.05, 0.4])
    prior = GaussianMixturePrior(3, 0.9, w, init_std=0.1)
    mu, lam, log_pi = (t.detach() for t in prior.mixture())
    assert mu.tolist() == pytest.approx([0.0, -0.3, 0.4]) and float(log_pi.exp().sum()) == pytest.approx(1.0)
    dens = sum(math.exp(float(log_pi[j])) * math.sqrt(float(lam[j]) / (2 * math.pi))
               * torch.exp(-0.5 * lam[j] * (w - mu[j]) ** 2) for j in range(3))
    with torch.no_grad():
        assert float(prior.nll(w)) == pytest.approx(float(-torch.log(dens).sum()), rel=1e-5)
        assert float(prior.nll(w, chunk=1)) == pytest.approx(float(prior.nll(w)), rel=1e-6)


def test_merge_follows_eq8_and_keeps_the_zero_component_first():
    mu = torch.tensor([0.0, 0.5, 0.5001, -0.4])
    var = torch.tensor([1e-4, 4e-4, 4e-4, 4e-4])
    pi = torch.tensor([0.9, 0.03, 0.05, 0.02])
    m, v, p = merge_components(mu, var, pi, threshold=1e-3)
    assert m.numel() == 3 and float(m[0]) == 0.0
    assert float(p[1]) == pytest.approx(0.08)
    assert float(m[1]) == pytest.approx((0.03 * 0.5 + 0.05 * 0.5001) / 0.08)
    assert float(v[1]) == pytest.approx(4e-4)
    m2, _, _ = merge_components(mu, var, pi, threshold=0.0)
    assert m2.numel() == 4


def _dense_lenet300(digits):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=10, lr=0.05))
    return model


def test_finalize_quantizes_to_one_shared_codebook_and_the_file_keeps_it(digits, tmp_path):
    model = _dense_lenet300(digits)  # soft sharing retrains a trained network (a random one can quantize to zero)
    cb = SoftWeightSharing(components=5, tau=0.05, lr_log_precision=3e-2, lr_means=1e-3, lr_mix=3e-2)
    ns.train(model, digits, ns.TrainConfig(epochs=2, optimizer="adam", lr=5e-4, weight_decay=0), callbacks=[cb])
    assert cb.n_train == len(digits.train)
    cb.finalize(model)
    books = {id(m.parametrizations.weight[0].codebook) for m in (model.fc1, model.fc2, model.fc3)}
    assert len(books) == 1                                            # one codebook for the network
    values = torch.cat([m.weight.detach().flatten() for m in (model.fc1, model.fc2, model.fc3)]).unique()
    assert values.numel() <= 5 and 0.0 in values.tolist()
    assert 0 <= cb.report["kept"] <= 1 and cb.report["components_after_merge"] <= 5
    model.eval()
    info = ns.save_compressed(model, tmp_path / "s.nsz")
    assert {r.codec for r in info.records if r.name.endswith("weight")} == {"shared"}
    x = digits.test.x[:8]
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "s.nsz")(x), model(x))


def test_own_loop_needs_the_training_set_size():
    model = nn.Sequential(nn.Linear(4, 3))
    cb = SoftWeightSharing()
    cb.prepare(model)
    with pytest.raises(ValueError, match="training-set size is unknown; pass n_train"):
        cb.loss(model(torch.randn(2, 4)), (None, None))
    cb = SoftWeightSharing(n_train=100)
    cb.prepare(model)
    loss = cb.loss(model(torch.randn(2, 4)), (None, None))
    loss.backward()
    assert cb.prior.means.grad is not None and model[0].weight.grad is not None
    cb.after_step()
    assert cb.prior.means.grad is None                                 # stepped and cleared by the callback


@pytest.mark.slow  # trains a network end to end (~9 s on 2 idle cores): the quick suite keeps under 2 minutes
def test_a_pruned_model_keeps_its_zeros(digits):
    from netsurgeon.pruning.magnitude import prune_magnitude

    model = _dense_lenet300(digits)
    prune_magnitude(model, sparsity=0.8, scope="global")
    zeros = [m.weight.detach() == 0 for m in (model.fc1, model.fc2, model.fc3)]
    cb = SoftWeightSharing(components=5, n_train=len(digits.train))
    ns.train(model, digits, ns.TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0), callbacks=[cb])
    cb.finalize(model)
    for z, m in zip(zeros, (model.fc1, model.fc2, model.fc3), strict=True):
        assert bool((m.weight.detach()[z] == 0).all())
    assert cb.report["kept"] <= 0.2 + 1e-6


@pytest.mark.slow  # trains a network end to end (~10 s on 2 idle cores)
def test_defaults_keep_a_working_network_at_a_short_budget(digits):
    """At 5 epochs on digits the code's σ = 0.25 start left every weight in the zero component (8.9% after
    quantization, validation 96% just before); the widths now start at the hyper-priors' σ = 0.02."""
    model = _dense_lenet300(digits)
    cb = SoftWeightSharing()
    ns.train(model, digits, ns.TrainConfig(epochs=5, optimizer="adam", lr=5e-4, weight_decay=0), callbacks=[cb])
    cb.finalize(model)
    acc = ns.evaluate(model, digits.test)[1]
    assert acc > 0.85 and 0.01 < cb.report["kept"] < 0.5
    assert cb.report["val_acc_quantized"] > cb.report["val_acc_retrained"] - 0.1  # measured on validation


def test_an_all_zero_network_is_refused_not_written(digits):
    model = _dense_lenet300(digits)
    cb = SoftWeightSharing(init_std=0.25)                              # the code's start: far too wide here
    ns.train(model, digits, ns.TrainConfig(epochs=1, optimizer="adam", lr=5e-4, weight_decay=0), callbacks=[cb])
    with torch.no_grad():
        before = model(digits.test.x[:8])
    with pytest.raises(ValueError, match=r"soft_sharing: every weight of layer\(s\) 'fc1', 'fc2', 'fc3' falls to "
                                         r"the zero component, so the network would compute a constant"):
        cb.finalize(model)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())  # nothing changed
    with torch.no_grad():
        torch.testing.assert_close(model(digits.test.x[:8]), before)
