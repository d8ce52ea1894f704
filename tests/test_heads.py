"""Attention head pruning (``heads``, Michel et al. 2019): the shrunk model computes what the head-masked model
computes, with fewer parameters and FLOPs; the file rebuilds it without pickle and its record is bounded; a model
without attention is refused in one line; importance ranks a head that cannot reach the output lowest."""

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.changes.heads import HeadAttention, attention_sites
from netsurgeon.coding.container import NszError
from netsurgeon.data import Dataset, Split
from netsurgeon.pipeline import Pipeline
from netsurgeon.pruning.heads import (
    find_attention,
    head_gates,
    l1_importance,
    prune_heads,
    select_heads,
    taylor_importance,
)


class TinyLM(nn.Module):
    """Token ids (B, T) -> class logits: two encoder layers of 4 heads (one batch-first, one sequence-first)."""

    def __init__(self, vocab: int = 16, dim: int = 16, heads: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.a = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.b = nn.MultiheadAttention(dim, heads)   # (T, B, E)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(self.tok(x))
        s = h.transpose(0, 1)
        h = h + self.b(s, s, s, need_weights=False)[0].transpose(0, 1)
        return self.head(h.mean(1))


def tiny_lm() -> nn.Module:
    return TinyLM()


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = ns.models.record_arch(TinyLM(), f"{__name__}:tiny_lm", {}, (5,))
    ns.changes.arch_of(m)["input_dtype"] = "int64"
    return m.eval()


def _data(n: int = 48) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(k: int) -> Split:
        x = torch.randint(0, 16, (k, 5), generator=g)
        return Split(x, x[:, 0] % 3)

    return Dataset("tokens", split(n), split(8), split(8), 3)


KEEP = {"a.self_attn": [0, 2], "b": [3]}


def _gates(keep: dict[str, list[int]], heads: int = 4) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([1.0 if h in v else 0.0 for h in range(heads)]) for k, v in keep.items()}


def test_shrunk_model_equals_the_head_masked_model_and_is_smaller():
    model, x = _model(), _data().test.x
    with torch.no_grad(), head_gates(model, _gates(KEEP)):
        masked = model(x)
    params = sum(p.numel() for p in model.parameters())
    flops = sum(r.dense for r in ns.stats.layer_flops(model, (5,)))
    report = prune_heads(model, KEEP)
    assert report["b"] == {"before": 4, "after": 1, "kept": [3]}
    assert isinstance(model.a.self_attn, HeadAttention) and model.a.self_attn.q_proj.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-6)
    # q, k, v rows and out columns: 4·16 weights and 3 biases per removed head dimension (2 + 3 heads of width 4)
    assert params - sum(p.numel() for p in model.parameters()) == 5 * 4 * (4 * 16 + 3)
    assert sum(r.dense for r in ns.stats.layer_flops(model, (5,))) < flops
    with torch.no_grad(), head_gates(model, _gates({"a.self_attn": [1]}, 2)):   # pruned again: indices compose
        masked = model(x)
    prune_heads(model, {"a.self_attn": [1]})
    assert model.a.self_attn.heads == [2] and ns.changes.arch_of(model)["heads"] == {"a.self_attn": [2], "b": [3]}
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-6)


def test_head_attention_is_nn_multihead_attention_with_every_head():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 8), torch.randn(5, 5)
    pad = torch.zeros(2, 5).masked_fill(torch.tensor([[False] * 4 + [True], [False] * 5]), float("-inf"))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    full = HeadAttention.from_mha(mha, [0, 1])
    for kw in ({}, {"attn_mask": mask, "key_padding_mask": pad},
               {"attn_mask": mask > 0, "key_padding_mask": pad != 0, "need_weights": False},
               {"attn_mask": torch.randn(4, 5, 5), "average_attn_weights": False}):
        want, got = mha(x, x, x, **kw), full(x, x, x, **kw)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_file_round_trip_rebuilds_the_smaller_model(tmp_path):
    model, data = _model(), _data()
    Pipeline.from_spec(["heads"], ["fraction=0.5", "importance=l1"]).run(model, data)
    assert ns.changes.arch_of(model)["heads"]
    x = data.test.x
    with torch.no_grad():
        want = model(x)
    ns.nsz.save_compressed(model, tmp_path / "h.nsz")
    back = ns.load_compressed(tmp_path / "h.nsz", trust_code=True)
    assert isinstance(back.b, HeadAttention) and back.b.heads == model.b.heads
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trust_code"):   # rebuilt from a factory: never silently
        ns.load_compressed(tmp_path / "h.nsz")


