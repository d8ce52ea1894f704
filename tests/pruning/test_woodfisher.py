import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.data import Split
from netsurgeon.masks import get_masks
from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner, one_shot_prune


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))


def _split(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, generator=g)
    y = (x[:, 0, :3].sum(1) > 0).long() + (x[:, 0, 3] > 1).long()
    return Split(x, y)


def _trained(seed=0):
    m, s = _tiny(seed), _split()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(m(s.x), s.y).backward()
        opt.step()
    return m, s


def test_global_sparsity_is_exact_and_per_layer_is_reported():
    m, s = _trained()
    r = one_shot_prune(m, s, 0.5, "woodfisher", FisherConfig(num_grads=64, damp=1e-3, block_size=None))
    assert r["sparsity"] == pytest.approx(33 / 66)  # 66 weights, round(0.5*66) = 33 removed
    assert set(r["per_layer"]) == {"1", "3"}
    nz, total = ns.stats.count_nonzero(m)
    assert total - nz == 33


@pytest.mark.parametrize("method", ["magnitude", "diag_fisher", "obd", "obs", "woodfisher", "woodtaylor", "kfac"])
def test_every_method_prunes_and_keeps_pruned_weights_at_zero(method):
    m, s = _trained()
    one_shot_prune(m, s, 0.4, method, FisherConfig(num_grads=64, damp=1e-2, block_size=16))
    for p in get_masks(m).values():
        assert float(p.mask.mean()) < 1.0
    w = m[1].weight
    assert (w[get_masks(m)["1.weight"].mask == 0] == 0).all()


def test_obs_update_lowers_loss_more_than_no_update():
    m, s = _trained()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    losses = {}
    for update in ("none", "single", "joint"):
        mm = _tiny()
        mm.load_state_dict(base)
        one_shot_prune(mm, s, 0.5, "woodfisher", FisherConfig(num_grads=300, damp=1e-4, block_size=None),
                       update=update)
        with torch.no_grad():
            losses[update] = float(nn.functional.cross_entropy(mm(s.x), s.y))
    assert losses["single"] < losses["none"]
    assert losses["joint"] < losses["none"]


def test_block_size_matches_full_when_blocks_cover_a_layer():
    m, s = _trained()
    f = FisherConfig(num_grads=50, damp=1e-3)
    full = OneShotPruner("woodfisher", FisherConfig(num_grads=50, damp=1e-3, block_size=48)).fit(m, s)
    per_layer = OneShotPruner("woodfisher", f).fit(m, s)   # block 2000 > each layer: one block per layer
    torch.testing.assert_close(full.scores_, per_layer.scores_)
    assert [(b.start, b.stop) for b in full.blocks_] == [(0, 48), (48, 66)]


def test_woodfisher_on_mlpnet_digits_beats_magnitude_at_high_sparsity(digits):
    torch.manual_seed(0)
    m = ns.build_model("mlpnet", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=15, lr=0.05))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    acc = {}
    for method in ("magnitude", "woodfisher"):
        mm = ns.build_model("mlpnet", digits.input_shape)
        mm.load_state_dict(state)
        one_shot_prune(mm, digits.train, 0.9, method, FisherConfig(num_grads=400, block_size=500, damp=1e-4))
        acc[method] = ns.evaluate(mm, digits.test)[1]
    assert acc["woodfisher"] > acc["magnitude"] + 0.05


