import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netsurgeon as ns
from netsurgeon.kernels import fused as kernels
from netsurgeon.pruning.magnitude import prune_magnitude
from netsurgeon.quantization.kmeans import share_weights
from netsurgeon.runtime import CSRLinear, FusedLinearChain, Int8Chain, compile_runtime, resident_bytes

needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _pruned_lenet300(sparsity=0.97, seed=0):
    torch.manual_seed(seed)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=sparsity)
    return m


def test_csr_linear_matches_dense():
    torch.manual_seed(0)
    lin = nn.Linear(30, 7)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    fast = CSRLinear(lin.weight, lin.bias)
    x = torch.randn(4, 30)
    torch.testing.assert_close(fast(x), lin(x), atol=1e-6, rtol=1e-5)
    assert "nnz=" in repr(fast)


@needs_numba
@pytest.mark.parametrize("batch", [1, 2, 37])
def test_fused_chain_matches_the_layers_it_replaces(batch):
    m = _pruned_lenet300()
    fast, plan = compile_runtime(m, batch, forms=("fused",), repeats=3)
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    # whichever form won the timing, the fused form itself must compute the same
    chain = FusedLinearChain([{"n_in": 784, "n_out": 300, "bias": m.fc1.bias.detach().numpy(), "relu": True,
                               **_coo(m.fc1.weight)},
                              {"n_in": 300, "n_out": 100, "bias": None, "relu": False, **_coo(m.fc2.weight)}],
                             ["fc1", "fc2"])
    with torch.no_grad():
        ref = F.linear(F.relu(m.fc1(x.flatten(1))), m.fc2.weight)
        torch.testing.assert_close(chain(x.flatten(1)), ref, atol=1e-5, rtol=1e-5)
    assert plan.runs[0].layers == ["fc1", "fc2", "fc3"] and plan.traced


def _coo(w):
    w = w.detach()
    r, c = torch.nonzero(w, as_tuple=True)
    return {"rows": r.numpy(), "cols": c.numpy(), "values": w[r, c].numpy()}


@needs_numba
def test_kmeans_layers_run_from_codes_without_a_dense_copy(tmp_path):
    m = _pruned_lenet300(0.95)
    share_weights(m, {"fc": 5})
    ns.save_compressed(m, tmp_path / "dc.nsz", huffman=True)
    dense = ns.load_compressed(tmp_path / "dc.nsz")
    fast, plan = compile_runtime(ns.load_compressed(tmp_path / "dc.nsz", keep_codecs=True), 1, forms=("fused",),
                                 repeats=3)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), dense(x), atol=1e-5, rtol=1e-5)
    chains = [mod for mod in fast.modules() if isinstance(mod, FusedLinearChain)]
    if plan.runs[0].form == "fused":  # the codes (uint8) and uint16 columns, never float32 weights
        assert chains and chains[0].packed.shared and chains[0].packed.codes.dtype == np.uint8
        assert chains[0].packed.vals.size == 0 and chains[0].packed.cols.dtype == np.uint16
        assert plan.resident_bytes < 4 * 266_200 / 4  # far below the dense float32 weights
    assert plan.runs[0].weights == "shared"


def test_int8_layer_matches_float_within_quantization_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    w = lin.weight.detach()
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    fast = Int8Chain([{"q": q, "scale": scale, "bias": lin.bias, "relu": True},
                      {"q": q[:5, :24], "scale": scale[:5], "bias": None, "relu": False}], ["a", "b"])
    x = torch.randn(40, 64)
    ref = F.linear(F.relu(F.linear(x, q.float() * scale[:, None], lin.bias)), q[:5, :24].float() * scale[:5, None])
    with torch.no_grad():
        y = fast(x)
    assert y.shape == (40, 5) and (y - ref).abs().max() < 0.03 * ref.abs().max()
    assert fast.resident_bytes() < (64 * 24 + 24 * 5) * 4 / 3


def test_plan_never_keeps_a_slower_form_and_dense_stays_possible():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        m[0].weight[:, 1:] = 0
    fast, plan = compile_runtime(m, 1, repeats=5)
    (run,) = [r for r in plan.runs if r.form != "calls"]  # a dense win leaves a plain layer to call directly
    assert run.form == min(run.latency_ms, key=run.latency_ms.get)
    assert "dense" in run.latency_ms
    with torch.no_grad():
        x = torch.randn(1, 8)
        torch.testing.assert_close(fast(x), m(x))


