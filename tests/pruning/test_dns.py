import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.masks import StraightThroughMask, get_masks, original
from netsurgeon.pruning.dns import DNS, dns_thresholds, dns_update_mask, surgery_probability


def test_band_rule_exact():
    w = torch.tensor([0.05, 0.5, 0.5, 2.0, -0.05, -1.0])
    prev = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert dns_update_mask(w, prev, a=0.1, b=1.0).tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_thresholds_follow_the_official_rule():
    w = torch.tensor([[1.0, -3.0], [0.0, 2.0]])   # nonzero |w| = 1, 3, 2 (the zero is ignored)
    b = torch.tensor([-2.0])                       # biases join the statistics: 1, 3, 2, 2
    mu, sigma = 2.0, (0.5) ** 0.5
    a, bb = dns_thresholds([w, b], c=1.0)
    assert a == pytest.approx(0.9 * (mu + sigma)) and bb == pytest.approx(1.1 * (mu + sigma))
    assert dns_thresholds([w, b], c=-10.0) == (0.0, 0.0)  # max(., 0)


def test_probability_schedule():
    assert surgery_probability(0, 1e-3, 1.0) == 1.0
    assert surgery_probability(1000, 1e-3, 1.0) == pytest.approx(0.5)
    assert surgery_probability(3000, 1e-3, 2.0) == pytest.approx(1 / 16)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_prepare_attaches_straight_through_masks_on_weights_and_biases():
    m = _net()
    DNS().prepare(m)
    masks = get_masks(m)
    assert set(masks) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(isinstance(p, StraightThroughMask) for p in masks.values())


def test_gradient_reaches_pruned_weights():
    m = _net()
    DNS(c_rate=-10.0).prepare(m)  # threshold max(mu - 10 sigma, 0) = 0: the first surgery keeps everything
    get_masks(m)["2.weight"].mask.zero_()
    m(torch.randn(4, 6)).pow(2).sum().backward()
    assert (original(m, "2.weight").grad != 0).any()


class _Fake:
    def __init__(self, model):
        self.model = model


def test_splicing_brings_a_pruned_weight_back():
    m = _net()
    dns = DNS(c_rate=0.0, gamma=0.0)     # update every iteration; theta = mean |w|
    dns.on_train_start(_Fake(m))
    a, b = dns.layers_["2"].a, dns.layers_["2"].b
    w = original(m, "2.weight")
    with torch.no_grad():
        w[0, 0] = 0.5 * a                 # pruned at the next update
    dns.after_step(_Fake(m))
    mask = get_masks(m)["2.weight"].mask
    assert mask[0, 0] == 0 and m[2].weight[0, 0] == 0
    with torch.no_grad():
        w[0, 0] = 0.5 * (a + b)           # inside the band: stays pruned
    dns.after_step(_Fake(m))
    assert mask[0, 0] == 0
    with torch.no_grad():
        w[0, 0] = 2 * b                   # grown back past b: spliced
    dns.after_step(_Fake(m))
    assert mask[0, 0] == 1 and m[2].weight[0, 0] == 2 * b
    assert dns.layers_["2"].spliced >= 1 and dns.layers_["2"].pruned >= 1


def test_no_updates_outside_the_window_and_phases():
    m = _net()
    dns = DNS.separate_phases(conv_iters=5, fc_iters=5, c_rate=1.0, gamma=0.0)
    dns.prepare(m)
    assert dns.layers_["0"].start == 5 and dns.layers_["0"].stop == 10  # no conv: both FC, phase 2
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    d2 = DNS.separate_phases(conv_iters=3, fc_iters=4, c_rate=1.0, gamma=0.0)
    d2.on_train_start(_Fake(conv))
    assert d2.layers_["0"].updates == 1 and d2.layers_["2"].updates == 0
    for _ in range(9):
        d2.after_step(_Fake(conv))
    assert d2.layers_["0"].updates == 3 and d2.layers_["2"].updates == 4


def test_dns_prunes_while_training_and_keeps_accuracy(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=10, lr=0.05))
    dense_acc = ns.evaluate(m, digits.test)[1]
    dns = DNS(c_rate=1.0, gamma=1e-2, iter_stop=300, log_every=50)
    ns.train(m, digits, ns.TrainConfig(epochs=20, lr=0.01), callbacks=[dns])
    nz, total = ns.stats.count_nonzero(m)
    assert nz < 0.25 * total
    assert ns.evaluate(m, digits.test)[1] > dense_acc - 0.04
    s = dns.summary()
    assert sum(v["spliced"] for v in s.values()) > 0  # surgery really spliced connections back
    assert dns.history_[0]["iteration"] == 0 and dns.history_[-1]["iteration"] == 400


