"""Transformers are compressed layer by layer, never refused whole (issue 36): a torch-native transformer (token
embedding, a bare positional parameter, nn.MultiheadAttention's packed projections, LayerNorm) and, where
``transformers`` is installed (a test extra), tiny Hugging Face BERT, GPT-2 and ViT built from configs. Every
registered method either works or refuses by name; the file rebuilds the same function, also in its runtime form."""

import json

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.data import Dataset, Split
from netsurgeon.pipeline import Pipeline, get_method, methods


class TinyTransformer(nn.Module):
    """Token ids (B, T) -> class logits: embedding + positional parameter, pre-norm encoder layers, mean pool."""

    def __init__(self, vocab: int = 24, seq: int = 6, dim: int = 16, heads: int = 2, layers: int = 2,
                 classes: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def tiny_transformer(**kwargs) -> nn.Module:
    return TinyTransformer(**kwargs)


def _token_data(n: int = 96, seq: int = 6, vocab: int = 24, classes: int = 4, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)

    def split(k: int) -> Split:
        x = torch.randint(0, vocab, (k, seq), generator=g)
        return Split(x, x[:, 0] % classes)   # learnable: the class is the first token's residue

    return Dataset("tokens", split(n), split(32), split(32), classes)


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = ns.models.record_arch(TinyTransformer(), f"{__name__}:tiny_transformer", {}, (6,))
    ns.changes.arch_of(m)["input_dtype"] = "int64"
    return m


def test_weight_sites_of_a_transformer_and_what_is_left():
    from netsurgeon.masks import skipped_layers, weight_sites

    m = _model()
    kinds = {s.fqn: s.kind for s in weight_sites(m)}
    assert kinds["tok.weight"] == "embedding"
    assert kinds["blocks.0.self_attn.in_proj_weight"] == "attention"
    assert kinds["blocks.0.self_attn.out_proj.weight"] == "attention"   # used functionally by its parent
    assert kinds["blocks.1.linear2.weight"] == "linear" and kinds["head.weight"] == "linear"
    left = skipped_layers(m)
    assert left["(the model itself)"] == "TinyTransformer: bare parameter(s) pos kept as they are"
    assert left["blocks.0.norm1"].startswith("LayerNorm: a normalization layer")


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.slow) if m not in ("magnitude", "kmeans", "int8", "dns", "woodfisher") else m
    for m in sorted(methods())])
def test_every_method_on_a_transformer_works_or_refuses_by_name(method, tmp_path):
    model, data = _model(), _token_data()
    x = data.test.x[:5]
    spec = get_method(method)
    stages = [method] if spec.kind != "codec" else []
    quick = [f"{k}={json.dumps(v)}" for k, v in spec.quick.items()]
    pipe = Pipeline.from_spec(stages or ["encode"], quick)
    try:
        pipe.run(model, data)
    except ValueError as e:   # a refusal names the layer or the kind of layer it cannot take
        words = ("Linear", "Conv", "layer", "BatchNorm", "hidden", "weights", "channel")
        assert any(w in str(e) for w in words), str(e)
        return
    model.eval()
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "t.nsz"
    pipe.save(model, path)
    back = ns.load_compressed(path, trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, atol=1e-4, rtol=1e-4)
        fast = ns.load_compressed(path, trust_code=True, runtime=True, batch=5)
        torch.testing.assert_close(fast(x), ref, atol=1e-3, rtol=1e-3)


def test_a_transformer_file_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model()
    Pipeline.from_spec(["magnitude", "int8"], ["sparsity=0.5", "epochs=0"]).run(model)
    ns.nsz.save_compressed(model, tmp_path / "t.nsz")
    info = ns.export_onnx(tmp_path / "t.nsz", tmp_path / "t.onnx", trust_code=True)
    # onnxruntime's optimizer runs the int8 QDQ matmuls of the attention and feed-forward layers as integer kernels
    # (it quantizes the activations too): 1.7e-3 here; with its graph optimizations off the graph matches to 1e-7
    assert info.max_abs_logit_diff < 5e-3
    assert "blocks.0.self_attn.in_proj_weight" in info.compact   # the packed projection stays int8 in ONNX