def test_untraceable_model_falls_back_to_layer_by_layer():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(20, 20), nn.Linear(20, 5)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = x * 2
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m = Branchy()
    prune_magnitude(m, sparsity=0.9)
    fast, plan = compile_runtime(m, 4, repeats=3)
    assert not plan.traced and [r.layers for r in plan.runs] == [["a"], ["b"]]
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


def test_load_compressed_runtime_and_bad_arguments(tmp_path):
    m = _pruned_lenet300()
    ns.save_compressed(m, tmp_path / "s.nsz")
    fast = ns.load_compressed(tmp_path / "s.nsz", runtime=True, batch=3)
    assert not fast.training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch must be >= 1; got 0"):
        compile_runtime(m, 0)
    with pytest.raises(ValueError, match="unknown runtime form 'gpu'"):
        compile_runtime(m, 1, forms=("gpu",))


def test_resident_bytes_counts_shared_storage_once():
    lin = nn.Linear(10, 10)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert resident_bytes(m) == (100 + 10) * 4


def test_bench_latency_report_has_every_column_and_the_flop_bound(tmp_path):
    from netsurgeon.latency import latency_report, report_lines

    m = _pruned_lenet300()
    ns.save_compressed(m, tmp_path / "s.nsz")
    r = latency_report(tmp_path / "s.nsz", (1, 8), threads=1, repeats=5, onnx=False)
    b8 = r["batches"]["8"]
    assert set(b8["ms"]) == {"runtime", "dense_runtime", "torch_csr"} == set(b8["dense_ms_per_pass"])
    for c, ms in b8["ms"].items():  # every ratio is the ratio of the two medians shown beside it
        assert b8["speedup"][c] == pytest.approx(b8["dense_ms_per_pass"][c] / ms)
    both = b8["runtime_vs_dense_runtime_ms"]
    assert b8["runtime_over_dense_runtime"] == pytest.approx(both["dense_runtime"] / both["runtime"])
    assert 30 < r["flop_ratio_bound"] < 40  # 97% of the weights pruned, biases dense
    assert r["batches"]["1"]["runtime_resident_bytes"] > 0 and r["file_bytes"] == (tmp_path / "s.nsz").stat().st_size
    lines = report_lines(r)
    assert len(lines) == 2 + 1 + 2 * 4 + 1 and lines[-1].startswith("of which compression") and "batch 8 " in lines[-1]
    row = next(line for line in lines if line.startswith("8 | runtime |"))
    cand, dense_ms, x = (float(row.split(" | ")[i].rstrip("x")) for i in (2, 3, 4))
    assert x == pytest.approx(dense_ms / cand, rel=0.01)   # the times shown give the ratio shown
    assert lines[1] == f"allocator: {r['allocator']}"


def _zero_columns(conv: nn.Conv2d, fraction: float, seed: int = 0) -> torch.Tensor:
    """Zero a random ``fraction`` of the lowered weight's columns (input channel x kernel position)."""
    g = torch.Generator().manual_seed(seed)
    k = conv.weight[0].numel()
    gone = torch.randperm(k, generator=g)[: int(k * fraction)]
    with torch.no_grad():
        conv.weight.view(conv.weight.shape[0], -1)[:, gone] = 0
    return gone


@pytest.mark.parametrize("kw", [dict(kernel_size=5), dict(kernel_size=3, padding=1),
                                dict(kernel_size=3, stride=2, padding=2, bias=False),
                                dict(kernel_size=(3, 2), dilation=(2, 1), padding=(1, 0))])
def test_column_conv_computes_the_convolution_from_its_kept_columns_only(kw):
    from netsurgeon.runtime import ColumnConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, **kw)
    gone = _zero_columns(conv, 0.6)
    fast = ColumnConv2d(conv)
    assert fast.weight.shape == (8, conv.weight[0].numel() - len(gone))  # zero columns are not held
    for shape in [(1, 6, 11, 13), (5, 6, 9, 9), (1, 6, 11, 13)]:  # a second input size, then the cached one
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=1e-5)
    assert "kept columns" in repr(fast)


