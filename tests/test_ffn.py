"""FFN-neuron pruning (``ffn_neurons``): hidden neurons of feed-forward blocks are removed from both layers, the shrunk
model computes what the neuron-masked model computes, parameters drop by exactly the removed neurons' rows and
columns, the residual width is untouched, the file rebuilds the smaller model, and a block is never emptied."""

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.architecture import original_model
from netsurgeon.pipeline import Pipeline
from netsurgeon.pruning.ffn import (
    ffn_sites,
    find_ffn,
    l1_importance,
    neuron_gates,
    prune_ffn,
    select_neurons,
    taylor_importance,
)
from test_transformers import _model as _transformer  # the torch-native transformer and its token data
from test_transformers import _token_data


def _gates(keep: dict[str, list[int]], hidden: int) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([1.0 if j in v else 0.0 for j in range(hidden)]) for k, v in keep.items()}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _masked_then_pruned(model: nn.Module, keep: dict[str, list[int]], hidden: int, x: torch.Tensor):
    model.eval()
    with torch.no_grad(), neuron_gates(model, _gates(keep, hidden)):
        masked = model(x)
    n = _params(model)
    report = prune_ffn(model, keep)
    with torch.no_grad():
        got = model(x)
    return masked, got, n - _params(model), report


def test_torch_transformer_blocks_shrink_exactly_and_keep_the_residual_width():
    model, x = _transformer(), _token_data().test.x[:6]
    sites, skipped = ffn_sites(model)
    assert [(s.name, s.consumer, s.hidden) for s in sites] == [
        ("blocks.0.linear1", "blocks.0.linear2", 32), ("blocks.1.linear1", "blocks.1.linear2", 32)] and not skipped
    keep = {"blocks.0.linear1": [0, 3, 5, 7, 30], "blocks.1.linear1": list(range(0, 32, 2))}
    masked, got, dropped, report = _masked_then_pruned(model, keep, 32, x)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert report == {"blocks.0.linear1": {"before": 32, "after": 5}, "blocks.1.linear1": {"before": 32, "after": 16}}
    # each removed neuron: its row of linear1 (d_in = 16) and bias, its column of linear2 (d_out = 16)
    assert dropped == (27 + 16) * (16 + 1 + 16)
    for b in model.blocks:   # the residual stream keeps its width
        assert b.linear1.in_features == b.linear2.out_features == b.norm1.normalized_shape[0] == 16
    assert ns.changes.arch_of(model)["resized"]["blocks.0.linear2"] == {"in_features": 5}


def test_zoo_gpt_mlp_and_a_gated_mlp_shrink_exactly():
    torch.manual_seed(0)
    gpt = ns.build_model("gpt", (8,), num_classes=16, n_layer=2, width=16, n_head=2)
    x = torch.randint(0, 16, (3, 8))
    assert [s.name for s in ffn_sites(gpt)[0]] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    masked, got, dropped, _ = _masked_then_pruned(gpt, {"blocks.1.mlp.fc1": list(range(40))}, 64, x)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert dropped == 24 * (16 + 1 + 16) and gpt.blocks[1].mlp.fc2.out_features == 16

    class Gated(nn.Module):   # LLaMA's MLP: down(act(gate(x)) * up(x)), no biases
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 12, bias=False), nn.Linear(8, 12, bias=False)
            self.down_proj, self.act_fn = nn.Linear(12, 6, bias=False), nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    net = nn.Sequential(Gated())
    (site,) = ffn_sites(net)[0]
    assert (site.producers, site.consumer, site.kind) == (["0.gate_proj", "0.up_proj"], "0.down_proj", "gated")
    masked, got, dropped, _ = _masked_then_pruned(net, {"0.gate_proj": [1, 4, 9]}, 12, torch.randn(2, 5, 8))
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert dropped == 9 * (8 + 8 + 6)


def test_file_round_trip_and_runtime_rebuild_the_smaller_model(tmp_path):
    model, data = _transformer(), _token_data()
    Pipeline.from_spec(["ffn_neurons"], ["fraction=0.5", "importance=l1"]).run(model, data)
    assert model.blocks[0].linear1.out_features + model.blocks[1].linear1.out_features == 32
    model.eval()
    x = data.test.x[:5]
    with torch.no_grad():
        want = model(x)
    ns.nsz.save_compressed(model, tmp_path / "f.nsz")
    back = ns.load_compressed(tmp_path / "f.nsz", trust_code=True)
    assert [b.linear1.out_features for b in back.blocks] == [b.linear1.out_features for b in model.blocks]
    fast = ns.load_compressed(tmp_path / "f.nsz", trust_code=True, runtime=True, batch=5)
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)
    orig = original_model(ns.changes.arch_of(back), trust_code=True)   # what the sizes are reported against
    assert [b.linear1.out_features for b in orig.blocks] == [32, 32]