def test_dns_resume_continues_the_same_surgery(digits, tmp_path):
    def run(callbacks_extra=(), resume=False):
        torch.manual_seed(0)
        m = ns.build_model("lenet300", digits.input_shape)
        dns = DNS(c_rate=0.5, gamma=1e-2, iter_stop=60)
        ns.train(m, digits, ns.TrainConfig(epochs=4, lr=0.02), callbacks=[dns, *callbacks_extra],
                 checkpoint=tmp_path / "d.ckpt", checkpoint_every=7, resume=resume)
        return m, dns

    from test_train import Interrupt  # noqa: I001  (tests/ is on sys.path via rootdir conftest)

    ref, dref = run((Interrupt(-1),))
    with pytest.raises(KeyboardInterrupt):
        run((Interrupt(33),))
    got, dgot = run((Interrupt(-1),), resume=True)
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert dgot.summary() == dref.summary()


def test_dns_errors():
    with pytest.raises(ValueError, match=r"no Linear.* layer to compress \(it holds: 0: LSTM"):
        DNS().prepare(nn.Sequential(nn.LSTM(2, 2)))
    with pytest.raises(ValueError, match=r"c_rate names unknown layer\(s\) \['fc9'\]"):
        DNS(c_rate={"fc9": 1.0, "fc": 2.0}).prepare(_net())
    with pytest.raises(ValueError, match="gamma must be a number >= 0"):
        DNS(gamma=-1)
    with pytest.raises(ValueError, match="iter_stop must be a non-negative int"):
        DNS(iter_stop=-5)
    with pytest.raises(ValueError, match="no value for layer '0'"):
        DNS(c_rate={"conv": 1.0}).prepare(_net())


def test_dns_on_an_unseen_model():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.ModuleDict({"out": nn.Linear(4 * 8 * 8, 10)})

        def forward(self, x):
            return self.head["out"](torch.relu(self.stem(x)).flatten(1))

    m = Odd()
    dns = DNS(c_rate={"conv": 0.5, "fc": 1.0})
    dns.prepare(m)
    assert set(dns.layers_) == {"stem", "head.out"} and dns.layers_["stem"].kind == "conv"
    dns.on_train_start(_Fake(m))
    assert 0 < float(get_masks(m)["head.out.weight"].mask.mean()) < 1


def test_calibrate_c_rate_hits_the_kept_fraction_on_the_given_weights():
    from netsurgeon.pruning.dns import calibrate_c_rate

    w = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    for kept in (0.5, 0.1, 0.02):
        c = calibrate_c_rate([w], kept)
        a, b = dns_thresholds([w], c, low=1.0, high=1.0)
        assert float((w.abs() >= a).float().mean()) == pytest.approx(kept, abs=2e-4)
    with pytest.raises(ValueError, match=r"kept must be in \(0, 1\]"):
        calibrate_c_rate([w], 0.0)


def test_default_mask_update_stops_are_the_official_codes():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    dns = DNS()
    dns.prepare(conv)
    assert {n: s["window"] for n, s in dns.summary().items()} == {"0": [0, 10_000], "2": [0, 8_000]}
    from netsurgeon.pipeline import get_method
    assert get_method("dns").make_config().iter_stop == {"conv": 10_000, "fc": 8_000}


def _uniform_net():
    """Both layers' weights drawn uniformly in ±0.01, biases zero (a random initialization): σ ≈ 0.58·μ of |w|,
    so the default c = 3 puts a = 0.9·(μ + 3σ) ≈ 1.23 × the largest |w|: every weight falls below it."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight.copy_(0.01 * (2 * torch.rand(lin.weight.shape, generator=g) - 1))
            lin.bias.zero_()
    return m


def test_dns_keeps_one_weight_per_output_unit_and_warns_when_the_floor_binds(caplog):
    m = _uniform_net()
    a = dns_thresholds([m[0].weight], 3.0)[0]
    assert float(m[0].weight.detach().abs().max()) < a       # without a floor the first surgery empties both layers
    dns = DNS()
    with caplog.at_level("WARNING", logger="netsurgeon.pruning.dns"):
        dns.prepare(m)
    for name, lin in (("0", m[0]), ("2", m[2])):
        mask = get_masks(m)[f"{name}.weight"].mask
        assert mask.sum(1).tolist() == [1.0] * lin.out_features            # exactly the floor, per output unit
        assert torch.equal(mask.argmax(1), original(m, f"{name}.weight").abs().argmax(1))  # its largest |w|
        assert dns.summary()[name]["floored"] == lin.out_features
    assert "layer(s) '0', '2' would lose every weight of some output units" in caplog.text
    with torch.no_grad():
        assert float(m(torch.ones(1, 20)).abs().sum()) > 0


def test_dns_refuses_to_empty_a_layer_unless_allowed():
    m = _uniform_net()
    with pytest.raises(ValueError, match=r"dns: layer '0' would lose every weight at iteration 0 \(every \|w\| < "
                                         r"a = 0\.0\d+, c_rate = 3\); lower its c_rate"):
        DNS(min_per_output=0).prepare(m)
    assert not get_masks(m)                          # refused before anything changed
    DNS(min_per_output=0, allow_empty_layers=True).prepare(m)
    assert float(get_masks(m)["0.weight"].mask.sum()) == 0.0
    with pytest.raises(ValueError, match="min_per_output must be an int >= 0; got -1"):
        DNS(min_per_output=-1)
