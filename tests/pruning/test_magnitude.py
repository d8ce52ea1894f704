import logging
import math

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.masks import bake, get_masks, original
from netsurgeon.pruning.magnitude import (
    magnitude_mask,
    prune_and_retrain,
    prune_magnitude,
    quality_mask,
    round_targets,
)


def _net() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        signs = torch.tensor([1.0, -1.0]).repeat(10)
        m[0].weight.copy_(((torch.arange(20.0) + 0.5) * signs).view(5, 4))   # |w| = 0.5, 1.5, ..., 19.5
        m[2].weight.copy_(torch.arange(10.0).view(2, 5) + 1)
    return m


def test_magnitude_mask_removes_smallest_and_keeps_pruned_pruned():
    w = torch.tensor([0.3, -2.0, 0.1, 5.0, -0.2, 1.0])
    prev = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])   # -2.0 was pruned earlier
    assert magnitude_mask(w, prev, 0.5).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert magnitude_mask(w, torch.ones(6), 0.0).tolist() == [1.0] * 6


def test_quality_mask_uses_std_of_survivors():
    w = torch.tensor([1.0, -1.0, 3.0, -3.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    std = torch.tensor([1.0, -1.0, 3.0, -3.0]).std()  # sqrt(20/3) = 2.58
    assert quality_mask(w, mask, 1.0).tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert quality_mask(w, mask, float(3.0 / std) + 1e-4).tolist() == [0.0] * 5


def test_prune_magnitude_per_layer_exact_counts():
    m = _net()
    rep = {r.name: r for r in prune_magnitude(m, sparsity={"0": 0.25, "2.weight": 0.5})}
    assert rep["0.weight"].nonzero == 15 and rep["2.weight"].nonzero == 5
    assert rep["0.bias"].nonzero == 5  # biases untouched
    w = m[0].weight.detach().abs()
    assert w[w > 0].min() == 5.5  # the five smallest |w| (0.5 .. 4.5) are gone
    assert (original(m, "0.weight")[m[0].weight == 0] == 0).all()  # hidden originals zeroed too


def test_prune_magnitude_global_ranks_across_layers():
    m = _net()
    prune_magnitude(m, sparsity=0.5, scope="global")  # 15 of 30 weights, smallest |w| overall
    masks = get_masks(m)
    assert int(masks["0.weight"].mask.sum()) + int(masks["2.weight"].mask.sum()) == 15
    # layer 0 holds 0.5..19.5, layer 2 holds 1..10: the 15 smallest are 0.5, 1, 1.5, ..., 7.5
    assert int(masks["0.weight"].mask.sum()) == 12 and int(masks["2.weight"].mask.sum()) == 3


def test_repeated_pruning_only_tightens():
    m = _net()
    prune_magnitude(m, sparsity=0.5)
    first = get_masks(m)["0.weight"].mask.clone()
    prune_magnitude(m, sparsity=0.75)
    second = get_masks(m)["0.weight"].mask
    assert ((second == 1) <= (first == 1)).all() and int(second.sum()) == 5


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, math.nan, "0.5", True])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        prune_magnitude(_net(), sparsity=bad, scope="global" if bad == 1.5 else "layer")