def test_errors():
    m, s = _trained()
    with pytest.raises(ValueError, match="method must be one of"):
        OneShotPruner("sorcery")
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        one_shot_prune(m, s, 1.0, "magnitude")
    with pytest.raises(ValueError, match="call fit"):
        OneShotPruner().prune(m, 0.5)
    with pytest.raises(ValueError, match="woodfisher over 66 weights with 1000 gradients and block_size=None needs "
                                         "about .* GiB but 0.0 GiB are available; use fewer num_grads"):
        OneShotPruner("woodfisher", FisherConfig(block_size=None), memory_limit=1000).fit(m, s)
    big = ns.build_model("mlpnet")
    with pytest.raises(ValueError, match="exact OBS is limited to 4096 weights"):
        OneShotPruner("obs").fit(big, Split(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"no Linear.* weight to compress \(it holds: 0: LSTM"):  # nothing to prune
        OneShotPruner().fit(nn.Sequential(nn.LSTM(2, 2)), s)


def test_relative_damp_scales_with_the_fisher():
    m, s = _trained()
    p = OneShotPruner("woodfisher", FisherConfig(num_grads=40, damp=0.5, relative_damp=True, block_size=None))
    p.fit(m, s)
    from netsurgeon.stats import collect_gradients

    g = collect_gradients(m, s, p.tensors_, 40, 1, 0)
    assert p.damp_ == pytest.approx(0.5 * float(g.pow(2).mean()), rel=1e-5)


def test_memory_is_estimated_and_logged_before_any_gradient_and_blocks_pick_the_cheaper_form(caplog):
    import logging

    from netsurgeon.linalg import ImplicitFisherInverse

    m, s = _trained()
    pruner = OneShotPruner("woodfisher", FisherConfig(num_grads=10, block_size=30))
    with caplog.at_level(logging.INFO, logger="netsurgeon.progress"):
        pruner.fit(m, s)
    assert "woodfisher: 66 weights, 10 gradients: about" in caplog.text
    # blocks of 30 weights with 10 gradients: 2·m·n = 600 numbers factored vs n² = 900 explicit
    assert all(isinstance(b.hinv, ImplicitFisherInverse) for b in pruner.blocks_ if len(b.alive) > 20)
    est = pruner.memory_estimate(66, 30)
    assert est["gradients"] == 4 * 10 * 66 and est["total"] > est["inverses"] > 0
    big = ns.build_model("lenet300")
    calls = []
    import netsurgeon.pruning.secondorder.curvature as wf  # where the gradients are collected

    orig = wf.collect_gradients
    wf.collect_gradients = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.raises(ValueError, match="use block_size=1000"):  # blocks of 1000: about 3.003 GiB
            OneShotPruner("woodfisher", FisherConfig(num_grads=1000, block_size=4000),
                          memory_limit=int(3.1 * 2**30)).fit(big, s)
    finally:
        wf.collect_gradients = orig
    assert calls == []   # refused before computing a single gradient


def test_woodtaylor_newton_step_never_hurts_when_nothing_is_pruned(digits):
    """Regression (issue 13): prune(model, 0.0) took the full Newton step -H^-1 g (0.936 -> 0.557 on digits)."""
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=3, lr=0.05))
    loss0, acc0 = ns.evaluate(m, digits.train)
    pruner = OneShotPruner("woodtaylor", FisherConfig(num_grads=200, block_size=500, damp=0.1)).fit(m, digits.train)
    report = pruner.prune(m, 0.0)
    assert ns.evaluate(m, digits.train)[0] <= loss0 + 1e-6
    assert report["sparsity"] == 0.0 and 0.0 <= report["step_scale"] <= 1.0
    with pytest.raises(ValueError, match="woodtaylor has no joint update"):
        OneShotPruner("woodtaylor", update="joint")


@pytest.mark.slow  # ~9 s: trains MLPNet for 10 epochs first
def test_obs_on_an_indefinite_hessian_keeps_accuracy_at_small_sparsity(digits):
    """Regression (issue 13): with the raw indefinite Hessian OBS pruned the most important weights first
    (MLPNet on digits: 0.969 -> 0.103 at 20% sparsity; 0.117 with this test's 64 samples, checked by
    replacing the projection with the identity)."""
    torch.manual_seed(0)
    m = ns.build_model("mlpnet", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=10, lr=0.05))
    dense = ns.evaluate(m, digits.test)[1]
    one_shot_prune(m, digits.train, 0.2, "obs", FisherConfig(num_grads=64, damp=1e-4))
    assert ns.evaluate(m, digits.test)[1] > dense - 0.02


def test_kronecker_inverse_equals_the_explicit_kronecker_matrix():
    from netsurgeon.linalg import KroneckerInverse

    g = torch.Generator().manual_seed(0)
    ga, gg = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    ainv, ginv = ga @ ga.T + torch.eye(5, dtype=torch.float64), gg @ gg.T + torch.eye(3, dtype=torch.float64)
    k = KroneckerInverse(ginv, ainv)
    full = torch.kron(ginv, ainv)  # row-major vec of a (3, 5) weight
    v = torch.randn(15, generator=g, dtype=torch.float64)
    torch.testing.assert_close(k.diagonal(), full.diagonal())
    torch.testing.assert_close(k @ v, full @ v)
    idx = torch.tensor([0, 7, 14])
    torch.testing.assert_close(k.columns(idx), full[:, idx])


