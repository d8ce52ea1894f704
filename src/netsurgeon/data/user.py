"""The user's own data: arrays in an ``.npz`` file, or a factory function named ``package.module:factory``.

A factory is imported and called because the user named it (``--data pkg.module:factory`` or a direct call);
a factory named only inside a file (a model file's recorded data set) is the caller's to allow (the CLI asks
for ``--trust-code``), as for model factories.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import DataError, Dataset, LoaderData, Split, _split_off, check_metric

__all__ = ["npz_arrays", "from_factory"]


def _as_split(owner: str, label: str, x: Any, y: Any) -> Split:
    xt, yt = (v.detach().clone() if isinstance(v, Tensor) else torch.from_numpy(np.array(v)) for v in (x, y))
    if xt.dim() < 1 or len(xt) != len(yt):
        raise DataError(f"{owner}: x_{label} holds {len(xt) if xt.dim() else 0} samples but y_{label} holds "
                        f"{len(yt) if yt.dim() else 0}; they must match.")
    if yt.is_floating_point() or yt.dtype == torch.bool or yt.dim() not in (1, 2):
        raise DataError(f"{owner}: y_{label} must hold integer labels (N,) or next-token targets (N, T); got "
                        f"{yt.dtype} of shape {tuple(yt.shape)}.")
    if len(yt) == 0:
        raise DataError(f"{owner}: the {label} split is empty.")
    xt = xt.float() if xt.is_floating_point() or xt.dtype == torch.bool else xt.long()
    return Split(xt, yt.long())


def _finish(name: str, train: Split, val: Split | None, test: Split, seed: int, val_fraction: float,
            metric: str | None, num_classes: int | None, info: Mapping[str, Any]) -> Dataset:
    if val is None:
        n_hold = int(round(val_fraction * len(train)))
        if not 1 <= n_hold < len(train):
            raise DataError(f"{name}: the training split ({len(train)} samples) is too small to hold out a "
                            "validation split; give one.")
        train, val = _split_off(train.x, train.y, n_hold, seed)
    for label, s in (("val", val), ("test", test)):
        if s.x.shape[1:] != train.x.shape[1:] or s.y.shape[1:] != train.y.shape[1:]:
            raise DataError(f"{name}: the {label} samples have shape {tuple(s.x.shape[1:])} -> "
                            f"{tuple(s.y.shape[1:])} but the training ones {tuple(train.x.shape[1:])} -> "
                            f"{tuple(train.y.shape[1:])}.")
    classes = max(int(s.y.max()) for s in (train, val, test)) + 1 if num_classes is None else num_classes
    lm = train.y.dim() == 2
    return Dataset(name, train, val, test, num_classes=classes,
                   metric=check_metric(name, metric or ("perplexity" if lm else "accuracy")), info=dict(info))


def npz_arrays(path: str | os.PathLike[str], *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Arrays ``x_train, y_train, x_test, y_test`` (and optionally ``x_val, y_val``; else ``val_fraction`` of the
    training samples are held out with ``seed``) from an ``.npz`` file (``numpy.savez``), used as stored:
    float inputs become float32 (scale them yourself), integer inputs stay integer (token ids). Labels are
    integers (N,); targets (N, T) make it token data, judged by perplexity.

    Raises:
        DataError: missing file, missing or unpaired arrays, lengths that differ, non-integer labels.
    """
    if path is None or str(path) == "":
        raise DataError("npz: a file is required (pass --data-file FILE).")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz: file not found: {str(p)!r}.")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise DataError(f"npz: {str(p)!r} is not a readable .npz file ({e}).") from e
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(f"npz: {str(p)!r} lacks {', '.join(missing)} (it holds {held}).")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"npz: {str(p)!r} holds only one of x_val, y_val; give both or neither.")
    splits = {s: _as_split("npz", s, arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "val", "test")
              if f"x_{s}" in arrays}
    return _finish("npz", splits["train"], splits.get("val"), splits["test"], seed, val_fraction, None, None,
                   {"file": str(p)})


