"""The data options of the command line: image folders, text for language models, metrics, one-line errors."""

import json

import numpy as np
import pytest

from netsurgeon.cli import cli
from test_data_sources import write_image_folder

BIGRAM = '''
import torch
from torch import nn


class Bigram(nn.Module):
    """A language model of Linear layers only: one-hot token -> hidden -> next-token logits."""

    def __init__(self, vocab=256, hidden=16):
        super().__init__()
        self.vocab = vocab
        self.fc1 = nn.Linear(vocab, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, x):  # (B, T) ids -> (B, T, vocab)
        return self.fc2(torch.relu(self.fc1(nn.functional.one_hot(x, self.vocab).float())))


def bigram(hidden=16):
    return Bigram(256, hidden)
'''


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def _one_line_error(result, *parts):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.output
    for p in parts:
        assert p in lines[0], result.output


def test_train_and_eval_an_image_folder(runner, tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    out = tmp_path / "m.safetensors"
    text = _ok(runner.invoke(cli, ["train", "--model", "digits_cnn", "--data", "imagefolder", "--data-dir", str(root),
                                   "--normalize", "auto", "--epochs", "4", "--batch-size", "4", "--lr", "0.05",
                                   "--threads", "1", "-o", str(out)]))
    assert "digits_cnn on imagefolder: test accuracy" in text
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(out), "--json", "--batch", "2", "--threads", "1"])))
    assert s["metric"] == "accuracy" and s["test_accuracy"] == 1.0  # three flat colours; the file's data again
    r = runner.invoke(cli, ["eval", str(out), "--data", "imagefolder", "--data-dir", str(root), "--resize", "4",
                            "--json", "--batch", "2"])
    _one_line_error(r, "expects inputs [3, 8, 8] but imagefolder has [3, 4, 4]")
    small = tmp_path / "m.nsz"  # compressed from the shell on the same folder (the file records the data options)
    text = _ok(runner.invoke(cli, ["compress", str(out), "--method", "magnitude", "--set", "sparsity=0.5",
                                   "--set", "max_steps=4", "--threads", "1", "-o", str(small)]))
    assert "test accuracy" in text and small.is_file()


def test_text_file_language_model_trains_and_evaluates_by_perplexity(runner, tmp_path, monkeypatch):
    (tmp_path / "lmpkg.py").write_text(BIGRAM)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "t.txt").write_bytes(b"abcabd" * 300)
    out = tmp_path / "lm.safetensors"
    text = _ok(runner.invoke(cli, ["train", "--model", "lmpkg:bigram", "--data", "text", "--data-file",
                                   str(tmp_path / "t.txt"), "--seq-len", "12", "--metric", "perplexity",
                                   "--optimizer", "adam", "--lr", "0.02", "--weight-decay", "0", "--epochs", "4",
                                   "--batch-size", "8", "--threads", "1", "-o", str(out)]))
    assert "lmpkg:bigram on text: test perplexity" in text
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(out), "--trust-code", "--json", "--batch", "3",
                                           "--threads", "1"])))
    # "abcabd": b is followed by c or d (1 bit, at 2 of 6 positions), every other byte by one byte; a bigram model
    # can do no better than perplexity 2^(2/6)
    assert s["metric"] == "perplexity" and 2 ** (1 / 3) - 0.01 < s["test_perplexity"] < 1.6
    assert s["flops_dense"] == 2 * 12 * 2 * 256 * 16  # per sequence: 12 positions through two 256x16 layers
    s2 = json.loads(_ok(runner.invoke(cli, ["eval", str(out), "--trust-code", "--json", "--batch", "3",
                                            "--metric", "accuracy"])))
    assert s2["metric"] == "accuracy" and "test_perplexity" not in s2 and s2["test_accuracy"] > 0.8


def test_gpt_trains_through_the_cli_with_token_ids(runner, tmp_path):
    ids = np.tile(np.array([5, 6, 7, 8, 9, 6], dtype=np.uint16), 200)
    ids.tofile(tmp_path / "ids.bin")
    out = tmp_path / "g.safetensors"
    text = _ok(runner.invoke(cli, ["train", "--model", "gpt", "--model-arg", "n_layer=1", "--model-arg", "width=16",
                                   "--model-arg", "n_head=2", "--data-file", str(tmp_path / "ids.bin"),
                                   "--seq-len", "8", "--optimizer", "adam", "--lr", "0.02", "--weight-decay", "0",
                                   "--epochs", "2", "--threads", "1", "-o", str(out)]))
    assert "gpt on tokens: test perplexity" in text
    ppl = float(text.split("test perplexity ")[1].split()[0])
    assert ppl < 3.0  # 10 ids in the file: uniform would be 10
    small = tmp_path / "g.nsz"
    text = _ok(runner.invoke(cli, ["compress", str(out), "--method", "int8", "--data-file", str(tmp_path / "ids.bin"),
                                   "--seq-len", "8", "--metric", "perplexity", "--threads", "1", "-o", str(small)]))
    assert "test perplexity" in text and float(text.split("test perplexity ")[1].split()[0]) < 3.0


@pytest.mark.parametrize("args, parts", [
    (["--data", "imagefolder", "--data-dir", "{tmp}/missing"], ["data directory does not exist", "missing'"]),
    (["--data", "text", "--data-file", "{tmp}/t.txt", "--seq-len", "500"],
     ["seq_len must be an integer in [1, ", "got 500"]),
    (["--data", "tokens", "--data-file", "{tmp}/odd.bin"], ["holds 3 bytes, not a multiple of 2"]),
    (["--data", "digits", "--seq-len", "8"], ["data set 'digits' does not read --seq-len (got '8')"]),
    (["--data", "cifar"], ["unknown data set 'cifar'"]),
    (["--metric", "bleu"], ["'bleu' is not one of 'accuracy', 'perplexity'"]),
    (["--data", "nosuchmod:make"], ["cannot import module 'nosuchmod'"]),
])
def test_bad_data_options_are_one_line_before_any_work(runner, tmp_path, args, parts):
    (tmp_path / "t.txt").write_bytes(b"x" * 300)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = runner.invoke(cli, ["train", "--model", "lenet300", *args, "-o", str(tmp_path / "m.safetensors")])
    _one_line_error(r, *parts)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_data_factory_named_by_a_file_needs_trust(runner, tmp_path, monkeypatch):
    (tmp_path / "dfac.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    ds = lambda n: TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10)\n"
        "    return ds(40), None, ds(10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "m.safetensors"
    _ok(runner.invoke(cli, ["train", "--model", "lenet300", "--data", "dfac:make", "--epochs", "1", "-o", str(out)]))
    r = runner.invoke(cli, ["eval", str(out), "--json", "--batch", "2"])
    _one_line_error(r, "names the data factory 'dfac:make', code outside netsurgeon", "--trust-code")
    s = json.loads(_ok(runner.invoke(cli, ["eval", str(out), "--data", "dfac:make", "--json", "--batch", "2"])))
    assert s["metric"] == "accuracy" and 0 <= s["test_accuracy"] <= 1
