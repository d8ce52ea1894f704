"""Calibration capture: Hessians per layer type, sequential block order, attention internals, memory estimate."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netsurgeon.calibration import compress_sequentially, discover_layers, target_weight
from netsurgeon.stats import HessianAccumulator, num_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second torch thread only adds contention on a shared machine (measured: 8x slower)."""
    with num_threads(1):
        yield



def test_hessian_accumulator_is_the_running_average_of_2xxt():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (3, 7, 1)]
    acc, diag = HessianAccumulator(5, dtype=torch.float64), HessianAccumulator(5, diagonal_only=True)
    for x in xs:
        acc.add_batch(x)
        diag.add_batch(x.float().view(1, -1, 5))  # any leading shape: rows are input vectors
    X = torch.cat(xs)
    torch.testing.assert_close(acc.hessian, 2 * X.T @ X / 11, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diag.hessian, (2 * X.square().sum(0) / 11).float())
    assert acc.count == 11
    assert HessianAccumulator.nbytes(5) == 100 and HessianAccumulator.nbytes(5, diagonal_only=True) == 20
    with pytest.raises(ValueError, match="inputs have 4 features; expected 5"):
        acc.add_batch(torch.zeros(2, 4))


def _record(model=None, halve=()):
    """A compress callback that records each target's Hessian and halves the layers in ``halve`` (a visible
    change the next blocks must see); others are left as they are."""
    seen = {}

    def compress(layer, targets, stats):
        out = []
        for t, s in zip(targets, stats, strict=True):
            seen[t.name] = s.hessian.clone()
            out.append(target_weight(model, t) * 0.5 if layer in halve else None)
        return out
    return seen, compress


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=1.0):
        return torch.relu(self.fc(x)) * scale


class _ListNet(nn.Module):
    """A ModuleList trunk the model loops over (chained), with an extra keyword argument passed to every block."""

    def __init__(self, d=6, chained=True):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.head = nn.Linear(d, 3)
        self.chained = chained

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x, scale=2.0)
            if not self.chained and i == 0:
                x = x + 1.0  # something between the blocks: not a chain
        return self.head(x)


@pytest.mark.parametrize("chained", [True, False])
def test_each_block_sees_the_inputs_the_compressed_earlier_block_produces(chained):
    torch.manual_seed(0)
    model = _ListNet(chained=chained).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    w0 = model.blocks[0].fc.weight.detach().clone()
    seen, compress = _record(model, halve={"blocks.0.fc"})
    res = compress_sequentially(model, x, compress, owner="t", batch_size=4, dtype=torch.float64)
    assert res.units == ["blocks.0", "blocks.1", "head"] and res.chained is chained
    h0 = torch.relu(x @ (0.5 * w0).T + model.blocks[0].fc.bias) * 2.0   # block 0 as compressed
    h0 = h0 + 1.0 if not chained else h0
    torch.testing.assert_close(seen["blocks.0.fc.weight"], 2 * x.T @ x / 10)
    torch.testing.assert_close(seen["blocks.1.fc.weight"], 2 * h0.T @ h0 / 10)
    h1 = model.blocks[1](h0, scale=2.0)
    torch.testing.assert_close(seen["head.weight"], 2 * h1.T @ h1 / 10)
    torch.testing.assert_close(model.blocks[0].fc.weight, 0.5 * w0)  # written back