def test_column_conv_refuses_what_it_cannot_compute():
    from netsurgeon.runtime import ColumnConv2d

    with pytest.raises(ValueError, match="groups 1"):
        ColumnConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups 1"):
        ColumnConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_runtime_times_the_column_form_for_every_convolution_and_keeps_the_model_exact():
    from netsurgeon.runtime import ColumnConv2d

    torch.manual_seed(0)
    m = ns.build_model("lenet5")
    _zero_columns(m.conv2, 0.7)
    fast, plan = compile_runtime(m, 4, repeats=3, threads=1, forms=("columns",))
    convs = [r for r in plan.runs if r.layers[0].startswith("conv")]
    assert [r.layers for r in convs] == [["conv1"], ["conv2"]]  # dense or not: the dense model gets it too
    assert all(set(r.latency_ms) == {"dense", "columns"} for r in convs)
    for r in convs:
        assert isinstance(fast.get_submodule(r.layers[0]), ColumnConv2d) == (r.form == "columns")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    assert ColumnConv2d(m.conv2).weight.shape[1] == 500 - int(0.7 * 500)  # the zero columns are skipped


@pytest.mark.parametrize("kw,shape", [(dict(kernel_size=2), (3, 5, 8, 8)), (dict(kernel_size=2), (1, 2, 9, 7)),
                                      (dict(kernel_size=3), (2, 4, 10, 11)),
                                      (dict(kernel_size=(2, 3), stride=(2, 3)), (2, 3, 7, 9))])
def test_strided_max_pool_equals_max_pool(kw, shape):
    from netsurgeon.kernels.modules import StridedMaxPool2d

    pool = nn.MaxPool2d(**kw)
    x = torch.randn(shape)
    x[0, 0, 0, 0] = float("nan")  # propagated, as max_pool2d does
    torch.testing.assert_close(StridedMaxPool2d(pool)(x), pool(x), equal_nan=True, atol=0, rtol=0)
    xl = x.contiguous(memory_format=torch.channels_last)  # the row-then-pixel path, cropped where H or W is odd
    out = StridedMaxPool2d(pool)(xl)
    torch.testing.assert_close(out, pool(x), equal_nan=True, atol=0, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for bad in (nn.MaxPool2d(3, 2), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                nn.MaxPool2d(2, dilation=2)):
        with pytest.raises(ValueError, match="stride = kernel size"):
            StridedMaxPool2d(bad)


def test_runtime_times_the_strided_pool_and_keeps_the_model_exact():
    from netsurgeon.kernels.modules import StridedMaxPool2d

    torch.manual_seed(0)
    m = ns.build_model("lenet5")
    fast, plan = compile_runtime(m, 8, repeats=3, threads=1, forms=("pool",))
    pools = [r for r in plan.runs if r.layers[0].startswith("pool")]
    assert [r.layers for r in pools] == [["pool1"], ["pool2"]] and all(set(r.latency_ms) == {"dense", "pool"}
                                                                       for r in pools)
    for r in pools:
        assert isinstance(fast.get_submodule(r.layers[0]), StridedMaxPool2d) == (r.form == "pool")
    assert "pool1: " in plan.describe()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=0, rtol=0)


def test_batchnorm_is_folded_and_the_layout_chosen_keeps_the_model_exact():
    from netsurgeon.kernels.modules import BatchChunks, ChannelsLast

    torch.manual_seed(0)
    m = ns.build_model("vgg_small", width=4)
    for bn in (m.bn1, m.bn2, m.bn3, m.bn4):  # statistics other than the identity, so a wrong fold shows
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    fast, plan = compile_runtime(m.eval(), 64, repeats=3, threads=1)
    folds = [r.layers for r in plan.runs if r.form == "fold"]
    assert folds == [[f"conv{i}", f"bn{i}"] for i in range(1, 5)]
    assert not any(isinstance(x, nn.BatchNorm2d) for x in fast.modules())
    whole = {r.layers[0]: r for r in plan.runs if r.layers[0].startswith("(whole model)")}
    assert set(whole["(whole model) memory order"].latency_ms) == {"dense", "channels_last"}
    assert set(whole["(whole model) batch slices"].latency_ms) == {"dense", "chunks16", "chunks32"}
    assert set(whole["(whole model) samples packed into channels"].latency_ms) == {"dense", "pack2", "pack4"}
    assert isinstance(fast, BatchChunks) == (whole["(whole model) batch slices"].form != "dense")
    inner = fast.inner if isinstance(fast, BatchChunks) else fast
    assert isinstance(inner, ChannelsLast) == (whole["(whole model) memory order"].form == "channels_last")
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast(x[:5]), m(x[:5]), atol=1e-5, rtol=1e-4)  # any batch size still runs


