import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.changes.resized import apply_resized, layer_sizes, resized_record
from netsurgeon.pruning.channels import channel_groups, remove_channels

SHAPES = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "mlpnet": (1, 28, 28), "digits_cnn": (1, 8, 8),
          "resnet_small": (1, 8, 8), "vgg_small": (1, 8, 8)}


class DepthwiseNet(nn.Module):
    """Depthwise-separable blocks, a residual add, a 1-output-channel conv and a functional flatten."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.dw, self.pw = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1)
        self.one = nn.Conv2d(6, 1, 1)  # one output channel: not depthwise (Torch-Pruning #126)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.pw(torch.relu(self.dw(h)))
        return self.head(torch.flatten(torch.relu(self.one(h)), 1))


class CatNet(nn.Module):
    """Two concatenations along channels: one feeding a BatchNorm and a conv, one feeding a flatten and a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c, self.d = nn.Conv2d(10, 5, 1), nn.Conv2d(1, 3, 1)
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, x):
        h = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        h = torch.cat([torch.relu(self.c(h)), self.d(x)], dim=1)
        return self.head(torch.flatten(h, 1))


class TwoBranch(nn.Module):
    """A Conv2d branch and a Conv1d branch (over the image read as one sequence), each flattened, concatenated,
    then one Linear: each branch's channels are a block of columns of `head`, 64 per img channel, 60 per seq
    channel (issue #39: every group was blocked at the torch.cat after a flatten)."""

    def __init__(self):
        super().__init__()
        self.img, self.seq = nn.Conv2d(1, 6, 3, padding=1), nn.Conv1d(1, 4, 5)
        self.head = nn.Linear(6 * 64 + 4 * 60, 10)

    def forward(self, x):
        a = torch.flatten(torch.relu(self.img(x)), 1)
        b = torch.relu(self.seq(x.flatten(1).unsqueeze(1))).flatten(1)
        return self.head(torch.cat([a, b], 1))


def _masked(model, groups, keep):
    """The reference: the same model with every consumer's columns of removed channels zeroed."""
    m = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for i, idx in keep.items():
            drop = torch.ones(groups[i].size, dtype=torch.bool)
            drop[idx] = False
            for name, role, factor in groups[i].members:
                if role == "in":  # spans count columns after a flatten: each channel is `factor` of them
                    w = m.get_submodule(name).weight
                    off = groups[i].offset(name)
                    full = torch.zeros(w.shape[1], dtype=torch.bool)
                    full[off:off + groups[i].size * factor] = drop.repeat_interleave(factor)
                    w[:, full] = 0
    return m


@pytest.mark.parametrize("name", [*SHAPES, "depthwise", "cat", "two_branch"])
def test_removal_equals_masking_on_every_model(name):
    torch.manual_seed(0)
    own = {"depthwise": DepthwiseNet, "cat": CatNet, "two_branch": TwoBranch}
    model = own[name]() if name in own else ns.build_model(name, SHAPES[name])
    shape = (1, 8, 8) if name in own else SHAPES[name]
    model.eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    groups = channel_groups(model, shape)
    prunable = [i for i, g in enumerate(groups) if g.prunable]
    assert prunable, [g.blocked for g in groups]
    g = torch.Generator().manual_seed(1)
    keep = {i: torch.randperm(groups[i].size, generator=g)[: max(1, groups[i].size // 2)].sort().values
            for i in prunable}
    ref = _masked(model, groups, keep)
    n_before = sum(p.numel() for p in model.parameters())
    remove_channels(model, groups, keep)
    assert sum(p.numel() for p in model.parameters()) < n_before
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
    if name not in own:  # a file records the new sizes; the smaller model is rebuilt from them
        rebuilt = apply_resized(ns.build_model(name, shape), resized_record(model, layer_sizes(ns.build_model(
            name, shape))))
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}


def test_the_output_layer_and_unknown_ops_block_their_group():
    torch.manual_seed(0)
    groups = channel_groups(ns.build_model("lenet300"), (1, 28, 28))
    by_producer = {tuple(g.producers): g for g in groups}
    assert by_producer[("fc3",)].blocked == ["the model's output"]
    assert by_producer[("fc1",)].prunable and by_producer[("fc2",)].prunable

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 2)).mean((2, 3))  # along height: not channels

    blocked = {tuple(g.producers): g.blocked for g in channel_groups(Cat(), (1, 8, 8))}
    assert blocked[("a",)] == blocked[("b",)] == [
        "torch.cat (along dim 2, or of a tensor whose channels cannot all be tracked)"]


