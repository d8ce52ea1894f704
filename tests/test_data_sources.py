"""The user's data: image folders, .npz arrays, token files, text, factories, and the stdlib corpus."""

import hashlib

import numpy as np
import pytest
import torch

import netsurgeon as ns
from netsurgeon.data import DataError, load_dataset

COLORS = {"a": (200, 10, 10), "b": (10, 200, 10), "c": (10, 10, 200)}


def write_image_folder(root, per_class=6, size=(8, 8), classes=("a", "b", "c")):
    """A class per subfolder of 8x8 RGB PNGs: every pixel of class k's images is COLORS[k] + i (i: the index)."""
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        r, g, b = COLORS[name]
        for i in range(per_class):
            Image.new("RGB", size, (r + i, g + i, b + i)).save(root / name / f"{i}.png")
    return root


def test_image_folder_reads_classes_splits_and_pixels(tmp_path):
    d = ns.data.image_folder(write_image_folder(tmp_path / "imgs"), seed=0)
    assert d.num_classes == 3 and d.metric == "accuracy" and d.info["classes"] == ["a", "b", "c"]
    assert (len(d.train), len(d.val), len(d.test)) == (14, 2, 2)  # 10% each of 18, held out
    assert d.input_shape == (3, 8, 8) and d.train.x.dtype == torch.float32
    x = torch.cat([d.train.x, d.val.x, d.test.x])
    y = torch.cat([d.train.y, d.val.y, d.test.y])
    assert sorted(y.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    for xi, yi in zip(x, y, strict=True):  # every pixel is its class's colour + the image's index, scaled to [0, 1]
        i = round(float(xi[0, 0, 0]) * 255) - COLORS["abc"[yi]][0]
        assert 0 <= i < 6
        torch.testing.assert_close(xi[:, 3, 5] * 255, torch.tensor(COLORS["abc"[yi]], dtype=torch.float32) + i)
    assert torch.equal(ns.data.image_folder(tmp_path / "imgs", seed=0).test.x, d.test.x)  # the seed fixes the split
    assert not torch.equal(ns.data.image_folder(tmp_path / "imgs", seed=1).test.x, d.test.x)


def test_image_folder_resize_and_normalize(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    d = ns.data.image_folder(root, resize="4x6", normalize="imagenet")
    assert d.input_shape == (3, 4, 6)
    plain = ns.data.image_folder(root, resize=4)
    assert plain.input_shape == (3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    same = ns.data.image_folder(root, resize=4, normalize="imagenet")
    torch.testing.assert_close(same.train.x, (plain.train.x - mean[:, None, None]) / std[:, None, None])
    one = ns.data.image_folder(root, resize=4, normalize="0.5,0.25")
    torch.testing.assert_close(one.train.x, (plain.train.x - 0.5) / 0.25)
    auto = ns.data.image_folder(root, normalize="auto")
    m = auto.train.x.mean((0, 2, 3))
    torch.testing.assert_close(m, torch.zeros(3), atol=1e-5, rtol=0)


def test_image_folder_with_split_folders_maps_labels_by_class_name(tmp_path):
    write_image_folder(tmp_path / "d" / "train", per_class=5)
    write_image_folder(tmp_path / "d" / "test", per_class=2, classes=("b",))
    d = ns.data.image_folder(tmp_path / "d", seed=0)
    assert d.test.y.tolist() == [1, 1] and len(d.val) == 2 and len(d.train) == 13  # val: 10% of 17, from train
    write_image_folder(tmp_path / "e" / "train", per_class=2, classes=("a",))
    write_image_folder(tmp_path / "e" / "test", per_class=2, classes=("c",))
    with pytest.raises(DataError, match=r"has classes \['c'\] that train/ does not"):
        ns.data.image_folder(tmp_path / "e")


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda p: p / "missing", {}, "data directory does not exist: '.*missing'"),
    (lambda p: (p / "x").mkdir() or p / "x", {}, "no class subfolders in"),
    (lambda p: write_image_folder(p / "y") and (p / "y" / "d").mkdir() or p / "y", {},
     "class folder '.*d' holds no images"),
    (lambda p: write_image_folder(p / "z"), {"resize": "0x4"}, "resize must be a size N or HxW .*got '0x4'"),
    (lambda p: write_image_folder(p / "w"), {"normalize": "1,2,3"}, "normalize must be .*got '1,2,3'"),
])
def test_image_folder_errors_are_one_line(tmp_path, make, kwargs, message):
    with pytest.raises(DataError, match=message) as e:
        ns.data.image_folder(make(tmp_path), **kwargs)
    assert "\n" not in str(e.value)


