"""Data sets from local files: an IDX reader (MNIST, Fashion-MNIST) and scikit-learn's bundled digits.

Nothing here downloads. Splits are fixed by a seed; the validation split is carved out of the training
set and is the only split that threshold or hyper-parameter choices may look at.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._catalog import DATASETS

__all__ = ["DataError", "Dataset", "Split", "LoaderData", "from_loaders", "as_data", "batches", "read_idx", "mnist",
           "digits", "load_dataset", "DATASETS"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """A data file is missing, truncated or not what it claims to be."""


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits of one data set, plus what a model needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


@dataclass(frozen=True)
class LoaderData:
    """Splits given as any iterables of ``(x, y)`` batches, e.g. ``torch.utils.data.DataLoader``s.

    Everything that trains or gathers statistics (``ns.train``, fine-tuning stages, Fisher statistics,
    AutoPrune's validation batches) accepts this as well as a :class:`Dataset`. ``train`` needs ``len()``
    (batches per epoch). Resuming a run continues exactly only if the loader yields the same batches in
    the same order each epoch (``shuffle=False``, or a sampler seeded per epoch).
    """

    train: Iterable[Any]
    val: Iterable[Any] | None = None
    test: Iterable[Any] | None = None
    name: str = "loaders"
    num_classes: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        x, _ = next(iter(batches(self.train)))
        return tuple(x.shape[1:])


def from_loaders(train: Iterable[Any], val: Iterable[Any] | None = None, test: Iterable[Any] | None = None,
                 num_classes: int | None = None) -> LoaderData:
    """Wrap the user's own DataLoaders (or any iterables of ``(x, y)`` batches) as netsurgeon data."""
    try:
        len(train)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(f"from_loaders: the training loader must have a length (batches per epoch); got "
                        f"{type(train).__name__}.") from e
    return LoaderData(train, val, test, num_classes=num_classes)


def as_data(data: Any) -> Dataset | LoaderData:
    """A :class:`Dataset` or :class:`LoaderData` as is; a bare DataLoader (any iterable of ``(x, y)`` batches
    with a length) becomes the training split of a :class:`LoaderData`."""
    if isinstance(data, (Dataset, LoaderData)):
        return data
    if hasattr(data, "__iter__") and hasattr(data, "__len__"):
        return from_loaders(data)
    raise DataError(f"expected a netsurgeon Dataset, ns.data.from_loaders(...), or a DataLoader; got "
                    f"{type(data).__name__}.")


def batches(data: Split | Iterable[Any], batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` from a :class:`Split` (in order, ``batch_size`` at a time) or from any iterable of
    ``(x, y, ...)`` batches such as a DataLoader."""
    if isinstance(data, Split):
        for i in range(0, len(data), batch_size):
            yield data.x[i:i + batch_size], data.y[i:i + batch_size]
        return
    for b in data:
        if not isinstance(b, (tuple, list)) or len(b) < 2:
            raise DataError(f"a data loader must yield (inputs, labels) batches; got {type(b).__name__}.")
        yield b[0], b[1]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) and check its header against its length.

    Raises:
        DataError: the file is missing, not gzip/IDX, has a bad magic number, or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({e}).") from e
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: not a gzip file ({e}).") from e
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes).")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD).")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header.")
    dims = struct.unpack(">" + "I" * ndim, raw[4:head])
    dtype = np.dtype(_IDX_DTYPES[code])
    want = int(np.prod(dims)) * dtype.itemsize
    have = len(raw) - head
    if have != want:
        kind = "truncated" if have < want else "has trailing bytes"
        raise DataError(f"{path}: {kind}: header says {'x'.join(map(str, dims))} "
                        f"({want} bytes of data) but the file holds {have}.")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for cand in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (data_dir / cand).is_file():
            return data_dir / cand
    raise DataError(f"{data_dir}: no file {stem}.gz (expected the MNIST IDX layout: "
                    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...).")


def _split_off(x: Tensor, y: Tensor, n_hold: int, seed: int) -> tuple[Split, Split]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    hold, keep = perm[:n_hold].sort().values, perm[n_hold:].sort().values
    return Split(x[keep], y[keep]), Split(x[hold], y[hold])


def mnist(data_dir: str | os.PathLike[str], *, val_size: int = 5000, seed: int = 0,
          name: str = "mnist") -> Dataset:
    """Load MNIST (or any data set in its IDX layout) from ``data_dir``.

    Images are scaled to [0, 1] then standardized with the training set's mean and std. ``val_size``
    images are held out of the 60,000 training images (fixed by ``seed``); the 10,000 t10k images are
    the test split.
    """
    if data_dir is None or str(data_dir) == "":
        raise DataError(f"{name}: a data directory is required (pass --data-dir DIR).")
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{name}: data directory does not exist: {d}")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs = read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(d, f"{prefix}-labels-idx1-ubyte"))
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise DataError(f"{d}: {prefix} images {imgs.shape} and labels {labels.shape} do not match.")
        parts[split] = (torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)))
    xtr, ytr = parts["train"]
    if not 0 <= val_size < len(ytr):
        raise DataError(f"{name}: val_size must be in [0, {len(ytr)}); got {val_size}.")
    mean, std = xtr.mean(), xtr.std()
    train, val = _split_off((xtr - mean) / std, ytr, val_size, seed)
    xte, yte = parts["test"]
    return Dataset(name, train, val, Split((xte - mean) / std, yte), num_classes=10)


def digits(*, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, no files needed), split by ``seed``."""
    from sklearn.datasets import load_digits

    b = load_digits()
    x = torch.tensor(b.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(b.target, dtype=torch.int64)
    n = len(y)
    rest, test = _split_off(x, y, int(round(test_fraction * n)), seed)
    train, val = _split_off(rest.x, rest.y, int(round(val_fraction * n)), seed + 1)
    mean, std = train.x.mean(), train.x.std()

    def norm(s: Split) -> Split:
        return Split((s.x - mean) / std, s.y)

    return Dataset("digits", norm(train), norm(val), norm(test), num_classes=10)




def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Dataset:
    """Load a data set by name: ``digits`` (bundled) or ``mnist``/``fashion-mnist`` (needs ``data_dir``)."""
    if name == "digits":
        return digits(seed=seed)
    if name in ("mnist", "fashion-mnist"):
        if data_dir is None:
            raise DataError(f"data set {name!r} needs --data-dir DIR holding its IDX .gz files.")
        return mnist(data_dir, seed=seed, name=name)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
