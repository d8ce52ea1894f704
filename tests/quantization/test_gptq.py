"""Group-wise grids, RTN and GPTQ: exact grid values, GPTQ = RTN when there is nothing to compensate, GPTQ beats RTN
on a trained network's real activations, act-order storage, and sparse + quantized composition."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netsurgeon.data import Dataset, Split
from netsurgeon.linalg import damp_layer_hessian
from netsurgeon.masks import get_masks
from netsurgeon.pipeline import Pipeline, weight_form
from netsurgeon.quantization.gptq import act_order_permutation, gptq_quantize
from netsurgeon.quantization.groupwise import (
    GroupQuantWeights,
    dequantize,
    grid_params,
    install_group_quant,
    quantize,
    rtn_quantize,
)
from netsurgeon.stats import num_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second torch thread only adds contention on a shared machine (measured: 8x slower)."""
    with num_threads(1):
        yield



def test_grid_values_and_zero_is_always_exact():
    s, z = grid_params(torch.tensor([[0.0, 0.3, 1.5]]), bits=4, symmetric=False)   # xmin 0, xmax 1.5
    assert s.tolist() == pytest.approx([0.1]) and z.tolist() == [0.0]
    s, z = grid_params(torch.tensor([[-1.0, 0.5, 2.0]]), bits=2, symmetric=False)  # 3 levels of 1.0 from -1
    assert s.tolist() == [1.0] and z.tolist() == [1.0]
    assert quantize(torch.tensor([-1.0, 0.4, 0.6, 2.0, 9.0]), s, z, 3).tolist() == [0, 1, 2, 3, 3]
    s, z = grid_params(torch.tensor([[0.5, 2.0]]), bits=3, symmetric=True)          # a = 2: scale 4/7, zero 4
    assert s.tolist() == pytest.approx([4 / 7]) and z.tolist() == [4.0]
    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        for sym in (False, True):
            x = torch.randn(8, 32, generator=g) * torch.rand(8, 1, generator=g)
            x[:, ::3] = 0
            sc, zp = grid_params(x, bits, sym)
            back = dequantize(quantize(x, sc[:, None], zp[:, None], 2**bits - 1), sc[:, None], zp[:, None])
            assert (back[:, ::3] == 0).all(), (bits, sym)
            assert (back - x).abs().max() <= sc.max() * (1.0 if sym else 0.5) + 1e-6   # sym clips by half a step


def test_rtn_codes_scales_and_the_parametrization_round_trip():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 10, generator=g)
    codes, scales, zeros, deq = rtn_quantize(W, 4, 4, symmetric=False)               # groups 4, 4, 2
    assert codes.dtype == torch.uint8 and scales.shape == (3, 3) and zeros.shape == (3, 3)
    for a in (0, 4, 8):
        s, z = grid_params(W[:, a:a + 4], 4, False)
        torch.testing.assert_close(deq[:, a:a + 4], dequantize(quantize(W[:, a:a + 4], s[:, None], z[:, None], 15),
                                                               s[:, None], z[:, None]))
    par = GroupQuantWeights(codes, scales, zeros, 4, 4)
    torch.testing.assert_close(par(torch.empty(3, 10)), deq)
    lin = nn.Linear(10, 3)
    install_group_quant(lin and nn.Sequential(lin), "0.weight", par)
    torch.testing.assert_close(lin.weight, deq)
    assert {"parametrizations.weight.0.q", "parametrizations.weight.0.scales",
            "parametrizations.weight.0.zeros"} <= set(lin.state_dict())


