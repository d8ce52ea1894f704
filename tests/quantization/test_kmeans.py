import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.pruning.magnitude import prune_magnitude
from netsurgeon.quantization.kmeans import SharedWeights, kmeans_1d, share_weights


def test_kmeans_1d_exact_on_separated_groups():
    x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.2, 9.9, 10.0, 10.1])
    for init in ("linear", "density", "random"):
        c, labels = kmeans_1d(x, 3, init=init, seed=1)
        torch.testing.assert_close(c, torch.tensor([0.1, 5.1, 10.0], dtype=torch.float64))
        assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_weighted_kmeans_pulls_centroid_to_heavy_points():
    x = torch.tensor([0.0, 1.0])
    c, _ = kmeans_1d(x, 1, sample_weight=torch.tensor([3.0, 1.0]))
    assert float(c[0]) == pytest.approx(0.25)


def test_share_weights_keeps_zeros_and_uses_few_values():
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=0.9)
    zeros = m.fc1.weight == 0
    rep = share_weights(m, bits={"fc": 4})
    assert all(r.clusters == 15 for r in rep)
    assert (m.fc1.weight[zeros] == 0).all()
    assert torch.unique(m.fc1.weight).numel() <= 16
    assert rep[0].rms_error < 0.01


def test_centroid_gradient_is_the_sum_of_member_gradients():
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 1.0]]))
    from torch.nn.utils import parametrize

    p = SharedWeights(torch.tensor([1.0]), torch.tensor([[1, 0, 1]]))
    parametrize.register_parametrization(lin, "weight", p, unsafe=True)
    x = torch.tensor([[2.0, 3.0, 5.0]])
    lin(x).sum().backward()
    assert p.codebook.grad.tolist() == [7.0]   # dL/dw0 + dL/dw2 = 2 + 5; the pruned weight adds nothing


def test_fine_tuning_centroids_recovers_accuracy(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=10, lr=0.05))
    prune_magnitude(m, sparsity=0.8)
    share_weights(m, bits=2)  # 3 shared values per layer: a big hit
    hit = ns.evaluate(m, digits.test)[1]
    zeros = m.fc1.weight == 0
    ns.train(m, digits, ns.TrainConfig(epochs=5, lr=0.01, weight_decay=0))
    assert ns.evaluate(m, digits.test)[1] > hit
    assert (m.fc1.weight[zeros] == 0).all()
    assert torch.unique(m.fc1.weight).numel() <= 4


def test_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans_1d(torch.ones(3), 2, init="kmeans++")
    with pytest.raises(ValueError, match=r"bits for layer 'fc1' must be in \[1, 16\]"):
        share_weights(ns.build_model("lenet300"), bits={"fc1": 20, "fc": 4})


def test_global_sharing_uses_one_codebook_for_all_layers():
    from netsurgeon.quantization.kmeans import share_weights_global

    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=0.9)
    zeros = m.fc2.weight == 0
    rep = share_weights_global(m, bits=4)
    vals = torch.cat([m.fc1.weight.flatten(), m.fc2.weight.flatten(), m.fc3.weight.flatten()]).unique()
    assert vals.numel() <= 16 and rep.clusters == 15
    assert (m.fc2.weight[zeros] == 0).all()
    books = {id(p.codebook) for n, p in m.named_modules() if isinstance(p, SharedWeights)}
    assert len(books) == 1
    assert sum(1 for _ in m.parameters() if _.numel() == 15) == 1  # shared, not copied


def test_hessian_weighting_moves_centroids_to_important_weights():
    from netsurgeon.quantization.kmeans import share_weights_global

    lin = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, 2.0, 10.0, 11.0]]))
    imp = {"0.weight": torch.tensor([[1.0, 100.0, 1.0, 1.0]])}
    share_weights_global(lin, bits=1, importance=imp)  # one shared value
    # weighted mean (1 + 200 + 10 + 11) / 103 instead of the plain mean 6
    assert float(lin[0].weight[0, 0].detach()) == pytest.approx(222 / 103, rel=1e-5)


def test_global_sharing_of_an_all_zero_model_is_a_clear_error():
    from netsurgeon.quantization.kmeans import share_weights_global

    m = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight.zero_()
    with pytest.raises(ValueError, match="every weight of the model is zero"):
        share_weights_global(m, bits=3)