def test_concatenated_groups_stay_apart_and_know_their_offsets():
    groups = {tuple(g.producers): g for g in channel_groups(CatNet(), (1, 8, 8))}
    a, b, c, d = (groups[(k,)] for k in "abcd")
    assert all(g.prunable for g in (a, b, c, d))
    assert a.spans == {"bn": (0, 10), "c": (0, 10)} and b.spans == {"bn": (4, 10), "c": (4, 10)}
    assert c.spans == {"head": (0, 8 * 64)} and d.spans == {"head": (5 * 64, 8 * 64)}  # head reads columns
    assert ("head", "in", 64) in d.members


def test_bad_keep_is_refused_before_anything_changes():
    model = ns.build_model("lenet300")
    groups = channel_groups(model, (1, 28, 28))
    i = next(i for i, g in enumerate(groups) if g.producers == ["fc1"])
    with pytest.raises(ValueError, match="must keep at least one"):
        remove_channels(model, groups, {i: torch.tensor([], dtype=torch.long)})
    out = next(i for i, g in enumerate(groups) if g.producers == ["fc3"])
    with pytest.raises(ValueError, match="cannot shrink: the model's output"):
        remove_channels(model, groups, {out: torch.tensor([0])})
    assert model.fc1.out_features == 300


def test_untraceable_model_is_one_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx cannot trace the model"):
        channel_groups(Branchy(), (4,))


def test_l1_filters_removes_the_weakest_filters_and_the_file_rebuilds_the_smaller_model(tmp_path):
    from netsurgeon.pruning.magnitude import prune_magnitude
    from netsurgeon.pruning.structured import l1_filter_prune

    torch.manual_seed(0)
    model = ns.build_model("lenet5")
    with torch.no_grad():
        model.conv1.weight[3] *= 0.01  # the weakest filter by sum |K|
    weakest = float(model.conv1.weight[3].detach().abs().sum())
    reports = l1_filter_prune(model, {"conv1": 0.25, "fc1": 0.5}, (1, 28, 28))
    assert {r.layers: (r.before, r.after) for r in reports} == {("conv1",): (20, 15), ("fc1",): (500, 250)}
    assert model.conv1.out_channels == 15 and model.conv2.in_channels == 15 and model.fc2.in_features == 250
    assert float(model.conv1.weight.detach().abs().sum((1, 2, 3)).min()) > weakest
    info = ns.save_compressed(model, tmp_path / "s.nsz")
    loaded = ns.load_compressed(tmp_path / "s.nsz")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert 4 * sum(r.numel for r in info.records) < 4 * 431_080 * 0.6   # the smaller model's own tensors
    assert info.dense_bytes == 4 * (431_080 + 0)   # "x smaller" counts against the model before it shrank
    with pytest.raises(ValueError, match="'fc9' is not a layer whose filters can be pruned"):
        l1_filter_prune(ns.build_model("lenet5"), {"fc9": 0.5}, (1, 28, 28))
    masked = ns.build_model("lenet5")
    prune_magnitude(masked, sparsity=0.5)
    with pytest.raises(ValueError, match="remove whole filters first"):
        l1_filter_prune(masked, 0.5, (1, 28, 28))


