import pytest
import torch

import netsurgeon as ns
from netsurgeon.pipeline import Pipeline
from netsurgeon.quantization.hwgq import half_gaussian_step, hwgq, hwgq_inputs_of


def test_the_step_reproduces_the_papers_half_gaussian_quantizers():
    assert half_gaussian_step(1) == pytest.approx((2 / torch.pi) ** 0.5, abs=2e-3)  # E[x | x > 0] = 0.798
    assert half_gaussian_step(2) == pytest.approx(0.538, abs=2e-3)  # Cai et al. 2017, Sec. 3.2


def test_forward_levels_and_the_three_backward_approximations():
    x = torch.tensor([-1.0, 0.1, 0.6, 1.0, 1.5, 3.0], requires_grad=True)
    d = half_gaussian_step(2)
    y = hwgq(x, 2, "clipped")
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, d, d, 2 * d, 3 * d, 3 * d]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))  # 0 < x <= q_max = 3Δ = 1.61
    x.grad = None
    hwgq(x, 2, "relu").sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1]))
    x.grad = None
    hwgq(x, 2, "log_tailed").sum().backward()
    assert float(x.grad[-1]) == pytest.approx(1 / (3.0 - (3 * d - 1)))


def test_hwgq_network_trains_saves_and_reloads_with_its_quantizers(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("mlp_bn", digits.input_shape, widths=[64, 64])
    Pipeline.from_spec([{"hwgq": {"epochs": 1, "max_steps": 30}}]).run(model, digits)
    assert set(hwgq_inputs_of(model)) == {"fc2", "fc3"}  # every layer but the first
    x = digits.test.x[:16]
    model.eval()
    with torch.no_grad():
        ref = model(x)
    info = ns.save_compressed(model, tmp_path / "h.nsz")
    assert info.header["arch"]["hwgq_inputs"] == {"fc2": 2, "fc3": 2}
    assert {r.codec for r in info.records if r.name == "fc2.weight"} == {"binary"}
    loaded = ns.load_compressed(tmp_path / "h.nsz")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)
    # the quantizer is really there: its activations take 4 values
    seen = []
    loaded.fc3.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    h = loaded.fc3._forward_pre_hooks
    with torch.no_grad():
        loaded(x)
    assert len(h) == 2 and len(torch.unique(seen[0])) <= 4
