"""Language models: next-token loss and perplexity, the GPT of the model zoo, training it."""

import math

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.data import Split
from netsurgeon.models import build_model, gpt


class Uniform(nn.Module):
    """Equal logits for every token: perplexity = vocabulary size exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab) * self.scale


def test_evaluate_counts_every_token_and_gives_perplexity():
    x = torch.arange(24).reshape(4, 6) % 5
    ev = ns.evaluate(Uniform(5), Split(x, (x + 1) % 5), batch_size=3)
    assert ev.loss == pytest.approx(math.log(5)) and ev.perplexity == pytest.approx(5.0)
    assert ev.metric("perplexity") == ev.perplexity and ev.metric("accuracy") == ev.accuracy
    loss, acc = ev  # still unpacks as (loss, accuracy)
    assert acc == pytest.approx(float(((x + 1) % 5 == 0).float().mean()))  # argmax of equal logits: token 0
    with pytest.raises(ValueError, match="metric must be one of accuracy, perplexity; got 'bleu'"):
        ev.metric("bleu")


def test_evaluate_flattens_tokens_as_cross_entropy_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 7))
    x = torch.randint(0, 7, (5, 3))
    y = torch.randint(0, 7, (5, 3))
    want = nn.functional.cross_entropy(model(x).reshape(-1, 7), y.reshape(-1)).item()
    assert ns.evaluate(model, Split(x, y)).loss == pytest.approx(want, rel=1e-6)


def test_gpt_is_causal_and_has_the_documented_size():
    torch.manual_seed(0)
    m = gpt((16,), 50, n_layer=2, width=32, n_head=4).eval()
    x = torch.randint(0, 50, (2, 16))
    x2 = x.clone()
    x2[:, 9:] = (x2[:, 9:] + 1) % 50  # change only the future of position 8
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert a.shape == (2, 16, 50)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    assert m(x[:, :5]).shape == (2, 5, 50)  # shorter than the context
    big = build_model("gpt", (128,), 256)
    assert sum(p.numel() for p in big.parameters()) == 3_323_648
    assert isinstance(big.head, nn.Linear) and big.head.weight.data_ptr() != big.tok.weight.data_ptr()


@pytest.mark.parametrize("kwargs, message", [
    ({"input_shape": (1, 28, 28)}, r"input_shape must be \(context,\) of token ids; got \(1, 28, 28\)"),
    ({"width": 30, "n_head": 4}, "width must be a multiple of n_head; got width=30, n_head=4"),
    ({"n_layer": 0}, "n_layer must be a positive integer; got 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\); got 1.0"),
])
def test_gpt_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt(**kwargs)


def test_gpt_trains_on_text_and_its_perplexity_drops(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"the cat sat on the mat. " * 80)
    data = ns.data.text_file(tmp_path / "t.txt", seq_len=24)
    torch.manual_seed(0)
    model = build_model("gpt", data.input_shape, data.num_classes, n_layer=1, width=32, n_head=2)
    before = ns.evaluate(model, data.val).perplexity
    assert 200 < before < 320  # about uniform over 256 bytes at initialisation
    r = ns.train(model, data, ns.TrainConfig(epochs=4, batch_size=8, optimizer="adam", lr=1e-2, weight_decay=0))
    after = ns.evaluate(model, data.val).perplexity
    assert after < 3.0 and r.history[-1]["val_loss"] == pytest.approx(math.log(after), rel=1e-6)
    assert r.history[-1]["loss"] < r.history[0]["loss"]


class Bigram(nn.Module):
    """A language model of Linear layers only (every method can prune it): one-hot token -> hidden -> logits."""

    def __init__(self, vocab: int = 256, hidden: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.fc1 = nn.Linear(vocab, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(nn.functional.one_hot(x, self.vocab).float())))


def test_compare_page_judges_by_the_results_metric():
    from netsurgeon.compare_html import _dense_score, _score

    res = {"metric": "perplexity", "dense": {"test_perplexity": 3.14159, "test_error_pct": 40.0}}
    assert _score(res) == ("test_perplexity", "perplexity", ".3f") and _dense_score(res) == "test perplexity 3.142"
    res = {"dense": {"test_error_pct": 1.234}}  # results written before metrics existed: test error
    assert _score(res)[0] == "test_error_pct" and _dense_score(res) == "test error 1.23%"


@pytest.mark.slow
def test_compare_ranks_a_language_model_by_perplexity(tmp_path):
    from netsurgeon.compare import Plan, compare, plan_entries

    (tmp_path / "t.txt").write_bytes(b"abcabd" * 200)
    data = ns.data.text_file(tmp_path / "t.txt", seq_len=12)
    torch.manual_seed(0)
    model = Bigram()
    ns.train(model, data, ns.TrainConfig(epochs=3, batch_size=8, optimizer="adam", lr=0.02, weight_decay=0))
    plan = Plan(steps=5, steps_per_epoch=Plan.epoch_steps(data))
    r = compare(model, data, tmp_path / "rep", entries=plan_entries(plan, ["magnitude"]), plan=plan, batches=(1, 256),
                repeats=5, threads=1, data_name="text", progress=False)
    assert r["metric"] == "perplexity"
    row, dense = r["rows"][0], r["dense"]
    assert row["status"] == "ok", row.get("error")
    assert dense["test_perplexity"] == pytest.approx(ns.evaluate(model, data.test).perplexity, rel=1e-5)
    assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]))
    page = (tmp_path / "rep" / "index.html").read_text()
    assert ">perplexity</th>" in page and f"dense input: test perplexity {dense['test_perplexity']:.3f}" in page
    assert "perplexity vs file size" in page and "error %" not in page


@pytest.mark.parametrize("method", ["obd", "kfac"])
def test_true_fisher_and_kfac_run_on_a_language_model(method):
    """OBD samples labels from the model's (B, V, T) next-token distribution (it passed a 3-d tensor to
    multinomial); K-FAC covers the Linear layers whose forward runs and lists the rest (the embedding, the packed
    attention projection, the out_proj nn.MultiheadAttention reads itself) instead of refusing the model."""
    from netsurgeon.data.text import tokens_dataset

    g = torch.Generator().manual_seed(1)
    data = tokens_dataset(*(torch.randint(0, 20, (n,), generator=g) for n in (600, 200, 200)), seq_len=8,
                          vocab_size=20)
    torch.manual_seed(0)
    model = gpt((8,), 20, n_layer=1, width=16, n_head=2)
    rec = ns.Pipeline.from_spec([{method: {"sparsity": 0.5, "num_grads": 8}}]).run(model, data)[0]
    fc = model.blocks[0].mlp.fc1.weight
    assert float((fc == 0).float().mean()) > 0.2  # pruned by the method's ranking
    if method == "kfac":
        assert {"tok", "blocks.0.attn.out_proj"} <= set(rec["skipped"]), rec["skipped"]
        assert int((model.tok.weight == 0).sum()) == 0
    assert torch.isfinite(model(data.val.x[:2])).all()


def test_kfac_two_four_on_a_language_model_leaves_what_it_has_no_factors_for():
    from netsurgeon.data.text import tokens_dataset

    g = torch.Generator().manual_seed(1)
    data = tokens_dataset(*(torch.randint(0, 20, (n,), generator=g) for n in (600, 200, 200)), seq_len=8,
                          vocab_size=20)
    torch.manual_seed(0)
    model = gpt((8,), 20, n_layer=1, width=16, n_head=2)
    out_proj = model.blocks[0].attn.out_proj.weight.detach().clone()
    rec = ns.Pipeline.from_spec([{"kfac": {"pattern": "2:4", "num_grads": 8}}]).run(model, data)[0]
    w = model.blocks[0].mlp.fc1.weight.detach()
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()  # exactly 2 of every 4 inputs
    torch.testing.assert_close(model.blocks[0].attn.out_proj.weight.detach(), out_proj)  # no factors: untouched
    assert "blocks.0.attn.out_proj" in rec["skipped"]