def test_ssl_zeroes_whole_groups_and_their_removal_changes_nothing(digits):
    from netsurgeon.pruning.structured import GroupLassoProximal, remove_zero_channels

    torch.manual_seed(0)
    model = ns.build_model("digits_cnn", digits.input_shape)
    cb = GroupLassoProximal(2.0, 2.0, digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.1), callbacks=[cb])
    model.eval()
    x = digits.test.x[:16]
    with torch.no_grad():
        before = model(x)
    n = sum(p.numel() for p in model.parameters())
    reports = remove_zero_channels(model, digits.input_shape)
    assert reports and sum(p.numel() for p in model.parameters()) < n
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_slimming_ranks_channels_by_batchnorm_scale():
    from netsurgeon.pruning.structured import slim

    torch.manual_seed(0)
    model = ns.build_model("resnet_small", (1, 8, 8), width=8, blocks=[1, 1])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.0)
        model.get_submodule(next(n for n, m in model.named_modules() if m is bns[1])).weight[:4] = 0.01
    reports = slim(model, 0.1, (1, 8, 8))
    assert reports and all(r.after < r.before for r in reports)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_latency_of_a_structured_file_is_against_the_original_architecture(tmp_path):
    from netsurgeon.latency import latency_report
    from netsurgeon.pruning.structured import l1_filter_prune

    torch.manual_seed(0)
    model = ns.build_model("digits_cnn")
    l1_filter_prune(model, 0.5, (1, 8, 8))
    ns.save_compressed(model, tmp_path / "s.nsz")
    r = latency_report(tmp_path / "s.nsz", (2,), threads=1, repeats=5, onnx=False)
    assert r["structured"] and r["flop_ratio_bound"] > 2.5
    assert r["dense_weight_bytes"] == 4 * sum(p.numel() for p in ns.build_model("digits_cnn").parameters())


def test_filter_sensitivity_prunes_one_layer_at_a_time(digits):
    from netsurgeon.pruning.structured import filter_sensitivity

    torch.manual_seed(0)
    model = ns.build_model("digits_cnn", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=3, lr=0.05))
    n = sum(p.numel() for p in model.parameters())
    curves = filter_sensitivity(model, digits.val, digits.input_shape, fractions=(0.1, 0.9))
    assert set(curves) == {"conv1", "conv2", "fc1"} and sum(p.numel() for p in model.parameters()) == n
    acc = ns.evaluate(model, digits.val)[1]
    for c in curves.values():
        assert c[0.9] <= c[0.1] + 0.05 and c[0.1] <= acc + 0.05


def test_round_to_keeps_a_multiple_of_channels():
    from netsurgeon.pruning.structured import l1_filter_prune, slim

    torch.manual_seed(0)
    model = ns.build_model("lenet5")
    l1_filter_prune(model, {"conv1": 0.5, "conv2": 0.5}, (1, 28, 28), round_to=8)
    assert (model.conv1.out_channels, model.conv2.out_channels) == (16, 32)  # 10 -> 16, 25 -> 32
    vgg = ns.build_model("vgg_small", (1, 8, 8))
    slim(vgg, 0.5, (1, 8, 8), round_to=8)
    assert all(m.out_channels % 8 == 0 for m in vgg.modules() if isinstance(m, nn.Conv2d))


def test_channel_views_and_zero_channel_removal_after_a_concatenation():
    """ssl's view of a consumer's columns is the group's slice of them; channels that nothing reads any more
    (zeroed columns of `c` for two of b's channels, of `head` for one of d's) are removed, output unchanged."""
    from netsurgeon.pruning.structured import remove_zero_channels

    torch.manual_seed(0)
    model = CatNet().eval()
    groups = {tuple(g.producers): g for g in channel_groups(model, (1, 8, 8))}
    b, d = groups[("b",)], groups[("d",)]
    assert torch.equal(b.channels("c", model.c.weight), model.c.weight[:, 4:10].transpose(0, 1).reshape(6, 5, 1))
    assert torch.equal(b.channels("bn", model.bn.weight), model.bn.weight[4:10])
    assert b.channels("c", model.c.weight).data_ptr() == model.c.weight[:, 4:].data_ptr()  # a view, not a copy
    with torch.no_grad():
        b.channels("c", model.c.weight)[[1, 3]] = 0
        d.channels("head", model.head.weight, 64)[2] = 0
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    remove_zero_channels(model, (1, 8, 8))
    assert (model.b.out_channels, model.bn.num_features, model.c.in_channels) == (4, 8, 8)
    assert (model.d.out_channels, model.head.in_features) == (2, 7 * 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_ssl_shape_wise_groups_are_columns_of_the_lowered_weight():
    """One proximal step on shape-wise groups (Wen et al. Sec. 3.3): each (input channel, kernel position) column
    across all filters shrinks by lr*lambda in l2 norm, to exactly zero when its norm is smaller."""
    from types import SimpleNamespace

    from netsurgeon.pruning.structured import GroupLassoProximal, zero_shapes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 7 * 7, 4))
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].weight[:, 1, 0, 1] = torch.tensor([0.03, 0.0, -0.04])  # norm 0.05: below the threshold
        model[0].weight[:, 0, 1, 1] = torch.tensor([3.0, 4.0, 0.0])     # norm 5
    cb = GroupLassoProximal(0.0, 0.0, (2, 8, 8), lam_shape=1.0)
    cb.prepare(model)
    before = model[0].weight.detach().clone()
    opt = SimpleNamespace(param_groups=[{"lr": 0.1, "params": list(model.parameters())}])
    cb.after_step(SimpleNamespace(optimizer=opt, model=model))
    w = model[0].weight.detach()
    assert torch.equal(w[:, 1, 0, 1], torch.zeros(3))
    torch.testing.assert_close(w[:, 0, 1, 1], before[:, 0, 1, 1] * (1 - 0.1 / 5))
    assert zero_shapes(model)["0"] == pytest.approx(100 * sum(
        float(before[:, c, i, j].norm()) <= 0.1 for c in range(2) for i in range(2) for j in range(2)) / 8)
    assert not torch.equal(model[3].weight, torch.zeros_like(model[3].weight))  # Linear layers have no shapes


