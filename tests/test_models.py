import pytest
import torch

import netsurgeon as ns
from netsurgeon.models import arch_of, count_params


@pytest.mark.parametrize("name,params", [("lenet300", 266_610), ("lenet5", 431_080), ("mlpnet", 32_360)])
def test_reference_parameter_counts(name, params):
    m = ns.build_model(name)
    assert count_params(m) == params
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlpnet_has_no_bias_and_lenet5_is_caffe_layout():
    assert all(m.bias is None for m in ns.build_model("mlpnet").modules() if isinstance(m, torch.nn.Linear))
    m = ns.build_model("lenet5")
    assert [tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")] == [
        (20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]


def test_models_for_digits():
    m = ns.build_model("digits_cnn", (1, 8, 8))
    assert count_params(m) == 13_706
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert count_params(ns.build_model("lenet300", (1, 8, 8))) == 64 * 300 + 300 + 30_100 + 1_010
    assert arch_of(m) == {"name": "digits_cnn", "input_shape": [1, 8, 8], "num_classes": 10}


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        ns.build_model("vgg")
    with pytest.raises(ValueError, match="lenet5: input_shape must be"):
        ns.build_model("lenet5", (1, 8, 8))


def test_mlp_dropout_takes_its_own_input_rate_and_refuses_bad_rates():
    m = ns.build_model("mlp_dropout", widths=[1200, 1200], dropout=0.5, input_dropout=0.2)
    assert (m.drop0.p, m.drop1.p, m.drop2.p) == (0.2, 0.5, 0.5)
    assert ns.build_model("mlp_dropout", dropout=0.3).drop0.p == 0.3  # default: the hidden rate
    with pytest.raises(ValueError, match=r"input_dropout must be in \[0, 1\); got 1.5"):
        ns.build_model("mlp_dropout", input_dropout=1.5)