def test_sequential_model_is_its_own_trunk_and_convolutions_use_unfolded_patches():
    """For any W, tr(W H Wᵀ) = (2/N) Σ ||conv(x; W) − b||² over the N output positions: H must be built from
    the patches in the weight's own (in, kh, kw) order, one Hessian per group."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    c1 = nn.Conv1d(6, 4, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(2), c1).double()
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    seen, compress = _record()
    res = compress_sequentially(model, x, compress, owner="t", batch_size=2, dtype=torch.float64)
    assert res.chained and res.units == ["0", "3"]
    assert set(seen) == {"0.weight[0:3]", "0.weight[3:6]", "3.weight"}
    for g in range(2):
        w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        y = F.conv2d(x[:, 2 * g:2 * g + 2], w, stride=2, padding=1)                  # (5, 3, 4, 4)
        n = y.shape[0] * y.shape[2] * y.shape[3]
        wm = w.reshape(3, -1)
        torch.testing.assert_close(torch.trace(wm @ seen[f"0.weight[{3 * g}:{3 * g + 3}]"] @ wm.T),
                                   2 * y.square().sum() / n)
    h = torch.relu(conv(x)).flatten(2)
    w = torch.randn(4, 6, 3, dtype=torch.float64)
    y = F.conv1d(F.pad(h, (1, 1), mode="reflect"), w)
    wm = w.reshape(4, -1)
    torch.testing.assert_close(torch.trace(wm @ seen["3.weight"] @ wm.T), 2 * y.square().sum() / (5 * y.shape[2]))


class _TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=8, heads=2, layers=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _attention_by_hand(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The heads' concatenated output (the input of out_proj), written out: x (B, T, E), batch first."""
    e, h = mha.embed_dim, mha.num_heads
    q, k, v = (x @ mha.in_proj_weight.T + mha.in_proj_bias).split(e, dim=-1)
    split = [t.reshape(x.shape[0], x.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v)]  # (B, h, T, e/h)
    att = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(e // h), dim=-1)
    return (att @ split[2]).transpose(1, 2).reshape(x.shape[0], x.shape[1], e)


def test_attention_in_proj_and_out_proj_get_the_inputs_a_decomposed_forward_sees(caplog):
    torch.manual_seed(0)
    model = _TinyTransformer().double().eval()
    x = torch.randint(0, 11, (6, 5))
    before = model(x)
    seen, compress = _record()
    with caplog.at_level(logging.INFO, logger="netsurgeon.calibration"):
        res = compress_sequentially(model, x, compress, owner="t", batch_size=4, dtype=torch.float64)
    assert res.chained and res.skipped == {"emb": "Embedding (weight) is not supported"}
    assert res.units == ["enc.layers.0", "enc.layers.1", "head"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # nothing changed, attention forward restored
    assert "forward" not in vars(model.enc.layers[0].self_attn)
    layer = model.enc.layers[0]
    h = model.emb(x)
    tokens = h.reshape(-1, 8)
    torch.testing.assert_close(seen["enc.layers.0.self_attn.in_proj_weight"], 2 * tokens.T @ tokens / 30)
    heads = _attention_by_hand(layer.self_attn, h).reshape(-1, 8)
    torch.testing.assert_close(seen["enc.layers.0.self_attn.out_proj.weight"], 2 * heads.T @ heads / 30)
    mid = layer.norm1(h + layer.self_attn.out_proj(heads.view(6, 5, 8)))
    a = mid.reshape(-1, 8)
    torch.testing.assert_close(seen["enc.layers.0.linear1.weight"], 2 * a.T @ a / 30)
    # memory: one block's inputs for 6 samples (5 x 8 float64 each) + the largest layer's Hessians (linear2: 16 x 16,
    # or in_proj + out_proj of an attention layer: 2 x 8 x 8), logged before the work
    assert res.memory["activations"] == 6 * 5 * 8 * 8 and res.memory["hessians"] == 16 * 16 * 8
    assert res.memory["largest_layer"] == "enc.layers.0.linear2"
    msg = [r.getMessage() for r in caplog.records if "peak memory estimate" in r.getMessage()]
    assert len(msg) == 1 and "(chained)" in msg[0]
    assert "largest layer enc.layers.0.linear2, 16 inputs, float64" in msg[0]
    assert res.memory["forward"] > 0 and res.memory["peak"] == 1920 + 2048 + res.memory["forward"]


def test_cross_attention_gets_one_hessian_per_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mem = nn.Linear(4, 8)
            self.att = mha

        def forward(self, x):
            m = self.mem(x[:, :, :4])
            return self.att(x, m, m)[0]

    model = Cross().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    seen, compress = _record()
    compress_sequentially(model, x, compress, owner="t", dtype=torch.float64)
    assert set(seen) == {"mem.weight", "att.in_proj_weight[0:8]", "att.in_proj_weight[8:24]", "att.out_proj.weight"}
    m = model.mem(x[:, :, :4]).reshape(-1, 8)
    torch.testing.assert_close(seen["att.in_proj_weight[8:24]"], 2 * m.T @ m / 15)
    q = x.reshape(-1, 8)
    torch.testing.assert_close(seen["att.in_proj_weight[0:8]"], 2 * q.T @ q / 15)


def test_unsupported_and_tied_layers_are_skipped_and_listed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.pos = nn.Parameter(torch.zeros(4))
            self.rnn = nn.LSTM(4, 4, batch_first=True)
            self.norm = nn.LayerNorm(4)
            self.out = nn.Linear(4, 5)
            self.out.weight = self.emb.weight  # tied
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.out(self.fc(self.norm(self.rnn(self.emb(x) + self.pos)[0])))

    layers, skipped = discover_layers(Odd())
    assert list(layers) == ["fc"]
    assert skipped == {"(model)": "Odd (pos) is not supported", "emb": "Embedding (weight) is not supported",
                       "rnn": "LSTM (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0) is not supported",
                       "out": "its weight is shared by emb.weight, out.weight (tied)"}


class Conv1D(nn.Module):
    """The layout of Hugging Face's GPT-2 Conv1D (y = x @ W + b, W stored (in, out)), without importing it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_a_conv1d_layer_is_compressed_as_its_transpose():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(3, 5), nn.ReLU(), Conv1D(2, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    w0 = model[0].weight.detach().clone()
    seen, compress = _record(model, halve={"0"})
    compress_sequentially(model, x, compress, owner="t", dtype=torch.float64)
    torch.testing.assert_close(model[0].weight, 0.5 * w0)                          # (in, out) rows halved in place
    h = torch.relu(x @ (0.5 * w0) + model[0].bias)
    torch.testing.assert_close(seen["2.weight"], 2 * h.T @ h / 7)                   # (3, 3): per input feature
    torch.testing.assert_close(seen["0.weight"], 2 * x.T @ x / 7)


@pytest.mark.slow  # importing transformers takes 5-15 s here
def test_hugging_face_gpt2_conv1d_and_tied_head():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    gpt = transformers.GPT2LMHeadModel(cfg).double().eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, x):
            return self.gpt(x, use_cache=False).logits[:, -1]

    model = Wrap()
    x = torch.randint(0, 17, (4, 6))
    grabbed = {}
    h = gpt.transformer.h[1].attn.c_attn.register_forward_pre_hook(lambda m, i: grabbed.setdefault("x", i[0]))
    model(x)
    h.remove()
    seen, compress = _record()
    res = compress_sequentially(model, x, compress, owner="t", dtype=torch.float64)
    assert res.skipped["gpt.lm_head"].startswith("its weight is shared by") and "gpt.transformer.wte" in res.skipped
    assert "gpt.transformer.h.1.mlp.c_proj.weight" in seen
    a = grabbed["x"].reshape(-1, 8)
    torch.testing.assert_close(seen["gpt.transformer.h.1.attn.c_attn.weight"], 2 * a.T @ a / 24)


def test_the_memory_estimate_sizes_one_batch_through_the_largest_block():
    """Each leaf's output per sample times the batch, and an attention layer's scores and softmax (B x heads x T x
    T float32, twice), which no module returns."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    res = compress_sequentially(mlp, torch.randn(10, 8), lambda n, ts, accs: [None] * len(ts), owner="t",
                                batch_size=4)
    # the Sequential is the trunk and each child a block: the largest, 16 floats a sample (batch 4, float32)
    assert res.memory["forward"] == 4 * 4 * 16

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    res = compress_sequentially(Attn(), torch.randn(6, 5, 8), lambda n, ts, accs: [None] * len(ts), owner="t",
                                batch_size=3)
    # out_proj never runs its own forward: the MHA's output (3 x 5 x 8) and its scores (3 x 2 x 5 x 5, twice)
    assert res.memory["forward"] == 4 * (3 * 5 * 8 + 2 * 3 * 2 * 5 * 5)


@pytest.mark.parametrize("method", ["heads", "ffn_neurons", "sparsegpt", "obc", "wanda", "gptq"])
def test_every_method_that_draws_calibration_samples_declares_the_draw_once(method):
    """samples, batch_size and seed live on one base (calibration.CalibratedConfig): no method redeclares them,
    and each keeps the defaults it had (128, 16, 0)."""
    import inspect

    from netsurgeon import calibration
    from netsurgeon.pipeline import get_method

    spec = get_method(method)
    draw = {"samples", "batch_size", "seed"}
    assert issubclass(spec.config, calibration.CalibratedConfig)
    assert not draw & {k for c in spec.config.__mro__ if c is not calibration.CalibratedConfig
                       for k in inspect.get_annotations(c)}
    cfg = spec.make_config()
    assert (cfg.samples, cfg.batch_size, cfg.seed) == (128, 16, 0)
    with pytest.raises(ValueError, match=rf"^{method}: samples must be an integer >= 1; got 0\.$"):
        spec.make_config({"samples": 0})