class _MixesSamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(1)
        return y - y.mean(0)  # each output depends on the whole batch: slicing it would change the result


def test_a_model_that_mixes_samples_is_never_run_in_slices():
    from netsurgeon.models import record_arch

    m = record_arch(_MixesSamples(), "tests:mixes", input_shape=(1, 8, 8))
    fast, plan = compile_runtime(m, 64, repeats=3, threads=1)
    slices = next(r for r in plan.runs if r.layers == ["(whole model) batch slices"])
    assert set(slices.latency_ms) == {"dense"} and slices.form == "dense"  # the slice forms were dropped
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


def test_column_form_hands_back_channels_last_with_the_same_values():
    from netsurgeon.runtime import ColumnConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    _zero_columns(conv, 0.5)
    fast = ColumnConv2d(conv)
    fast.channels_last = True
    x = torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last)
    y = fast(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)


def test_a_linear_layers_batchnorm_is_folded_too():
    torch.manual_seed(0)
    m = ns.build_model("mlp_bn", widths=[64, 32])
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    fast, plan = compile_runtime(m.eval(), 16, repeats=3, threads=1)
    assert [r.layers for r in plan.runs if r.form == "fold"] == [["fc1", "bn1"], ["fc2", "bn2"], ["fc3", "bn3"]]
    assert not any(isinstance(x, nn.BatchNorm1d) for x in fast.modules())
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-4)


def test_a_layer_that_mishandles_channels_last_sends_the_model_back_to_its_own_order(monkeypatch):
    """The memory order is chosen on a copy before the per-layer swaps; a swapped layer that reads its input's
    memory as NCHW would give wrong values in channels-last order. The finished model is checked against the
    model's output, and compiled again without the layout steps when it differs."""
    from netsurgeon.kernels.modules import ChannelsLast, StridedMaxPool2d
    from netsurgeon.runtime import compile as comp
    from netsurgeon.runtime.passes import timing

    def nchw_only(self, x):  # memory read as if NCHW-contiguous: right for NCHW input only
        x = torch.as_strided(x, x.shape, x.contiguous().stride())
        return torch.nn.functional.max_pool2d(x, self.kernel_size)

    monkeypatch.setattr(StridedMaxPool2d, "forward", nchw_only)
    monkeypatch.setattr(comp, "_channels_last_pays", lambda *a, **k: True)
    monkeypatch.setattr(timing, "_time", lambda cands, x, repeats: {k: (0.0 if k == "pool" else 1.0) for k in cands})
    torch.manual_seed(0)
    m = ns.build_model("lenet5")
    fast, plan = compile_runtime(m, 8, repeats=3, threads=1, forms=("pool", "layout"))
    assert not any(isinstance(x, ChannelsLast) for x in fast.modules())
    assert any(isinstance(x, StridedMaxPool2d) for x in fast.modules())  # the NCHW compile kept its swaps
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


class _ViewsItsActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))  # .view fails on a channels-last tensor


def test_a_model_that_views_its_activations_keeps_its_memory_order():
    from netsurgeon.kernels.modules import ChannelsLast
    from netsurgeon.models import record_arch

    m = record_arch(_ViewsItsActivations(), "tests:views", input_shape=(1, 8, 8))
    fast, plan = compile_runtime(m, 32, repeats=3, threads=1)
    order = next(r for r in plan.runs if r.layers == ["(whole model) memory order"])
    assert set(order.latency_ms) == {"dense"} and not any(isinstance(x, ChannelsLast) for x in fast.modules())
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


class _ReusesConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.conv2, self.relu2 = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True)
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.relu2(self.conv2(y))  # conv2's output is read once: its ReLU may run in place
        w = self.conv3(z)
        self.relu3(w)  # built in place: the sum below reads w after it
        return self.fc(self.flatten(self.pool(self.relu(y) + y + z + w)))  # y is read twice: its ReLU may not


def _graph_nodes(net: nn.Module) -> list[torch.fx.Node]:
    return [n for g in net.modules() if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes]