def test_ssl_shape_sparsity_survives_fine_tuning_and_runs_as_kept_columns(digits, tmp_path):
    """ssl with lam_shape masks the zeroed shape-wise groups, so a fine-tuning stage keeps them zero; the .nsz
    holds them sparse and the runtime form computes the same outputs (from the kept columns where faster)."""
    from netsurgeon.pipeline import Pipeline
    from netsurgeon.stats import zero_columns

    torch.manual_seed(0)
    model = ns.build_model("digits_cnn", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=1, lr=0.1))
    records = Pipeline.from_spec(["ssl", "finetune"], ["ssl.lam_filter=0", "ssl.lam_channel=0", "lam_shape=1.0",
                                                       "ssl.epochs=1", "ssl.lr=0.1", "finetune.epochs=1",
                                                       "finetune.lr=0.05"]).run(model, digits)
    masked = records[0]["report"]["masked_shapes"]
    assert masked, "lam_shape=1 zeroed no shape-wise group"
    zero = {n: zero_columns(model.get_submodule(n[: -len(".weight")]).weight) for n in masked}
    assert all(v > 0 for v in zero.values())
    assert records[0]["report"]["zero_shapes_pct"]["conv2"] > 0
    f = tmp_path / "ssl.nsz"
    ns.save_compressed(model, f)
    loaded = ns.load_compressed(f)
    assert {n: zero_columns(loaded.get_submodule(n[: -len(".weight")]).weight) for n in masked} == zero
    fast = ns.load_compressed(f, runtime=True, batch=8, threads=1)
    x = digits.test.x[:8]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)


def test_l1_filters_prunes_both_branches_of_a_concatenation_after_flatten():
    from netsurgeon.pruning.structured import l1_filter_prune

    torch.manual_seed(0)
    model = TwoBranch().eval()
    groups = channel_groups(model, (1, 8, 8))
    by = {tuple(g.producers): i for i, g in enumerate(groups)}
    img, seq = groups[by[("img",)]], groups[by[("seq",)]]
    assert img.prunable and seq.prunable                         # before: both blocked at the torch.cat
    assert img.spans == {"head": (0, 624)} and seq.spans == {"head": (384, 624)}
    assert ("head", "in", 64) in img.members and ("head", "in", 60) in seq.members
    ref_model = __import__("copy").deepcopy(model)
    reports = l1_filter_prune(model, 0.5, (1, 8, 8))
    assert {r.layers: (r.before, r.after) for r in reports} == {("img",): (6, 3), ("seq",): (4, 2)}
    ref = _masked(ref_model, groups, {by[r.layers]: torch.tensor(r.kept) for r in reports})
    assert (model.img.out_channels, model.seq.out_channels, model.head.in_features) == (3, 2, 3 * 64 + 2 * 60)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_batchnorm1d_after_a_flatten_is_sliced_per_channel_block():
    """lenet5_bn's bn3 (BatchNorm1d over conv2's flattened 50 x 16 features) joins conv2's group with 16
    features per channel (before: one per channel, so removing conv2's channels broke the model)."""
    torch.manual_seed(0)
    model = ns.build_model("lenet5_bn").eval()
    groups = {tuple(g.producers): g for g in channel_groups(model, (1, 28, 28))}
    assert ("bn3", "bn", 16) in groups[("conv2",)].members and ("fc1", "in", 16) in groups[("conv2",)].members
    with torch.no_grad():
        model.bn3.running_mean.uniform_(-1, 1)
        model.bn3.weight.uniform_(0.5, 2)
    x = torch.randn(3, 1, 28, 28)
    g = groups[("conv2",)]
    keep = torch.arange(0, 50, 2)
    ref = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for c in range(50):
            if c % 2:
                ref.fc1.weight[:, c * 16:(c + 1) * 16] = 0
    remove_channels(model, list(groups.values()), {list(groups.values()).index(g): keep})
    assert (model.conv2.out_channels, model.bn3.num_features, model.fc1.in_features) == (25, 400, 400)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