def test_a_block_is_never_emptied_and_misfits_are_one_line():
    model = _transformer()
    with pytest.raises(ValueError, match=r"^ffn_neurons: block 'blocks.0.linear1' would keep none of its 32 neurons"):
        prune_ffn(model, {"blocks.0.linear1": []})
    with pytest.raises(ValueError, match="must be sorted, distinct indices in \\[0, 32\\)"):
        prune_ffn(model, {"blocks.0.linear1": [3, 1]})
    with pytest.raises(ValueError, match="'head' is not a feed-forward block"):
        prune_ffn(model, {"head": [0]})
    assert model.blocks[0].linear1.out_features == 32   # nothing was cut by a refused call
    # fractions never empty a block: every block keeps min_neurons
    keep = select_neurons({"a": torch.ones(4), "b": torch.arange(1.0, 9.0)}, 0.99, scope="layer", min_neurons=2)
    assert keep == {"a": [2, 3], "b": [6, 7]}
    with pytest.raises(ValueError, match=r"^ffn_neurons: the model has no feed-forward block .*such blocks only\.$"):
        Pipeline.from_spec(["ffn_neurons"], ["importance=l1"]).run(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    odd = nn.TransformerEncoderLayer(8, 2, 16, activation=lambda t: torch.softmax(t, -1))
    with pytest.raises(ValueError, match="not a known elementwise function"):
        find_ffn(nn.Sequential(odd))
    factored = _transformer()
    factored.blocks[1].linear1 = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 32))   # as a low-rank stage leaves it
    sites, skipped = ffn_sites(factored)
    assert [s.name for s in sites] == ["blocks.0.linear1"]
    assert skipped == {"blocks.1": "linear1 is a Sequential, not a Linear layer"}
    masked = _transformer()
    Pipeline.from_spec(["magnitude"], ["sparsity=0.5", "epochs=0"]).run(masked)
    with pytest.raises(ValueError, match="remove neurons first"):
        find_ffn(masked)


def test_selection_per_block_fractions_and_rounding():
    scores = {"a": torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 6.0, 7.0]), "b": torch.arange(1.0, 9.0)}
    assert select_neurons(scores, {"a": 0.5}) == {"a": [0, 2, 6, 7], "b": list(range(8))}
    # 4 of 8 kept, rounded up to 6: the best-scoring of the dropped come back
    assert select_neurons(scores, 0.5, scope="layer", round_to=3) == {"a": [0, 2, 3, 4, 6, 7], "b": [2, 3, 4, 5, 6, 7]}
    with pytest.raises(ValueError, match="'c' is not a feed-forward block"):
        select_neurons(scores, {"c": 0.5})


@pytest.mark.parametrize("importance", ["taylor", "l1"])
def test_a_neuron_that_reaches_nothing_ranks_least_important(importance):
    model, data = _transformer(), _token_data()
    with torch.no_grad():
        model.blocks[1].linear2.weight[:, 5] = 0      # neuron 5 of block 1 is read by nothing
        if importance == "l1":
            model.blocks[1].linear1.weight[5] = 0     # l1 reads the first layer's row
    sites = find_ffn(model)
    if importance == "taylor":
        scores = taylor_importance(model, sites, data.train, samples=16, batch_size=8)
        assert scores["blocks.1.linear1"][5] == 0 and (scores["blocks.1.linear1"].sum() > 0)
    else:
        scores = {s.name: l1_importance(model, s) for s in sites}
    assert int(scores["blocks.1.linear1"].argmin()) == 5
    keep = select_neurons(scores, 1 / 64)   # one neuron of 64 goes: that one
    assert keep["blocks.1.linear1"] == [j for j in range(32) if j != 5] and len(keep["blocks.0.linear1"]) == 32


def test_cli_and_recipe_run_ffn_neurons(runner, tmp_path):
    from netsurgeon.cli import cli

    base = tmp_path / "b.safetensors"
    r = runner.invoke(cli, ["train", "--model", "lenet300", "--epochs", "1", "--max-steps", "2", "-o", str(base)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["compress", str(base), "--method", "ffn_neurons", "--set", "fraction=0.5",
                            "--set", "samples=16", "-o", str(tmp_path / "f.nsz")])
    assert r.exit_code == 0, r.output
    back = ns.load_compressed(tmp_path / "f.nsz")
    assert back.fc1.out_features + back.fc2.out_features == 200   # half of 300 + 100 hidden neurons, global
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - ffn_neurons: {fraction: {fc1: 0.25}, importance: l1}\n")
    r = runner.invoke(cli, ["compress", str(base), "--recipe", str(recipe), "-o", str(tmp_path / "r.nsz")])
    assert r.exit_code == 0, r.output
    back = ns.load_compressed(tmp_path / "r.nsz")
    assert (back.fc1.out_features, back.fc2.out_features) == (225, 100)


def test_an_ffn_pruned_transformer_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _transformer()
    prune_ffn(model, {"blocks.0.linear1": list(range(0, 32, 4))})
    ns.nsz.save_compressed(model, tmp_path / "t.nsz")
    info = ns.export_onnx(tmp_path / "t.nsz", tmp_path / "t.onnx", trust_code=True)
    assert info.max_abs_logit_diff < 1e-4


_CONVNEXT = ("ConvNextForImageClassification", dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4,
                                                    patch_size=2, num_stages=2), (3, 8, 8))