def test_plain_layers_become_direct_calls_and_a_relu_runs_in_place_only_on_what_nothing_else_reads():
    from netsurgeon.models import record_arch

    torch.manual_seed(0)
    m = record_arch(_ReusesConvOutput(), "tests:reuses", input_shape=(1, 8, 8)).eval()
    fast, plan = compile_runtime(m, 1, repeats=3, threads=1)
    assert any(r.layers == ["(whole model) direct calls"] for r in plan.runs)
    nodes = _graph_nodes(fast)
    assert nodes and not any(n.op == "call_module" for n in nodes)
    assert [n.args[0].args[1].target for n in nodes if n.target is torch.relu_] == ["conv2.weight", "conv3.weight"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    off, plan = compile_runtime(m, 1, repeats=3, threads=1, forms=("fold", "layout", "dense"))
    assert not any(r.form == "calls" for r in plan.runs)  # "calls" left out: every layer keeps its own call
    assert not any(n.target in (torch.conv2d, torch.relu_) for n in _graph_nodes(off))
    with torch.no_grad():
        torch.testing.assert_close(off(x), m(x), atol=1e-5, rtol=1e-5)


class _FunctionalResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(4, 4, 1)
        self.register_buffer("shift", torch.full((4, 1, 1), 0.25, dtype=torch.float64))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))  # read by conv2 and the sum: must stay as it is
        b = a + self.conv2(a)  # conv2's output is read once: the sum may go into it, never into a
        c = torch.relu(b).relu()  # b is read once: in place; the ReLU's output is not (its backward reads it)
        d = self.conv3(c)
        e = (d.mean((2, 3), keepdim=True) + d) + self.shift  # a fresh (N, 4, 1, 1) + d broadcasts past it;
        n = x.size(0) + 0  # then float64 promotes: both stay out of place; sizes add as ints
        return self.fc(e.float().mean((2, 3)))[:n] + a.mean()


def test_functional_relus_and_sums_run_in_place_only_into_a_fresh_tensor_nothing_else_reads():
    from netsurgeon.models import record_arch
    from netsurgeon.runtime.compile import _add_into

    torch.manual_seed(0)
    m = record_arch(_FunctionalResidual(), "tests:functional", input_shape=(1, 8, 8)).eval()
    fast, _ = compile_runtime(m, 4, repeats=3, threads=1, forms=("fold", "layout", "dense", "calls"))
    nodes = _graph_nodes(fast)
    into = [n for n in nodes if n.target is _add_into]
    # conv2(a) + a goes into conv2's output; mean + d and the float64 shift are tried at run time and refused
    assert into and into[0].args[0].target is torch.conv2d and into[0].args[1].target is torch.relu_
    assert sum(n.target is torch.relu_ for n in nodes) == 2 and not any(n.target == "relu_" for n in nodes)
    x = torch.randn(6, 1, 8, 8)
    x0 = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(x, x0)
    xg = x.clone().requires_grad_(True)  # a gradient through the form: nothing it needs was overwritten
    fast(xg).sum().backward()
    xm = x.clone().requires_grad_(True)
    m(xm).sum().backward()
    torch.testing.assert_close(xg.grad, xm.grad, atol=1e-4, rtol=1e-4)
    assert _add_into(torch.ones(2, 1), torch.ones(2, 3)).shape == (2, 3)  # broadcast past a: a new tensor
    assert _add_into(torch.ones(2), torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert _add_into(3, 4) == 7 and _add_into([1], [2]) == [1, 2]


def test_an_int8_convolution_network_keeps_its_memory_order_and_slices():
    from netsurgeon.quantization.uniform import quantize_model_int8

    torch.manual_seed(0)
    m = ns.build_model("lenet5").eval()
    quantize_model_int8(m)
    fast, plan = compile_runtime(m, 64, repeats=3, threads=1, forms=("int8", "layout", "pool", "calls"))
    whole = {r.layers[0] for r in plan.runs if r.layers[0].startswith("(whole model)")}
    # int8 kernels are near the float model, not equal to it: that alone must not send the model back to NCHW
    assert {"(whole model) memory order", "(whole model) batch slices"} <= whole, plan.describe()
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=0.05, rtol=0.05)


