import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.pruning.autoprune import AutoPrune, AuxGate, ste_derivative


def test_ste_derivatives():
    m = torch.tensor([-2.0, 0.0, 3.0])
    assert ste_derivative(m, "identity").tolist() == [1.0, 1.0, 1.0]
    assert ste_derivative(m, "leaky_relu", alpha=0.1).tolist() == pytest.approx([0.1, 0.1, 1.0])
    assert ste_derivative(m, "softplus").tolist() == pytest.approx(torch.sigmoid(m).tolist())
    with pytest.raises(ValueError, match="kind must be one of"):
        ste_derivative(m, "relu")


def _gated(**rules):
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
    gate = AuxGate(torch.tensor([[1.0, -1.0, 1.0]]), "leaky_relu", 0.1, **rules)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", gate, unsafe=True)
    return lin, gate


def test_indicator_forward_and_plain_chain_rule():
    lin, gate = _gated(sensitivity=False, correlation=False, direction=False)
    assert lin.weight.tolist() == [[2.0, 0.0, 0.5]]      # h(m) = 1[m > 0]; the pruned weight keeps its value
    x = torch.tensor([[1.0, 2.0, 3.0]])
    lin(x).sum().backward()
    w_grad = lin.parametrizations.weight.original.grad
    assert w_grad.tolist() == [[1.0, 0.0, 3.0]]          # masked gradient without "correlation"
    assert gate.m.grad[0].tolist() == pytest.approx([2.0, -0.2, 1.5])   # dL/dT * w * h'(m)


def test_update_rules_change_the_gradients():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    lin, gate = _gated(sensitivity=False, correlation=True, direction=True)
    lin(x).sum().backward()
    assert lin.parametrizations.weight.original.grad.tolist() == [[1.0, 2.0, 3.0]]  # straight through
    assert gate.m.grad[0].tolist() == pytest.approx([1.0, -0.2, 3.0])                # sgn(w) * h'(m)
    lin, gate = _gated(sensitivity=True, correlation=False, direction=False)
    lin(x).sum().backward()
    mean = (2.0 + 1.0 + 0.5) / 3
    assert gate.m.grad[0].tolist() == pytest.approx([2.0 / mean, -0.2 / mean, 1.5 / mean])


def test_pruned_weight_recovers_when_its_m_is_pushed_back():
    lin, gate = _gated()
    opt = torch.optim.SGD([gate.m], lr=1.0)
    x = torch.tensor([[0.0, 1.0, 0.0]])
    for _ in range(20):   # a loss that wants the pruned weight's output larger (w = -1, so T more negative)
        opt.zero_grad()
        (lin(x).sum()).backward()
        opt.step()
    assert float(gate.m[0, 1].detach()) > 0 and lin.weight[0, 1].item() == -1.0


def test_bilevel_m_follows_the_validation_loss_only(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=3, lr=0.05))
    ap = AutoPrune(mu=0.0, m_every=1000)   # no M step within the run
    ns.train(m, digits, ns.TrainConfig(epochs=1, lr=0.01), callbacks=[ap])
    assert all(float((g.m.detach() - 0.05).abs().max()) == 0 for g in ap._gates.values())  # training loss never moved M
    ap2 = AutoPrune(mu=0.0, m_every=1)
    m2 = ns.build_model("lenet300", digits.input_shape)
    ns.train(m2, digits, ns.TrainConfig(epochs=1, lr=0.01), callbacks=[ap2])
    assert any(float((g.m.detach() - 0.05).abs().max()) > 0 for g in ap2._gates.values())


def test_autoprune_prunes_without_a_threshold_and_keeps_accuracy(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=10, lr=0.05))
    dense = ns.evaluate(m, digits.test)[1]
    ap = AutoPrune(mu=2.0, m_lr=0.01)
    ns.train(m, digits, ns.TrainConfig(epochs=8, lr=0.01), callbacks=[ap])
    nz, total = ns.stats.count_nonzero(m)
    assert nz < 0.5 * total
    assert ns.evaluate(m, digits.test)[1] > dense - 0.05
    assert ap.history_[0]["kept"]["fc1"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="ste must be one of"):
        AutoPrune(ste="relu")
    with pytest.raises(ValueError, match="mu must be a number >= 0"):
        AutoPrune(mu=-1)
    with pytest.raises(ValueError, match=r"no Linear.* weight to compress \(it holds: 0: LSTM"):
        AutoPrune().prepare(nn.Sequential(nn.LSTM(2, 2)))


def test_l1_proximal_step_is_exact_soft_thresholding(digits):
    from netsurgeon.pruning.l1 import L1Proximal

    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        m[1].weight.fill_(0.0)
        m[1].weight[0, :3] = torch.tensor([0.5, -0.004, 0.002])
    w0 = m[1].weight.detach().clone()

    class Fake:
        model = m
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)

    L1Proximal(0.03).after_step(Fake())   # shrink by lr * lam = 0.003
    assert m[1].weight[0, :3].tolist() == pytest.approx([0.497, -0.001, 0.0])
    assert (m[1].weight[1:] == w0[1:]).all()
