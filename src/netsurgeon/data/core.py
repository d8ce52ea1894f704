"""Data sets from local files and the user's own code, as train / validation / test splits.

Built in: MNIST-style IDX files, scikit-learn's bundled digits and the CPython standard library's source as text
(:func:`stdlib_text`). The user's: an image folder (:func:`image_folder`), ``.npz`` arrays (:func:`npz_arrays`),
token ids or text for language models (:func:`token_file`, :func:`text_file`), and any ``pkg.module:factory``
returning datasets or DataLoaders (:func:`from_factory`). :func:`load_dataset` picks one by name (the CLI's
``--data``); docs/data.md describes each.

Nothing here downloads. Splits are fixed by a seed (or by the files); the validation split is carved out of the
training set and is the only split that threshold or hyper-parameter choices may look at. Each data set carries
the metric a model on it is judged by (``accuracy``, or ``perplexity`` for token data).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._catalog import DATASETS, METRICS
from ..devices import active_device, to_device

__all__ = ["DataError", "Dataset", "Split", "LoaderData", "from_loaders", "as_data", "batches", "read_idx", "mnist",
           "digits", "DATASETS", "METRICS", "check_metric", "sample_batch"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """A data file is missing, truncated or not what it claims to be."""


def check_metric(owner: str, metric: object) -> str:
    """Return ``metric`` if it is one of :data:`METRICS`, else raise ValueError quoting it."""
    if metric not in METRICS:
        raise ValueError(f"{owner}: metric must be one of {', '.join(METRICS)}; got {metric!r}.")
    return str(metric)


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N, ...) and targets ``y``: class labels (N,) int64, or for token data (N, T) int64, the next
    token after each of the T input tokens of ``x`` (N, T) int64. Images are (N, C, H, W) float32."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """The same split with its tensors on ``device`` (itself when they are there already)."""
        return self if self.x.device == torch.device(device) else Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits of one data set, plus what a model needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int  # classes, or the vocabulary size of token data
    metric: str = "accuracy"  # what a model on it is judged by (see METRICS)
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)  # provenance: files, sizes, hashes

    def __post_init__(self) -> None:
        check_metric(self.name, self.metric)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """The same data set with every split's tensors on ``device`` (moved once, before a run)."""
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def with_metric(self, metric: str | None) -> Dataset:
        """The same splits judged by ``metric`` (None: unchanged)."""
        return self if metric is None else replace(self, metric=check_metric(self.name, metric))


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
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        check_metric(self.name, self.metric)

    @property
    def input_shape(self) -> tuple[int, ...]:
        x, _ = next(iter(batches(self.train)))
        return tuple(x.shape[1:])

    def with_metric(self, metric: str | None) -> LoaderData:
        """The same loaders judged by ``metric`` (None: unchanged)."""
        return self if metric is None else replace(self, metric=check_metric(self.name, metric))


def from_loaders(train: Iterable[Any], val: Iterable[Any] | None = None, test: Iterable[Any] | None = None,
                 num_classes: int | None = None, metric: str = "accuracy", name: str = "loaders") -> LoaderData:
    """Wrap the user's own DataLoaders (or any iterables of ``(x, y)`` batches) as netsurgeon data.

    ``metric``: ``accuracy``, or ``perplexity`` for a language model (batches of (B, T) token ids and (B, T)
    next-token targets)."""
    try:
        len(train)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(f"from_loaders: the training loader must have a length (batches per epoch); got "
                        f"{type(train).__name__}.") from e
    return LoaderData(train, val, test, name=name, num_classes=num_classes, metric=check_metric("from_loaders", metric))


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
    ``(x, y, ...)`` batches such as a DataLoader; inside :func:`netsurgeon.devices.running_on` on that device."""
    device = active_device()
    if isinstance(data, Split):
        for i in range(0, len(data), batch_size):
            yield to_device((data.x[i:i + batch_size], data.y[i:i + batch_size]), device)
        return
    for b in data:
        if not isinstance(b, (tuple, list)) or len(b) < 2:
            raise DataError(f"a data loader must yield (inputs, labels) batches; got {type(b).__name__}.")
        yield to_device(b[0], device), to_device(b[1], device)


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


def sample_batch(data: Dataset | LoaderData, n: int = 2) -> tuple[Tensor, Tensor]:
    """The first ``n`` training samples ``(x, y)`` (fewer if the first batch is smaller): real inputs of the right
    shape and dtype, for probing a model before long work."""
    if isinstance(data.train, Split):
        return data.train.x[:n], data.train.y[:n]
    x, y = next(iter(batches(data.train)))
    return x[:n], y[:n]