def test_gptq_equals_rtn_when_the_hessian_is_diagonal():
    """Uncorrelated inputs: the OBS update of column i touches no other column, so GPTQ rounds like RTN."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, generator=g, dtype=torch.float64)
    H = torch.diag(torch.rand(16, generator=g, dtype=torch.float64) + 0.1)
    for group, sym in ((4, False), (None, True)):
        res = gptq_quantize(W, H, bits=3, group_size=group, symmetric=sym, block_size=8)
        codes, scales, zeros, deq = rtn_quantize(W, 3, group, sym)
        assert torch.equal(res.codes, codes)
        torch.testing.assert_close(res.weight, deq, rtol=0, atol=1e-12)
        Hd, _ = damp_layer_hessian(H, 0.01)
        delta = W - res.weight
        torch.testing.assert_close(res.loss, 0.5 * ((delta @ Hd) * delta).sum(1), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def digits_mlp_activations(digits):
    """A digits MLP (64-64-32-10) trained for 200 full-batch Adam steps; the inputs of its second layer on the
    training split (calibration) and on the test split (held out)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with num_threads(1):  # tiny matmuls: a second thread only adds contention on a shared machine
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(model(digits.train.x), digits.train.y).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(digits.test.x).argmax(1) == digits.test.y).float().mean().item()
        hidden = model[:3]
        return model[3].weight.detach().double(), hidden(digits.train.x).double(), hidden(digits.test.x).double(), acc


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_real_activations(digits_mlp_activations, bits):
    W, Xtr, Xte, acc = digits_mlp_activations
    assert acc > 0.9                                        # the network really is trained
    H = 2 * Xtr.T @ Xtr / len(Xtr)
    res = gptq_quantize(W, H, bits=bits, group_size=32)
    rtn = rtn_quantize(W, bits, 32, symmetric=False)[3]

    def err(Wq, X):
        return float(((W - Wq) @ X.T).square().sum())
    for X in (Xtr, Xte):
        assert err(res.weight, X) < 0.5 * err(rtn, X), (bits, err(res.weight, X), err(rtn, X))  # measured 0.06-0.07


def test_act_order_stores_codes_in_processing_order():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    W = torch.randn(4, 12, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 50
    res = gptq_quantize(W, H, bits=4, group_size=4, act_order=True)
    assert torch.equal(res.perm, torch.sort(H.diagonal(), descending=True, stable=True).indices)
    assert torch.equal(res.perm, act_order_permutation([H]))
    par = GroupQuantWeights(res.codes, res.scales.float(), res.zeros.to(torch.uint8), 4, 4, res.perm)
    torch.testing.assert_close(par(torch.empty(4, 12)).double(), res.weight, rtol=1e-6, atol=1e-6)
    for gi in range(3):                                     # group gi = the columns perm[4 gi : 4 gi + 4]
        cols = res.perm[4 * gi:4 * gi + 4]
        vals = res.weight[:, cols]
        step = res.scales[:, gi:gi + 1]
        assert torch.allclose(vals / step, torch.round(vals / step), atol=1e-6)


def _data(n=32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(k):
        return Split(torch.randn(k, d, generator=g), torch.randint(0, 4, (k,), generator=g))
    return Dataset("random", split(n), split(8), split(8), num_classes=4)


def test_sparse_then_int4_keeps_every_pruned_weight_exactly_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = _data()
    Pipeline.from_spec([{"sparsegpt": {"pattern": "2:4", "samples": 32}}]).run(model, data)
    pruned = {n: m.mask == 0 for n, m in get_masks(model).items()}
    rec = Pipeline.from_spec([{"gptq": {"bits": 4, "group_size": 8, "samples": 32}}]).run(model, data)
    assert weight_form(model) == "grouped" and not get_masks(model)
    for n, p in pruned.items():
        par = model.get_submodule(n.removesuffix(".weight")).parametrizations.weight[0]
        assert (model.get_submodule(n.removesuffix(".weight")).weight[p] == 0).all()
        zeros = par.zeros.repeat_interleave(8, dim=1)
        assert torch.equal(par.q[p], zeros[p])              # stored as the zero point's code
    assert rec[0]["report"]["pruned_zeros_kept"] == sum(int(p.sum()) for p in pruned.values()) == 256 + 64
    with pytest.raises(ValueError, match="stage 1 'sparsegpt' needs float weights, but the input model leaves "
                                         "group-quantized weights"):
        Pipeline.from_spec(["sparsegpt"]).run(model, data)


def test_gptq_and_rtn_errors_name_the_method():
    from netsurgeon.pipeline import get_method

    with pytest.raises(ValueError, match=r"^gptq: bits must be an integer in \[2, 8\]; got 9\.$"):
        get_method("gptq").make_config({"bits": 9})
    with pytest.raises(ValueError, match=r"^rtn: group_size must be an integer >= 2 or null; got 1\.$"):
        get_method("rtn").make_config({"group_size": 1})


def test_rtn_after_pruning_keeps_the_zeros_and_needs_no_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    Pipeline.from_spec([{"magnitude": {"sparsity": 0.5, "epochs": 0}}]).run(model)
    pruned = {n: m.mask == 0 for n, m in get_masks(model).items()}
    Pipeline.from_spec([{"rtn": {"bits": 2, "group_size": 4, "symmetric": True}}]).run(model)
    for n, p in pruned.items():
        w = model.get_submodule(n.removesuffix(".weight")).weight
        assert (w[p] == 0).all() and (w[~p] != 0).sum() > 0
        assert len(torch.unique(w[0, :4])) <= 4
