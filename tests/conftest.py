import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import netsurgeon as ns

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def digits() -> ns.data.Dataset:
    return ns.data.digits(seed=0)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST IDX directory: $NETSURGEON_MNIST_DIR, else ../shared/data/mnist beside the repo; skip if absent."""
    d = Path(os.environ.get("NETSURGEON_MNIST_DIR", REPO.parent / "shared" / "data" / "mnist"))
    if not (d / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {d}")
    return d


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08) -> Path:
    """Write ``arr`` as a gzip IDX file (uint8 data)."""
    head = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """A tiny data set in MNIST's file layout: 50 train and 20 test images of 28x28."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path
