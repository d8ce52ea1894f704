import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.pruning.magnitude import prune_magnitude
from netsurgeon.runtime import CSRLinear, sparsify_linear_layers


def test_csr_linear_matches_dense():
    torch.manual_seed(0)
    lin = nn.Linear(30, 7)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    fast = CSRLinear(lin.weight, lin.bias)
    x = torch.randn(4, 30)
    torch.testing.assert_close(fast(x), lin(x), atol=1e-6, rtol=1e-5)
    assert "nnz=" in repr(fast)


def test_only_sparse_enough_layers_are_converted():
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity={"fc1": 0.95, "fc2": 0.5})
    fast = sparsify_linear_layers(m, min_sparsity=0.9)
    assert isinstance(fast.fc1, CSRLinear) and isinstance(fast.fc2, nn.Linear)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


def test_load_compressed_with_sparse_kernels(tmp_path):
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=0.95)
    ns.save_compressed(m, tmp_path / "s.nsz")
    fast = ns.load_compressed(tmp_path / "s.nsz", sparse_kernels=True)
    assert isinstance(fast.fc1, CSRLinear) and not fast.training
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


def test_tuning_keeps_dense_where_csr_loses():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        m[0].weight[:, 1:] = 0  # 87.5% sparse, but a tiny layer: CSR's fixed cost loses at batch 1
    assert isinstance(sparsify_linear_layers(m, min_sparsity=0.5)[0], CSRLinear)
    assert isinstance(sparsify_linear_layers(m, min_sparsity=0.5, tune_batch=1)[0], nn.Linear)