def test_prune_errors_name_the_problem():
    with pytest.raises(ValueError, match="exactly one of sparsity or quality"):
        prune_magnitude(_net())
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc9'\]"):
        prune_magnitude(_net(), sparsity={"fc9": 0.5})
    mixed = nn.Sequential(nn.Linear(2, 2), nn.GRU(2, 2))   # the GRU is left as it is, the Linear pruned
    prune_magnitude(mixed, sparsity=0.5)
    assert int((mixed[0].weight == 0).sum()) == 2 and bool((mixed[1].weight_ih_l0 != 0).all())
    bad = _net()
    with torch.no_grad():
        bad[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'2.weight' holds 1 NaN/inf"):
        prune_magnitude(bad, sparsity=0.5)
    assert not get_masks(bad)  # nothing half-done


def test_round_targets():
    t = round_targets(0.875, 3)
    assert t == pytest.approx([0.5, 0.75, 0.875])


def test_pruned_weights_stay_zero_while_retraining_and_accuracy_recovers(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    cfg = ns.TrainConfig(epochs=10, lr=0.05)
    ns.train(m, digits, cfg)
    dense_acc = ns.evaluate(m, digits.test)[1]
    prune_magnitude(m, sparsity=0.9)
    hit_acc = ns.evaluate(m, digits.test)[1]
    prune_magnitude(m, sparsity=0.0)  # no-op: masks stay
    zeros = {n: p.mask == 0 for n, p in get_masks(m).items()}
    ns.train(m, digits, ns.TrainConfig(epochs=10, lr=0.01, seed=1))
    for n, z in zeros.items():
        assert (m.get_submodule(n.rsplit(".", 1)[0]).weight[z] == 0).all()
    assert ns.evaluate(m, digits.test)[1] > hit_acc + 0.02
    assert ns.evaluate(m, digits.test)[1] > dense_acc - 0.03


def test_prune_and_retrain_reaches_the_target(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=8, lr=0.05))
    results = prune_and_retrain(m, digits, sparsity={"fc1": 0.9, "fc2": 0.9, "fc3": 0.5}, rounds=2,
                                epochs_per_round=3, config=ns.TrainConfig(lr=0.05))
    assert len(results) == 2 and results[0].history[0]["lr"] == pytest.approx(0.005)
    kept = {n: float(p.mask.mean()) for n, p in get_masks(m).items()}
    assert kept == pytest.approx({"fc1.weight": 0.1, "fc2.weight": 0.1, "fc3.weight": 0.5}, abs=1e-3)
    assert ns.evaluate(m, digits.test)[1] > 0.9


def test_a_lower_target_keeps_baked_zeros_pruned(caplog):
    """Han et al. 2015 Sec. 3.3: pruned connections stay pruned. A model pruned to 75% and baked (masks multiplied in
    and dropped) holds exact zeros; asking it for 50% keeps every one of them masked, so retraining cannot revive
    them, and the log says the target was below the layer's sparsity."""
    m = _net()
    prune_magnitude(m, sparsity=0.75)
    bake(m)
    zeros = m[0].weight == 0
    assert int(zeros.sum()) == 15 and not get_masks(m)
    with caplog.at_level(logging.INFO, logger="netsurgeon.pruning.magnitude"):
        prune_magnitude(m, sparsity=0.5)
    assert bool((get_masks(m)["0.weight"].mask[zeros] == 0).all()) and int(get_masks(m)["0.weight"].mask.sum()) == 5
    assert "already sparser than asked" in caplog.text and "0 (75.0%)" in caplog.text
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    assert bool((m[0].weight[zeros] == 0).all())


def test_a_zero_initialized_bias_is_not_taken_for_a_pruned_one():
    """Exact zeros count as pruned, except in a tensor that is zero throughout: a zero-initialized bias (as
    transformers initialize theirs) must stay free to train when biases are pruned too."""
    m = _net()
    with torch.no_grad():
        m[0].bias.zero_()
    prune_magnitude(m, sparsity=0.5, include_bias=True)
    kept = int(get_masks(m)["0.bias"].mask.sum())
    assert kept == 3  # half of the 5 removed by the ranking (ties among zeros), not all 5 taken as pruned
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    assert int((m[0].bias != 0).sum()) == kept


def test_a_magnitude_stage_below_the_current_sparsity_keeps_the_masks_and_reports_it():
    m = ns.build_model("lenet5")
    records = ns.Pipeline.from_spec([{"magnitude": {"sparsity": 0.9, "epochs": 0}},
                                     {"magnitude": {"sparsity": {"fc2": 0.95, "conv1": 0.5}, "epochs": 0}}]).run(m)
    report = records[1]["report"]
    assert report["sparser_than_asked"] == {"conv1": pytest.approx(0.9, abs=1e-3)}  # fc2 went on to 95%
    assert report["kept_per_layer"]["conv1"] == pytest.approx(0.1, abs=1e-3)
    assert report["kept_per_layer"]["fc2"] == pytest.approx(0.05, abs=1e-3)
    assert "sparser_than_asked" not in records[0]["report"]


def test_magnitude_takes_layer_kinds_as_keys_and_a_layer_name_wins():
    """Per-layer sparsity keyed by layer kind, as dns's c_rate and kmeans's bits take it ({conv: ..., fc: ...})."""
    m = ns.build_model("lenet5")
    p = ns.Pipeline.from_spec([{"magnitude": {"sparsity": {"conv": 0.9, "fc": 0.5, "fc2": 0.2}, "epochs": 0}}])
    p.check_layers(m)
    kept = p.run(m)[0]["report"]["kept_per_layer"]
    assert kept == pytest.approx({"conv1": 0.1, "conv2": 0.1, "fc1": 0.5, "fc2": 0.8}, abs=1e-3)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['lstm'\].*conv/fc/embedding"):
        prune_magnitude(_net(), sparsity={"lstm": 0.5})