@pytest.mark.slow  # importing transformers takes seconds
@pytest.mark.parametrize("name, first, kind", [("gpt2", "model.transformer.h.0.mlp.c_fc", "gpt2"),
                                               ("bert", "model.bert.encoder.layer.0.intermediate.dense", "bert"),
                                               ("vit", None, None),
                                               ("convnext", "model.convnext.encoder.stages.1.layers.0.pwconv1",
                                                "convnext")])
def test_hugging_face_ffn_neurons_shrink_and_round_trip(name, first, kind, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import test_huggingface
    from test_huggingface import _build, _data

    monkeypatch.setitem(test_huggingface.MODELS, "convnext", _CONVNEXT)
    model, data = _build(name).eval(), _data(name)
    site = ffn_sites(model)[0][-1]
    if first is not None:
        assert (site.name, site.kind) == (first, kind)
    d, h = (16, site.hidden)
    x = data.test.x[:4]
    keep = {site.name: list(range(0, h, 3))}   # the last block (ConvNeXt: the 16-wide stage)
    masked, got, dropped, _ = _masked_then_pruned(model, keep, h, x)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert dropped == (h - len(keep[site.name])) * (d + 1 + d)
    ns.nsz.save_compressed(model, tmp_path / "h.nsz")
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "h.nsz")(x), got, rtol=1e-5, atol=1e-5)
        fast = ns.load_compressed(tmp_path / "h.nsz", runtime=True, batch=4)
        torch.testing.assert_close(fast(x), got, rtol=1e-4, atol=1e-4)
    if name == "gpt2" and __import__("importlib.util").util.find_spec("onnxruntime"):   # Conv1D resized in ONNX too
        assert ns.export_onnx(tmp_path / "h.nsz", tmp_path / "h.onnx").max_abs_logit_diff < 1e-4
    if name == "convnext":   # the layer scale multiplies the block's output channels: untouched
        assert model.model.convnext.encoder.stages[1].layers[0].layer_scale_parameter.shape == (16,)
    model = _build(name)   # the method itself, with Taylor importance on the model's data
    Pipeline.from_spec(["ffn_neurons"], ["fraction=0.5", "samples=8", "scope=layer"]).run(model, data)
    assert all(s.hidden * 2 == h0 for s, h0 in zip(ffn_sites(model)[0], [s.hidden for s in ffn_sites(_build(name))[0]],
                                                    strict=True))


class _SeqFirst(nn.Module):
    """A sequence-first encoder layer: its second FFN layer reads (T, B, f), the batch on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.head = nn.Embedding(10, 8), nn.Linear(8, 3)
        self.enc = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.tok(x).transpose(0, 1)).mean(0))


def test_taylor_gates_each_sample_also_when_the_batch_is_not_the_first_axis():
    from netsurgeon.data import Split

    torch.manual_seed(0)
    model = _SeqFirst()
    (site,) = find_ffn(model)
    assert site.batch_dim == 1
    x = torch.randint(0, 10, (8, 5))
    split = Split(x, x[:, 0] % 3)
    together = taylor_importance(model, [site], split, samples=8, batch_size=4)
    alone = taylor_importance(model, [site], split, samples=8, batch_size=1)   # one sample per pass: no mixing
    torch.testing.assert_close(together["enc.linear1"], alone["enc.linear1"], rtol=1e-5, atol=1e-8)


def test_heads_then_neurons_in_one_pipeline_round_trip(tmp_path):
    model, data = _transformer(), _token_data()
    Pipeline.from_spec(["heads", "ffn_neurons"], ["1.importance=l1", "2.importance=l1", "2.fraction=0.25"]).run(
        model, data)
    assert set(ns.changes.arch_of(model)) >= {"heads", "resized"}
    model.eval()
    x = data.test.x[:4]
    ns.nsz.save_compressed(model, tmp_path / "t.nsz")
    with torch.no_grad():
        torch.testing.assert_close(ns.load_compressed(tmp_path / "t.nsz", trust_code=True)(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\) or a mapping"):   # never a whole block
        Pipeline.from_spec(["ffn_neurons"], ['fraction={"blocks.0.linear1": 1.0}'])