def test_kfac_factors_of_one_sample_give_that_samples_fisher_exactly():
    """For one sample, the weight gradient is g aᵀ, so its outer product is exactly (g gᵀ) ⊗ (a aᵀ)."""
    from netsurgeon.stats import collect_gradients, kfac_factors

    m, s = _trained()
    grads = collect_gradients(m, s, ["1.weight", "3.weight"], 1, 1, seed=3).double()
    f = kfac_factors(m, s, ["1", "3"], 1, 1, seed=3)
    for name, (lo, hi) in (("1", (0, 48)), ("3", (48, 66))):
        a, gg = f[name]
        gv = grads[0, lo:hi]
        torch.testing.assert_close(torch.kron(gg, a), torch.outer(gv, gv), atol=1e-6, rtol=1e-5)
    # a CNN: K-FAC prunes its Linear layers and leaves the convolutions as they are (no KFC), never refuses it
    cnn = ns.build_model("digits_cnn")
    conv = cnn.conv1.weight.detach().clone()
    pruner = OneShotPruner("kfac", FisherConfig(num_grads=4)).fit(cnn, _split_images())
    pruner.prune(cnn, 0.5)
    torch.testing.assert_close(cnn.conv1.weight.detach(), conv)
    linear = [m.weight for m in cnn.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in linear) == round(0.5 * sum(w.numel() for w in linear))
    with pytest.raises(ValueError, match="K-FAC is implemented for Linear layers only and this model has none"):
        OneShotPruner("kfac").fit(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()), _split_images())


def _split_images():
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(16, 1, 8, 8, generator=g), torch.randint(10, (16,), generator=g))


def test_kfac_update_lowers_the_loss_and_small_sparsity_stays_near_dense():
    m, s = _trained()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        dense = float(nn.functional.cross_entropy(m(s.x), s.y))
    losses = {}
    for update in ("none", "single", "joint"):
        mm = _tiny()
        mm.load_state_dict(base)
        # damp 1e-2: with far less damping the sum of single-weight updates overshoots (0.80 vs 0.57 with no
        # update at 1e-4, measured) while the joint update stays exact; the same holds for woodfisher
        one_shot_prune(mm, s, 0.5, "kfac", FisherConfig(num_grads=300, damp=1e-2), update=update)
        with torch.no_grad():
            losses[update] = float(nn.functional.cross_entropy(mm(s.x), s.y))
    assert losses["single"] < losses["none"] and losses["joint"] < losses["none"]
    mm = _tiny()
    mm.load_state_dict(base)
    one_shot_prune(mm, s, 0.05, "kfac", FisherConfig(num_grads=300, damp=1e-4))
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(mm(s.x), s.y)) < dense + 0.1


def test_language_model_gradients_are_on_next_token_targets():
    """Token data ((B, T) targets, (B, T, V) logits): the Fisher's gradient rows are those of the mean
    next-token cross-entropy over every position, and a WoodFisher fit prunes the model."""
    import torch.nn.functional as F

    from netsurgeon.pruning.secondorder.pruner import next_token_logits
    from netsurgeon.stats import collect_gradients

    torch.manual_seed(0)
    m = ns.build_model("gpt", (8,), 16, n_layer=1, width=16, n_head=2)
    x = torch.randint(0, 16, (6, 8))
    data = Split(x, x.roll(-1, 1))
    names = ["blocks.0.mlp.fc1.weight"]
    with next_token_logits(m, data):
        row = collect_gradients(m, data, names, num_grads=1, batch_size=6)[0]
    idx = torch.randint(6, (1, 6), generator=torch.Generator().manual_seed(0))[0]  # the rows it drew
    m.zero_grad()
    F.cross_entropy(m(x[idx]).reshape(-1, 16), data.y[idx].reshape(-1)).backward()
    torch.testing.assert_close(row, m.blocks[0].mlp.fc1.weight.grad.flatten())
    assert m(x).shape == (6, 8, 16)  # the hook is gone after the fit
    rep = one_shot_prune(m, data, 0.5, fisher=FisherConfig(num_grads=4, block_size=32))
    assert rep["sparsity"] == pytest.approx(0.5, abs=0.01)