class _Blocked(nn.Module):
    """Every hidden channel reaches an op the surgery does not know (an Upsample), so no group can shrink."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.up = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Upsample(scale_factor=1)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.bn(self.conv(x)))).flatten(1))


def test_structured_methods_refuse_a_model_they_cannot_shrink(digits):
    from netsurgeon.pipeline import Pipeline
    from netsurgeon.pruning.structured import l1_filter_prune, slim

    model = _Blocked()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"l1_filters: no channel group of this model can shrink, so nothing would "
                                         r"be removed \(blocked by: the model's output; up \(Upsample\)\)"):
        l1_filter_prune(model, 0.5, (1, 8, 8))
    with pytest.raises(ValueError, match=r"l1_filters: layer 'conv' cannot lose filters: its channels reach up "
                                         r"\(Upsample\)"):
        l1_filter_prune(model, {"conv": 0.5}, (1, 8, 8))
    with pytest.raises(ValueError, match="slimming: no channel group of this model can shrink"):
        slim(model, 0.5, (1, 8, 8))
    for method in ("slimming", "l1_filters", "ssl"):  # refused before any training step
        with pytest.raises(ValueError, match=f"{method}: no channel group of this model can shrink"):
            Pipeline.from_spec([method], ["epochs=1"] if method != "l1_filters" else []).run(model, digits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- channels on the last axis (issue 36): a Linear on (B, T, d) tokens, and a layer scale that follows its channels --
class _LastAxisNet(nn.Module):
    """Tokens (B, T, d) through a gated MLP with a layer scale on its hidden neurons, plus a residual add."""

    def __init__(self, d: int = 6, f: int = 10):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)
        self.gamma = nn.Parameter(torch.rand(f) + 0.5)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.gate(x)) * self.up(x)
        return self.head(x + self.down(self.gamma * h)).mean(1)


class _ScaledResNet(nn.Module):
    """A ConvNeXt-style layer scale (C, 1, 1) on a residual branch: the residual group's channels carry it."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, 4)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.layer_scale * self.b(torch.relu(self.a(h))))
        return self.fc(torch.flatten(self.pool(h), 1))


def scaled_resnet() -> nn.Module:
    return _ScaledResNet()


