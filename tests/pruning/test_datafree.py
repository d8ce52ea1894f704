import pytest
import torch

import netsurgeon as ns
from netsurgeon.pipeline import Pipeline
from netsurgeon.pruning.datafree import greedy_merge_order, merge_neurons, mergeable_layers, pair_saliency


def test_saliency_is_mean_squared_outgoing_weight_times_distance_of_incoming_sets():
    g = torch.Generator().manual_seed(0)
    w, a = torch.randn(6, 4, generator=g), torch.randn(3, 6, generator=g)
    s = pair_saliency(w, a)
    for i in range(6):
        for j in range(6):
            want = float("inf") if i == j else float((a[:, j] ** 2).mean() * ((w[i] - w[j]) ** 2).sum())
            assert float(s[i, j]) == pytest.approx(want, rel=1e-6)


def test_greedy_merge_updates_the_kept_neurons_outgoing_weights():
    # neurons 0 and 1 identical, 2 close to them; after merging 1 into 0, a_0 grew, so the next pair must be
    # judged with the new <a_0^2>: brute force over the remaining pairs
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.1, 0.0], [-3.0, 2.0]])
    a = torch.tensor([[1.0, 2.0, 0.1, 1.0]])
    merges, sal, a_new = greedy_merge_order(w, a, 2)
    assert merges[0] == (0, 1) or merges[0] == (1, 0)
    kept, gone = merges[0]
    a1 = a.clone()
    a1[:, kept] += a1[:, gone]
    alive = [k for k in range(4) if k != gone]
    best = min((float((a1[:, j] ** 2).mean() * ((w[i] - w[j]) ** 2).sum()), (i, j))
               for i in alive for j in alive if i != j)
    assert merges[1] == best[1] and sal[1] == pytest.approx(best[0])
    assert float(a_new[:, merges[1][0]].sum()) == pytest.approx(float(a1[:, merges[1][0]] + a1[:, merges[1][1]]))


def test_merging_duplicate_neurons_is_exact_and_the_file_rebuilds_the_smaller_model(tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet5")
    with torch.no_grad():  # three copies of neuron 10 in fc1, with their own outgoing weights
        for k in (20, 30, 40):
            model.fc1.weight[k] = model.fc1.weight[10]
            model.fc1.bias[k] = model.fc1.bias[10]
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    reports = merge_neurons(model, {"fc1": 3 / 500}, (1, 28, 28), curve=True)
    (r,) = reports
    assert (r.before, r.after) == (500, 497) and {j for _, j in r.merges} <= {10, 20, 30, 40}
    assert max(r.saliencies) < 1e-9 and len(r.curve) == 499 and r.curve[3] > 0
    assert model.fc1.out_features == 497 and model.fc2.in_features == 497
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    ns.save_compressed(model, tmp_path / "m.nsz")
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "m.nsz")(x), model(x))


def test_without_surgery_the_same_removal_loses_the_duplicates_contribution():
    torch.manual_seed(0)
    model = ns.build_model("lenet300")
    with torch.no_grad():
        model.fc2.weight[7] = model.fc2.weight[3]
        model.fc2.bias[7] = model.fc2.bias[3]
        model.fc3.weight[:, 7] = 5.0  # the removed neuron carries a lot downstream
    x = torch.randn(4, 1, 28, 28)
    plain = __import__("copy").deepcopy(model)
    with torch.no_grad():
        ref = model(x)
    merge_neurons(model, {"fc2": 0.01}, (1, 28, 28))
    merge_neurons(plain, {"fc2": 0.01}, (1, 28, 28), surgery=False)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() < 1e-4 < (plain(x) - ref).abs().max()


def test_pipeline_stage_and_the_layers_it_refuses():
    torch.manual_seed(0)
    model = ns.build_model("lenet300")
    assert set(mergeable_layers(model, (1, 28, 28))) == {"fc1", "fc2"}  # fc3 is the output
    assert mergeable_layers(ns.build_model("mlp_bn"), (1, 28, 28)) == {}  # BatchNorm between: a_i + a_j is wrong
    records = Pipeline.from_spec([{"datafree": {"fraction": 0.5}}]).run(model)  # no data needed
    assert (model.fc1.out_features, model.fc2.out_features) == (150, 50)
    assert [row["after"] for row in records[0]["report"]["layers"]] == [150, 50]
    with pytest.raises(ValueError, match="'fc3' is not a Linear layer whose neurons can be merged"):
        merge_neurons(ns.build_model("lenet300"), {"fc3": 0.5}, (1, 28, 28))
    with pytest.raises(ValueError, match="no hidden Linear layer"):
        merge_neurons(ns.build_model("digits_cnn").conv1, 0.5, (1, 8, 8))
    with pytest.raises(ValueError, match="datafree: fraction must be"):
        Pipeline.from_spec([{"datafree": {"fraction": 1.0}}])


def test_zero_partner_drops_a_silent_neuron_instead_of_adding_it_to_a_live_one():
    # neuron 2 has tiny incoming weights; the closest real neuron is far from it, the zero neuron is not
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.01, 0.0], [5.0, 5.0]])
    a = torch.ones(3, 4)
    merges, sal, a_new = greedy_merge_order(w, a, 1, zero_partner=True)
    assert merges == [(-1, 2)] and sal[0] == pytest.approx(0.01 ** 2)
    assert torch.equal(a_new, a)  # dropped: no outgoing weights moved
    merges, _, a_new = greedy_merge_order(w, a, 1)  # the paper's rule must pick a real partner
    assert merges[0][1] == 2 and merges[0][0] >= 0 and float(a_new[0, merges[0][0]]) == 2.0