class _Packable(nn.Module):
    """Every kind of node the packing step meets: a convolution, a BatchNorm it cannot fold into one, a
    depthwise convolution, a residual add, pooling, a concatenation (which must read unpacked activations) and
    a convolution after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.dw, self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1, bias=False)
        self.pool, self.conv3 = nn.MaxPool2d(2), nn.Conv2d(12, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)) + 0.5)
        z = self.conv2(self.dw(y)).relu()
        y = self.pool(y + z)
        c = torch.cat([y, y * 2], 1)
        return torch.flatten(F.adaptive_avg_pool2d(self.conv3(c), 1), 1)


@pytest.mark.parametrize("g", [2, 3])
@pytest.mark.parametrize("last", [False, True])
def test_packed_samples_compute_each_sample_as_the_model_does(g, last):
    from netsurgeon.runtime.compile import _packed, _unpack_batch

    torch.manual_seed(0)
    m = _Packable().eval()
    m.bn1.running_mean.uniform_(-1, 1), m.bn1.running_var.uniform_(0.5, 2), m.bn1.weight.data.uniform_(0.5, 2)
    p = _packed(torch.fx.symbolic_trace(m), g, last)
    assert (p.conv1.groups, p.dw.groups, p.conv2.groups, p.conv3.groups) == (g, 6 * g, g, 1)
    assert p.bn1.num_features == 6 * g and p.conv3.in_channels == 12  # the layer after the concatenation: unpacked
    cat = next(n for n in p.graph.nodes if n.target is torch.cat)
    assert all(a.target is _unpack_batch for a in cat.args[0])
    for batch in (g, 2 * g, 2 * g + 1, 1):  # a batch g does not divide is padded, and the padding dropped
        x = torch.randn(batch, 2, 8, 8)
        if last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(p(x), m(x), atol=1e-5, rtol=1e-5)
    assert _packed(torch.fx.symbolic_trace(ns.build_model("lenet300")), 2, False) is None  # no convolution


def test_compile_times_packing_only_from_a_batch_of_two():
    from netsurgeon.models import record_arch

    torch.manual_seed(0)
    m = record_arch(_Packable(), "tests:packable", input_shape=(2, 8, 8)).eval()
    label = ["(whole model) samples packed into channels"]
    for batch, packs in ((1, None), (2, {"dense", "pack2"}), (8, {"dense", "pack2", "pack4"})):
        fast, plan = compile_runtime(m, batch, repeats=3, threads=1)
        step = next((r for r in plan.runs if r.layers == label), None)
        assert (step and set(step.latency_ms)) == packs
        x = torch.randn(batch + 3, 2, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    _, plan = compile_runtime(m, 8, repeats=3, threads=1, forms=("fold", "layout", "calls"))
    assert not any(r.layers == label for r in plan.runs)


def test_packing_rebuilds_a_column_form_that_skips_little_and_keeps_one_that_skips_much():
    from netsurgeon.runtime import ColumnConv2d
    from netsurgeon.runtime.compile import _packed

    torch.manual_seed(0)
    m = _Packable().eval()
    with torch.no_grad():
        m.conv2.weight[:, :4] = 0  # 4 of conv2's 6 columns (input channels of a 1x1 kernel) never read
    gm = torch.fx.symbolic_trace(m)
    gm.conv1, gm.conv2 = ColumnConv2d(m.conv1), ColumnConv2d(m.conv2)
    p = _packed(gm, 2, False)
    assert type(p.conv1) is nn.Conv2d and p.conv1.groups == 2  # all columns kept: rebuilt, packed
    assert type(p.conv2) is ColumnConv2d  # a third of its columns: stays the column form, on unpacked input
    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), atol=1e-5, rtol=1e-5)


def test_a_csr_layer_survives_the_copies_the_pack_step_makes():
    """A CSRLinear could not be deep-copied (torch's CSR tensors have no storage to copy): a model whose Linear run
    measured fastest on csr crashed when the pack step copied the graph (batch >= 2, convolutions)."""
    import copy

    from netsurgeon.kernels.modules import CSRLinear

    w = torch.zeros(4, 6)
    w[0, 1], w[3, 5] = 2.0, -1.0
    lin = CSRLinear(w, torch.ones(4))
    twin = copy.deepcopy(lin)
    x = torch.randn(3, 6)
    torch.testing.assert_close(twin(x), lin(x))
    assert twin.weight_csr.values().data_ptr() != lin.weight_csr.values().data_ptr()
