"""Post-training methods end to end through pipelines: a tiny MLP and a tiny torch-native transformer (embedding,
TransformerEncoderLayer stack, Linear head), saved and loaded back."""

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.data import Dataset, Split
from netsurgeon.masks import get_masks
from netsurgeon.pipeline import Pipeline, weight_form
from netsurgeon.stats import num_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second torch thread only adds contention on a shared machine (measured: 8x slower)."""
    with num_threads(1):
        yield



class TinyTransformer(nn.Module):
    def __init__(self, vocab=13, d=16, heads=2, layers=2, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _tokens(n=40, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(k):
        return Split(torch.randint(0, 13, (k, t), generator=g), torch.randint(0, 4, (k,), generator=g))
    return Dataset("tokens", split(n), split(8), split(8), num_classes=4)


def _vectors(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(k):
        return Split(torch.randn(k, 1, 4, 4, generator=g), torch.randint(0, 4, (k,), generator=g))
    return Dataset("vectors", split(n), split(8), split(8), num_classes=4)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _transformer():
    torch.manual_seed(0)
    return TinyTransformer().eval()


CASES = {
    "sparsegpt": ([{"sparsegpt": {"samples": 16}}], "float"),
    "sparsegpt 2:4": ([{"sparsegpt": {"samples": 16, "pattern": "2:4"}}], "float"),
    "obc": ([{"obc": {"samples": 16}}], "float"),
    "wanda": ([{"wanda": {"samples": 16}}], "float"),
    "gptq": ([{"gptq": {"samples": 16, "group_size": 8, "act_order": True}}], "grouped"),
    "rtn": ([{"rtn": {"bits": 3, "group_size": None}}], "grouped"),
    "sparsegpt + gptq": ([{"sparsegpt": {"samples": 16}}, {"gptq": {"samples": 16, "bits": 4}}], "grouped"),
    "sparsegpt 2:4 + gptq": ([{"sparsegpt": {"samples": 16, "pattern": "2:4"}}, {"gptq": {"samples": 16, "bits": 4}}],
                             "grouped"),   # written as grouped_nm (tests/test_grouped_nm.py)
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["mlp", "transformer"])
def test_post_training_pipelines_run_save_and_reload(case, which, tmp_path):
    model, data = (_mlp(), _vectors()) if which == "mlp" else (_transformer(), _tokens())
    x = data.test.x
    with torch.no_grad():
        dense = model.eval()(x)
    stages, form = CASES[case]
    pipe = Pipeline.from_spec(stages)
    records = pipe.run(model, data)
    assert weight_form(model) == form
    report = records[-2]["report"]
    if which == "transformer":
        assert report["skipped"] == {"emb": "Embedding (weight) is not supported"}
        if "samples" in report:
            assert report["chained"] is True
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert not torch.equal(out, dense)                       # something was compressed
    attn = "enc.layers.1.self_attn.in_proj_weight" if which == "transformer" else "3.weight"
    mod, _, attr = attn.rpartition(".")
    w = getattr(model.get_submodule(mod), attr)
    if form == "float":
        assert get_masks(model)[attn].mask.mean() == pytest.approx(0.5, abs=0.01)
        assert (w[get_masks(model)[attn].mask == 0] == 0).all()
    else:  # every weight on its group's grid: at most 2^bits distinct values per row and group
        bits = stages[-1].get("gptq", stages[-1].get("rtn", {})).get("bits", 4)
        assert max(len(torch.unique(r)) for r in w) <= 2**bits * (w.shape[1] // 8 if "gptq" in case else 1)
    path = tmp_path / "m.nsz"
    pipe.save(model, path)
    if form == "grouped":  # 2:4 then int4: only the kept codes are written (forms/grouped_nm.py)
        codec = next(r.codec for r in ns.nsz.read_header(path).records if r.name == attn)
        assert codec == ("grouped_nm" if "2:4 +" in case else "grouped")
    loaded = ns.load_compressed(path, TinyTransformer() if which == "transformer" else _mlp())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), out, rtol=1e-5, atol=1e-5)


def test_calibration_samples_come_from_the_training_split_only():
    model, data = _mlp(), _vectors()
    poisoned = Dataset("p", data.train, Split(data.val.x * float("nan"), data.val.y),
                       Split(data.test.x * float("nan"), data.test.y), 4)
    rep = Pipeline.from_spec([{"sparsegpt": {"samples": 1000}}]).run(model, poisoned)[0]["report"]
    assert rep["samples"] == 40 and torch.isfinite(model[1].weight).all()
