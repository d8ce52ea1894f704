import pytest
import torch

import netsurgeon as ns
from netsurgeon.quantization.fixed_point import FixedPointTraining, fixed_point


def test_nearest_rounding_and_saturation_exact():
    x = torch.tensor([0.1, 0.2, -0.3, 7.9, -9.0])
    # <IL=4, FL=2>: step 0.25, range [-8, 7.75]
    assert fixed_point(x, 4, 2).tolist() == [0.0, 0.25, -0.25, 7.75, -8.0]


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.1)
    q = fixed_point(x, 4, 2, "stochastic", g)
    assert set(q.unique().tolist()) == {0.0, 0.25}
    assert float(q.mean()) == pytest.approx(0.1, abs=2e-3)   # nearest would give exactly 0.0


def test_stochastic_training_learns_where_nearest_stalls(digits):
    # 10 fractional bits: step 1e-3; with lr 0.01 most updates are smaller than half a step
    results = {}
    for rounding in ("nearest", "stochastic"):
        torch.manual_seed(0)
        m = ns.build_model("lenet300", digits.input_shape)
        ns.train(m, digits, ns.TrainConfig(epochs=10, lr=0.01, momentum=0.0, weight_decay=0.0),
                 callbacks=[FixedPointTraining(4, 10, rounding)])
        results[rounding] = ns.evaluate(m, digits.test)[1]
        assert all(torch.equal(p, fixed_point(p, 4, 10)) for p in m.parameters())  # stays on the grid
    assert results["stochastic"] > results["nearest"] + 0.3   # measured: 0.69 vs 0.12


def test_errors():
    with pytest.raises(ValueError, match="rounding must be one of"):
        fixed_point(torch.ones(1), 4, 2, "up")
    with pytest.raises(ValueError, match="frac_bits must be an int >= 0"):
        FixedPointTraining(4, -1)


def test_activations_and_backpropagated_errors_are_on_the_grid_while_training():
    """The paper's simulation (issue 13): layer outputs rounded after wide accumulation, errors rounded too."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    raw = {}
    m[0].register_forward_hook(lambda mod, i, out: raw.__setitem__("out", out))   # before the rounding hook
    cb = FixedPointTraining(4, 6, "nearest")
    cb.prepare(m)
    x = torch.randn(5, 4)
    assert torch.equal(m[0](x), fixed_point(m[0](x), 4, 6))                     # what the next layer sees
    out = m(x)
    raw["out"].register_hook(lambda g: raw.__setitem__("grad", g))
    (out * torch.linspace(0.001, 0.3, 2)).sum().backward()
    assert raw["grad"].abs().sum() > 0
    assert torch.equal(raw["grad"], fixed_point(raw["grad"], 4, 6))            # the error reaching the layer
    m.eval()
    assert not torch.equal(m[0](torch.full((1, 4), 0.013)), fixed_point(m[0](torch.full((1, 4), 0.013)), 4, 6))
    cb.finalize(m)
    m.train()
    x = torch.full((1, 4), 0.013)
    assert torch.equal(m[0](x), torch.nn.functional.linear(x, m[0].weight, m[0].bias))   # hooks removed
    params_only = FixedPointTraining(4, 6, "nearest", activations=False)
    params_only.prepare(m)
    assert torch.equal(m[0](x), torch.nn.functional.linear(x, m[0].weight, m[0].bias))