def _load_callable(path: str) -> Any:
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise DataError(f"a data factory must look like 'package.module:factory'; got {path!r}.")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise DataError(f"cannot import module {mod_name!r} of data factory {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"module {mod_name!r} has no attribute {attr!r} (data factory {path!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"data factory {path!r} is not callable.")
    return obj


def _materialize(owner: str, label: str, ds: Any) -> Split:
    """A map-style dataset of ``(x, y)`` samples read once into one Split."""
    if isinstance(ds, Split):
        return ds
    try:
        samples = [ds[i] for i in range(len(ds))]
    except Exception as e:  # noqa: BLE001 - the user's dataset may raise anything
        raise DataError(f"{owner}: reading the {label} dataset failed: {e}") from e
    if not samples or any(not isinstance(s, (tuple, list)) or len(s) < 2 for s in samples[:1]):
        raise DataError(f"{owner}: the {label} dataset must hold (input, label) samples; got "
                        f"{type(samples[0]).__name__ if samples else 'no samples'}.")
    x = torch.stack([torch.as_tensor(s[0]) for s in samples])
    y = torch.stack([torch.as_tensor(s[1]) for s in samples])
    return _as_split(owner, label, x, y)


def _is_loader(obj: Any) -> bool:
    """A DataLoader or another iterable of batches (not a map-style dataset of samples, not a Split)."""
    return (isinstance(obj, torch.utils.data.DataLoader)
            or (hasattr(obj, "__iter__") and not isinstance(obj, (Split, torch.utils.data.Dataset, Tensor))))


def from_factory(path: str, *, seed: int = 0, val_fraction: float = 0.1) -> Dataset | LoaderData:
    """Import ``package.module:factory``, call it with no arguments and turn what it returns into data.

    The factory returns a netsurgeon ``Dataset``/``LoaderData``, a tuple ``(train, val, test)`` (``val`` may be
    None) or a dict with keys ``train``, ``test``, optionally ``val``, ``num_classes``, ``metric`` and ``name``.
    Each split is either

    * a map-style ``torch.utils.data.Dataset`` of ``(x, y)`` samples (or a :class:`Split`): read into memory
      once, so batches follow netsurgeon's seeded, resumable order and ``batch_size``; a missing ``val`` is
      ``val_fraction`` of train, held out with ``seed``; or
    * a ``DataLoader`` (any iterable of ``(x, y)`` batches; the training one with a ``len``): used as is (see
      :class:`~netsurgeon.data.LoaderData`); a missing ``val`` stays missing.

    Raises:
        DataError: unimportable path, or a return value of another shape (named).
    """
    got = _load_callable(path)()
    if isinstance(got, (Dataset, LoaderData)):
        return got
    extra: dict[str, Any] = {}
    if isinstance(got, Mapping):
        unknown = sorted(set(got) - {"train", "val", "test", "num_classes", "metric", "name"})
        if unknown or "train" not in got or "test" not in got:
            raise DataError(f"data factory {path!r} returned a dict with keys {sorted(got)}; it needs train and "
                            "test, and may have val, num_classes, metric, name.")
        train, val, test = got["train"], got.get("val"), got["test"]
        extra = {k: got[k] for k in ("num_classes", "metric", "name") if k in got}
    elif isinstance(got, (tuple, list)) and len(got) == 3:
        train, val, test = got
    else:
        raise DataError(f"data factory {path!r} returned {type(got).__name__}; return (train, val, test), a dict "
                        "{'train': ..., 'val': ..., 'test': ...}, or a netsurgeon Dataset.")
    name = str(extra.get("name", path))
    metric = extra.get("metric")
    if _is_loader(train):
        def loader(s: Any) -> Any:
            return s if s is None or _is_loader(s) else torch.utils.data.DataLoader(s, batch_size=256)

        from .core import from_loaders

        return from_loaders(train, loader(val), loader(test), num_classes=extra.get("num_classes"),
                            metric=metric or "accuracy", name=name)
    splits = [None if s is None else _materialize(f"data factory {path!r}", lbl, s)
              for lbl, s in (("train", train), ("val", val), ("test", test))]
    if splits[2] is None:
        raise DataError(f"data factory {path!r} returned no test split.")
    return _finish(name, splits[0], splits[1], splits[2], seed, val_fraction, metric,  # type: ignore[arg-type]
                   extra.get("num_classes"), {"factory": path})