def test_image_folder_needs_resize_for_mixed_sizes(tmp_path):
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs")
    Image.new("RGB", (9, 8)).save(root / "a" / "big.png")
    with pytest.raises(DataError, match="is 9x8 but the first image is 8x8; pass --resize"):
        ns.data.image_folder(root)
    assert ns.data.image_folder(root, resize=8).input_shape == (3, 8, 8)


def test_npz_arrays_with_and_without_val(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "a.npz"
    np.savez(f, x_train=rng.normal(size=(40, 5)), y_train=np.arange(40) % 4, x_test=np.ones((6, 5)),
             y_test=np.zeros(6, dtype=np.int32))
    d = ns.data.npz_arrays(f, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (36, 4, 6) and d.num_classes == 4
    assert d.train.x.dtype == torch.float32 and d.test.y.dtype == torch.int64 and d.input_shape == (5,)
    np.savez(f, x_train=np.zeros((10, 2)), y_train=np.zeros(10, int), x_val=np.ones((3, 2)), y_val=np.ones(3, int),
             x_test=np.zeros((2, 2)), y_test=np.full(2, 6))
    d = ns.data.npz_arrays(f)
    assert len(d.val) == 3 and d.val.x.sum() == 6 and d.num_classes == 7
    tok = tmp_path / "lm.npz"  # integer inputs and (N, T) targets: token data
    np.savez(tok, x_train=np.zeros((20, 4), np.int64), y_train=np.ones((20, 4), np.int64),
             x_test=np.zeros((2, 4), np.int64), y_test=np.ones((2, 4), np.int64))
    d = ns.data.npz_arrays(tok)
    assert d.metric == "perplexity" and d.train.x.dtype == torch.int64


def test_npz_errors_quote_the_problem(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, x_train=np.zeros((10, 2)), y_train=np.zeros(9, int), x_test=np.zeros((2, 2)), y_test=np.zeros(2))
    with pytest.raises(DataError, match="x_train holds 10 samples but y_train holds 9"):
        ns.data.npz_arrays(f)
    np.savez(f, x_train=np.zeros((10, 2)), y_train=np.zeros(10, int))
    with pytest.raises(DataError, match="lacks x_test, y_test"):
        ns.data.npz_arrays(f)
    with pytest.raises(DataError, match="file not found: '.*nope.npz'"):
        ns.data.npz_arrays(tmp_path / "nope.npz")


def test_token_bin_and_npy_make_next_token_sequences(tmp_path):
    ids = (np.arange(1000) % 300).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    d = ns.data.token_file(tmp_path / "t.bin", seq_len=10)
    assert d.metric == "perplexity" and d.num_classes == 300 and d.input_shape == (10,)
    assert d.info["tokens"] == {"train": 900, "val": 50, "test": 50}  # contiguous 90/5/5
    assert (len(d.train), len(d.val), len(d.test)) == (89, 4, 4)
    assert d.train.x[0].tolist() == list(range(10)) and d.train.y[0].tolist() == list(range(1, 11))
    assert d.train.x[1].tolist() == list(range(10, 20)) and d.test.x[0].tolist() == list(range(950 % 300, 960 % 300))
    ids.astype(np.int32).tofile(tmp_path / "t32.bin")
    d32 = ns.data.token_file(tmp_path / "t32.bin", seq_len=10, dtype="int32")
    assert torch.equal(d32.train.x, d.train.x)
    np.save(tmp_path / "t.npy", ids.astype(np.int64))
    assert torch.equal(ns.data.token_file(tmp_path / "t.npy", seq_len=10).val.y, d.val.y)


def test_token_file_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02\x00\x03\x00\x04")
    with pytest.raises(DataError, match="holds 7 bytes, not a multiple of 2 \\(uint16 ids\\)"):
        ns.data.token_file(tmp_path / "odd.bin")
    with pytest.raises(DataError, match="token dtype must be one of uint16, int32; got 'int8'"):
        ns.data.token_file(tmp_path / "odd.bin", dtype="int8")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match=r"seq_len must be an integer in \[1, 4\] \(the val split holds 5 tokens\); "
                                        "got 5"):
        ns.data.token_file(tmp_path / "t.bin", seq_len=5)
    with pytest.raises(DataError, match="seq_len must be .*got 0"):
        ns.data.token_file(tmp_path / "t.bin", seq_len=0)
    with pytest.raises(DataError, match=r"token ids must be in \[0, 50\); the data holds ids from 0 to 99"):
        ns.data.token_file(tmp_path / "t.bin", seq_len=2, vocab_size=50)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        ns.data.token_file(tmp_path / "empty.bin")


def test_text_file_is_bytes(tmp_path):
    text = "héllo wörld, " * 50
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    d = ns.data.text_file(tmp_path / "t.txt", seq_len=16)
    raw = text.encode()
    assert d.num_classes == 256 and d.metric == "perplexity" and sum(d.info["tokens"].values()) == len(raw)
    assert bytes(d.train.x[0].tolist()) == raw[:16] and bytes(d.train.y[0].tolist()) == raw[1:17]


def _fake_stdlib(root, n=60):
    for i in range(n):
        p = root / f"pkg{i % 3}" / f"m{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"x = {i}\n" * (i + 1))
    for skip in ("test/t.py", "pkg0/tests/t.py", "site-packages/s.py", "idlelib/idle_test/t.py"):
        (root / skip).parent.mkdir(parents=True, exist_ok=True)
        (root / skip).write_text("skipped\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_stdlib_corpus_split_by_file_with_hashes(tmp_path):
    from netsurgeon.data.text import _split_of

    root = _fake_stdlib(tmp_path / "lib")
    files = ns.data.stdlib_files(root)
    assert len(files) == 60 and [f for f, _ in files] == sorted(f for f, _ in files)
    assert all("test" not in f and "site-packages" not in f for f, _ in files)
    assert {s for _, s in files} == {"train", "val", "test"} and all(s == _split_of(f) for f, s in files)
    d = ns.data.stdlib_text(seq_len=4, root=root)
    whole = b"".join((root / f).read_bytes() for f, _ in files)
    assert d.info["sha256"] == hashlib.sha256(whole).hexdigest() and sum(d.info["bytes"].values()) == len(whole)
    test_bytes = b"".join((root / f).read_bytes() for f, s in files if s == "test")
    assert d.info["sha256_split"]["test"] == hashlib.sha256(test_bytes).hexdigest()
    assert bytes(d.test.x[0].tolist()) == test_bytes[:4] and d.info["files"]["test"] == sum(
        s == "test" for _, s in files)


def test_stdlib_files_of_this_python_leave_out_tests():
    files = ns.data.stdlib_files()
    assert len(files) > 100 and any(f == "json/decoder.py" for f, _ in files)
    assert not any({"test", "tests", "site-packages"} & set(f.split("/")[:-1]) for f, _ in files)


FACTORY = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

def _ds(n, offset=0):
    g = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 4, generator=g), (torch.arange(n) + offset) % 3)

