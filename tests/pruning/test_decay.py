import pytest
import torch

import netsurgeon as ns
from netsurgeon.pipeline import Pipeline
from netsurgeon.pruning.decay import BiasedWeightDecay


@pytest.mark.parametrize("bias,per", [("standard", "unit"), ("hyperbolic", "unit"), ("exponential", "unit"),
                                      ("hyperbolic", "weight"), ("exponential", "weight")])
def test_the_added_gradient_is_the_gradient_of_the_penalty(bias, per):
    torch.manual_seed(0)
    model = ns.build_model("digits_cnn")
    cb = BiasedWeightDecay(0.3, bias, per, scale=0.7)
    cb.prepare(model)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for w in weights:
        w.grad = torch.zeros_like(w)
    cb.after_backward()
    added = [w.grad.clone() for w in weights]
    for w in weights:
        w.grad = None
    penalty = sum(cb._term(w) for w in weights) * 0.3
    penalty.backward()
    for got, w in zip(added, weights, strict=True):
        torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-7)
    assert float(cb.penalty()) == pytest.approx(float(penalty.detach()), rel=1e-5)


def test_the_unit_bias_decays_a_weak_unit_faster_than_a_strong_one():
    cb = BiasedWeightDecay(1.0, "hyperbolic", "unit")
    lin = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight[:] = torch.tensor([[0.1, 0.1, 0.1, 0.1], [2.0, 2.0, 2.0, 2.0]])
    cb.prepare(lin)
    lin.weight.grad = torch.zeros_like(lin.weight)
    cb.after_backward()
    rel = lin.weight.grad.abs() / lin.weight.detach().abs()
    assert float(rel[0].min()) > 100 * float(rel[1].max())  # 1/(1.4)^2/0.1 vs 1/81/2


def test_biased_decay_stage_trains_then_cuts_to_the_sparsity(digits):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    records = Pipeline.from_spec([{"biased_decay": {"epochs": 1, "lam": 1e-3, "sparsity": 0.8,
                                                    "weight_decay": 0.0}}]).run(model, digits)
    assert records[0]["report"]["kept"] == pytest.approx(0.2, abs=1e-3)
    with pytest.raises(ValueError, match="biased_decay: bias must be one of"):
        Pipeline.from_spec([{"biased_decay": {"bias": "cubic"}}])
