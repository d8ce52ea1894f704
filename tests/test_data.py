import gzip

import numpy as np
import pytest
import torch

import netsurgeon as ns
from conftest import write_idx
from netsurgeon.data import DataError, read_idx


def test_read_idx_returns_exact_array(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", a))
    assert got.shape == (2, 3, 4)
    assert np.array_equal(got, a)


def test_read_idx_uncompressed(tmp_path):
    p = tmp_path / "labels-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03" + bytes([7, 8, 9]))
    assert read_idx(p).tolist() == [7, 8, 9]


def test_read_idx_rejects_truncated(tmp_path):
    p = tmp_path / "t.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x0a\x00\x00\x00\x1c\x00\x00\x00\x1c" + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated: header says 10x28x28"):
        read_idx(p)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    good = write_idx(tmp_path / "g.gz", np.zeros((100, 28, 28)))
    bad = tmp_path / "b.gz"
    bad.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        read_idx(bad)


def test_read_idx_rejects_bad_magic_and_non_gzip(tmp_path):
    p = tmp_path / "m.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(p)
    q = tmp_path / "n.gz"
    q.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="not a gzip file"):
        read_idx(q)


def test_read_idx_rejects_trailing_bytes_and_missing(tmp_path):
    p = tmp_path / "l"
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x02" + bytes([1, 2, 3]))
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(p)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz")


def test_mnist_layout_splits_and_normalization(fake_mnist):
    d = ns.data.mnist(fake_mnist, val_size=10, seed=3)
    assert (len(d.train), len(d.val), len(d.test)) == (40, 10, 20)
    assert d.input_shape == (1, 28, 28)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    allx = torch.cat([d.train.x, d.val.x])
    assert abs(float(allx.mean())) < 1e-5 and abs(float(allx.std()) - 1) < 1e-5
    again = ns.data.mnist(fake_mnist, val_size=10, seed=3)
    assert torch.equal(again.val.x, d.val.x)  # fixed by the seed
    other = ns.data.mnist(fake_mnist, val_size=10, seed=4)
    assert not torch.equal(other.val.y, d.val.y) or not torch.equal(other.val.x, d.val.x)


def test_mnist_errors_name_the_problem(tmp_path, fake_mnist):
    with pytest.raises(DataError, match="does not exist"):
        ns.data.mnist(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no file train-images-idx3-ubyte.gz"):
        ns.data.mnist(empty)
    with pytest.raises(DataError, match="needs --data-dir"):
        ns.load_dataset("mnist", None)
    with pytest.raises(DataError, match="unknown data set"):
        ns.load_dataset("cifar", None)
    with pytest.raises(DataError, match="val_size"):
        ns.data.mnist(fake_mnist, val_size=50)


def test_mnist_label_image_count_mismatch(fake_mnist):
    write_idx(fake_mnist / "t10k-labels-idx1-ubyte.gz", np.arange(19) % 10)
    with pytest.raises(DataError, match="do not match"):
        ns.data.mnist(fake_mnist, val_size=10)


def test_digits_splits_are_disjoint_and_sized(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1258, 180, 359)
    assert digits.input_shape == (1, 8, 8)
    rows = {tuple(x.flatten().tolist()) for s in (digits.train, digits.val, digits.test) for x in s.x}
    assert len(rows) > 1700  # (a few digits images are exact duplicates in the source)


@pytest.mark.mnist
def test_real_mnist(mnist_dir):
    d = ns.data.mnist(mnist_dir)
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert torch.bincount(d.test.y).tolist()[:3] == [980, 1135, 1032]


@pytest.mark.mnist
def test_lenet300_learns_real_mnist_in_one_epoch(mnist_dir):
    d = ns.data.mnist(mnist_dir)
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    ns.train(m, d, ns.TrainConfig(epochs=1, lr=0.05, max_steps=400))
    assert ns.evaluate(m, d.test)[1] > 0.94