@pytest.mark.parametrize("bad, msg", [
    ({"b": []}, "list of 1 to 4096"), ({"b": [2, 1]}, "increasing"), ({"b": [-1]}, r"\[0, 4095\]"),
    ({"b": "all"}, "list of 1 to 4096"), ({"b": [True]}, r"\[0, 4095\]"), ([1], "map layer names")])
def test_heads_record_is_bounded(bad, msg):
    from netsurgeon.changes import changes

    with pytest.raises(NszError, match=msg):
        changes()["heads"].check("f.nsz", bad)


def test_a_record_that_does_not_fit_the_model_is_refused():
    from netsurgeon.changes.heads import apply_heads

    with pytest.raises(ValueError, match="has no head 7"):
        apply_heads(_model(), {"b": [7]})
    with pytest.raises(ValueError, match="'head' .*not an attention layer"):
        apply_heads(_model(), {"head": [0]})


def test_a_model_without_attention_is_refused_in_one_line_before_any_work():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"^heads: the model has no attention layer .*applies to attention only\.$"):
        Pipeline.from_spec(["heads"], ["samples=100000"]).run(model, _data())
    unsupported = nn.Sequential(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(ValueError, match="add_zero_attn is not supported"):
        find_attention(unsupported)


@pytest.mark.parametrize("importance", ["taylor", "l1"])
def test_a_head_whose_output_weights_are_zero_ranks_least_important(importance):
    model, data = _model(), _data()
    with torch.no_grad():
        model.b.out_proj.weight[:, 4:8] = 0   # head 1 of layer b reaches nothing
    sites = find_attention(model)
    if importance == "taylor":
        scores = taylor_importance(model, sites, data.train, samples=16, batch_size=8)
        assert scores["b"][1] == 0 and (scores["b"][[0, 2, 3]] > 0).all()
    else:
        scores = {s.name: l1_importance(s) for s in sites}
    assert int(scores["b"].argmin()) == 1
    keep = select_heads(scores, 1 / 8)   # one head of eight goes: that one
    assert keep == {"a.self_attn": [0, 1, 2, 3], "b": [0, 2, 3]}


def test_select_heads_keeps_one_head_per_layer_and_per_layer_fractions():
    scores = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0]), "y": torch.tensor([0.1, 0.2])}
    assert select_heads(scores, 0.99, normalize=False) == {"x": [3], "y": [1]}
    assert select_heads(scores, 0.5, scope="layer") == {"x": [2, 3], "y": [1]}
    assert select_heads(scores, 0.5, normalize=False) == {"x": [2, 3], "y": [1]}
    assert select_heads(scores, 0.0) == {"x": [0, 1, 2, 3], "y": [0, 1]}


@pytest.mark.slow  # importing transformers takes seconds (5-15 s on a loaded machine): with the slow cases
def test_hugging_face_gpt2_loses_heads_and_round_trips(tmp_path):
    pytest.importorskip("transformers")
    config = dict(vocab_size=16, n_embd=16, n_layer=1, n_head=4, n_positions=8, num_labels=3, pad_token_id=0,
                  bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = ns.build_model("netsurgeon.models:huggingface", (5,), cls="GPT2ForSequenceClassification", config=config)
    ns.changes.arch_of(model)["input_dtype"] = "int64"
    model.eval()
    data = _data()
    (site,) = attention_sites(model)[0]
    assert site.kind == "gpt2" and site.num_heads == 4
    keep = {site.name: [1, 3]}
    with torch.no_grad(), head_gates(model, _gates(keep)):
        masked = model(data.test.x)
    n = sum(p.numel() for p in model.parameters())
    prune_heads(model, keep)
    assert n - sum(p.numel() for p in model.parameters()) == 2 * 4 * (4 * 16 + 3)
    with torch.no_grad():
        got = model(data.test.x)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-6)
    ns.nsz.save_compressed(model, tmp_path / "g.nsz")
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "g.nsz", trust_code=True)(data.test.x), got)


def test_a_transformer_encoder_with_a_padding_mask_still_runs_after_pruning():
    """nn.TransformerEncoder's fused inference path (set up at construction) would feed the layers nested tensors,
    which only nn.MultiheadAttention reads: shrinking a layer turns that path off."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                enable_nested_tensor=True).eval()
    x, pad = torch.randn(3, 5, 16), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    keep = {"layers.0.self_attn": [0, 3], "layers.1.self_attn": [2]}
    with torch.no_grad(), head_gates(enc, _gates(keep)):
        masked = enc(x, src_key_padding_mask=pad)
    prune_heads(enc, keep)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, src_key_padding_mask=pad)[~pad], masked[~pad], rtol=1e-5, atol=1e-6)