def as_dict():
    return {"train": _ds(30), "test": _ds(10), "num_classes": 5, "name": "mine"}

def as_tuple():
    return _ds(30), _ds(5, 1), _ds(10)

def as_loaders():
    return {"train": DataLoader(_ds(30), batch_size=8), "val": _ds(5), "test": DataLoader(_ds(10), batch_size=4)}

def bad():
    return [1, 2]
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "userdata_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userdata_mod"


def test_factory_returns_datasets_or_loaders(factory_module):
    d = ns.data.from_factory(f"{factory_module}:as_dict", seed=0)
    assert isinstance(d, ns.data.Dataset) and d.name == "mine" and d.num_classes == 5
    assert (len(d.train), len(d.val), len(d.test)) == (27, 3, 10)  # val: 10% of train, held out
    t = ns.data.from_factory(f"{factory_module}:as_tuple")
    assert len(t.val) == 5 and t.val.y.tolist() == [1, 2, 0, 1, 2] and t.num_classes == 3
    ld = ns.data.from_factory(f"{factory_module}:as_loaders")
    assert isinstance(ld, ns.data.LoaderData) and len(ld.train) == 4 and ld.input_shape == (4,)
    assert sum(len(y) for _, y in ns.data.batches(ld.val)) == 5
    with pytest.raises(DataError, match="returned list; return \\(train, val, test\\)"):
        ns.data.from_factory(f"{factory_module}:bad")
    with pytest.raises(DataError, match="has no attribute 'nope'"):
        load_dataset(f"{factory_module}:nope")


def test_load_dataset_refuses_options_it_would_ignore_and_bad_metrics(tmp_path):
    with pytest.raises(DataError, match="data set 'digits' does not read --resize \\(got '4'\\)"):
        load_dataset("digits", resize="4")
    with pytest.raises(DataError, match="data set 'text' needs --data-file FILE"):
        load_dataset("text")
    with pytest.raises(ValueError, match="metric must be one of accuracy, perplexity; got 'bleu'"):
        load_dataset("digits", metric="bleu")
    d = load_dataset("digits", metric="perplexity")
    assert d.metric == "perplexity" and d.with_metric(None) is d and d.with_metric("accuracy").metric == "accuracy"