@pytest.mark.parametrize("net, shape", [(_LastAxisNet, (5, 6)), (_ScaledResNet, (1, 8, 8))])
def test_channels_on_the_last_axis_and_layer_scales_follow_their_channels(net, shape):
    torch.manual_seed(0)
    model = net().eval()
    groups = channel_groups(model, shape)
    scaled = "gamma" if net is _LastAxisNet else "layer_scale"
    (i,) = [k for k, g in enumerate(groups) if g.prunable and any(n == scaled for n, _, _ in g.members)]
    members = {(n, role) for n, role, _ in groups[i].members}
    assert (scaled, "scale") in members
    if net is _LastAxisNet:   # the gated pair is one group; the residual stream (d) is not prunable
        assert members >= {("gate", "out"), ("up", "out"), ("down", "in")}
        assert all(("down", "out") not in {(n, r) for n, r, _ in g.members} or not g.prunable for g in groups)
    keep = {i: torch.tensor([0, 2, 3])}
    ref = _masked(model, groups, keep)
    remove_channels(model, groups, keep)
    assert getattr(model, scaled).shape[0] == 3
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_a_layer_scale_is_rebuilt_from_the_file(tmp_path):
    from netsurgeon.pruning.structured import l1_filter_prune

    torch.manual_seed(0)
    model = ns.models.record_arch(_ScaledResNet(), f"{__name__}:scaled_resnet", {}, (1, 8, 8)).eval()
    l1_filter_prune(model, 0.5, (1, 8, 8))
    assert model.layer_scale.shape == (3, 1, 1)
    assert ns.changes.arch_of(model)["resized"]["layer_scale"] == {"channels": 3}
    x = torch.randn(2, 1, 8, 8)
    ns.nsz.save_compressed(model, tmp_path / "s.nsz")
    back = ns.load_compressed(tmp_path / "s.nsz", trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_l1_filters_prunes_the_mlp_neurons_of_the_zoo_gpt_and_nothing_on_the_residual_stream(tmp_path):
    from netsurgeon.pruning.structured import l1_filter_prune

    torch.manual_seed(0)
    gpt = ns.build_model("gpt", (8,), num_classes=16, n_layer=2, width=16, n_head=2).eval()
    groups = channel_groups(gpt, (8,))
    assert sorted(p for g in groups if g.prunable for p in g.producers) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    keep = {i: torch.arange(0, g.size, 2) for i, g in enumerate(groups) if g.prunable}
    ref, x = _masked(gpt, groups, keep), torch.randint(0, 16, (3, 8))
    gpt2 = __import__("copy").deepcopy(gpt)
    remove_channels(gpt, groups, keep)
    with torch.no_grad():
        torch.testing.assert_close(gpt(x), ref(x), atol=1e-5, rtol=1e-4)
    reports = l1_filter_prune(gpt2, 0.25, (8,))
    assert [(r.layers, r.before, r.after) for r in reports] == [(("blocks.0.mlp.fc1",), 64, 48),
                                                                (("blocks.1.mlp.fc1",), 64, 48)]
    assert all(b.mlp.fc2.out_features == b.ln2.normalized_shape[0] == 16 for b in gpt2.blocks)
    ns.nsz.save_compressed(gpt2, tmp_path / "g.nsz")
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "g.nsz")(x), gpt2(x), rtol=0, atol=0)


@pytest.mark.slow  # the runtime compiles and times its candidates: seconds
def test_the_runtime_form_of_a_gpt_with_fewer_mlp_neurons(tmp_path):
    from netsurgeon.pruning.structured import l1_filter_prune

    torch.manual_seed(0)
    gpt = ns.build_model("gpt", (8,), num_classes=16, n_layer=2, width=16, n_head=2).eval()
    l1_filter_prune(gpt, 0.25, (8,))
    ns.nsz.save_compressed(gpt, tmp_path / "g.nsz")
    x = torch.randint(0, 16, (3, 8))
    with torch.no_grad():
        fast = ns.load_compressed(tmp_path / "g.nsz", runtime=True, batch=3)
        torch.testing.assert_close(fast(x), gpt(x), rtol=1e-4, atol=1e-4)


def test_ops_along_other_axes_block_channels_that_lie_on_the_last_axis():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Conv1d(5, 2, 1)
            self.pool, self.bn = nn.MaxPool1d(2), nn.BatchNorm1d(5)

        def forward(self, x):  # (B, 5, 4): five tokens of four features
            return self.c(self.pool(self.a(x))).sum() + self.bn(self.b(x)).sum()

    blocked = {tuple(g.producers): g.blocked for g in channel_groups(Odd().eval(), (5, 4))}
    assert any("pool (MaxPool1d) (on a tensor whose channels are its last axis)" in b for b in blocked[("a",)])
    assert any("bn (BatchNorm1d) (on a tensor whose channels are its last axis)" in b for b in blocked[("b",)])


def test_a_scalar_like_parameter_passes_and_a_parameter_used_twice_blocks():
    class Scaled(nn.Module):
        def __init__(self, twice: bool):
            super().__init__()
            self.a, self.b, self.twice = nn.Linear(4, 6), nn.Linear(6, 2), twice
            self.s, self.g = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(6))

        def forward(self, x):
            h = self.b(torch.relu(self.a(x) * self.s * self.g))
            return h + self.g.sum() if self.twice else h

    (g,) = [g for g in channel_groups(Scaled(False), (4,)) if g.prunable]
    assert {(n, r) for n, r, _ in g.members} == {("a", "out"), ("g", "scale"), ("b", "in")}   # s: one value for all
    blocked = {tuple(g.producers): g.blocked for g in channel_groups(Scaled(True), (4,))}
    assert "g (a per-channel parameter used by more than one op)" in blocked[("a",)]
