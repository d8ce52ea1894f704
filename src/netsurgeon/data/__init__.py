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

import os

from .._catalog import DATASETS, METRICS
from .core import (
    DataError,
    Dataset,
    LoaderData,
    Split,
    as_data,
    batches,
    check_metric,
    digits,
    from_loaders,
    mnist,
    read_idx,
    sample_batch,
)
from .images import image_folder
from .text import stdlib_files, stdlib_text, text_file, token_file, tokens_dataset
from .user import from_factory, npz_arrays

__all__ = ["DataError", "Dataset", "Split", "LoaderData", "from_loaders", "as_data", "batches", "read_idx", "mnist",
           "digits", "load_dataset", "DATASETS", "METRICS", "check_metric", "image_folder", "npz_arrays",
           "from_factory", "token_file", "text_file", "tokens_dataset", "stdlib_text", "stdlib_files", "sample_batch"]

# which options each built-in data set reads: any other given option is an error, never silently ignored
_TAKES: dict[str, tuple[str, ...]] = {
    "digits": (), "mnist": ("data_dir",), "fashion-mnist": ("data_dir",), "stdlib": ("seq_len",),
    "imagefolder": ("data_dir", "resize", "normalize"), "npz": ("data_file",),
    "tokens": ("data_file", "seq_len", "token_dtype"), "text": ("data_file", "seq_len"),
}
_FLAGS = {"data_dir": "--data-dir", "data_file": "--data-file", "resize": "--resize", "normalize": "--normalize",
          "seq_len": "--seq-len", "token_dtype": "--token-dtype"}


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
                 data_file: str | os.PathLike[str] | None = None, seq_len: int | None = None,
                 resize: str | int | tuple[int, int] | None = None, normalize: str | None = None,
                 token_dtype: str | None = None, metric: str | None = None) -> Dataset | LoaderData:
    """Load a data set by name (the CLI's ``--data``), judged by ``metric`` (default: the data set's own).

    ``digits`` (bundled); ``mnist``/``fashion-mnist`` (IDX files in ``data_dir``); ``imagefolder`` (``data_dir``,
    ``resize``, ``normalize``: :func:`image_folder`); ``npz`` (``data_file``: :func:`npz_arrays`); ``tokens``
    (``data_file`` .npy/.bin of token ids, ``token_dtype``, ``seq_len``: :func:`token_file`); ``text``
    (``data_file``, bytes as tokens: :func:`text_file`); ``stdlib`` (the CPython standard library's source:
    :func:`stdlib_text`); or ``"pkg.module:factory"``, the user's code (:func:`from_factory`). ``seq_len``
    defaults to 128.

    Raises:
        DataError: unknown name, a missing file or directory, or an option the data set does not read.
    """
    given = {"data_dir": data_dir, "data_file": data_file, "seq_len": seq_len, "resize": resize,
             "normalize": normalize, "token_dtype": token_dtype}
    if metric is not None:
        check_metric("--metric", metric)
    takes = () if ":" in name else _TAKES.get(name)
    if takes is None:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or give your own as "
                        "'package.module:factory'.")
    extra = [k for k, v in given.items() if v is not None and k not in takes]
    if extra:
        what = f"data set {name!r}" if ":" not in name else f"data factory {name!r}"
        raise DataError(f"{what} does not read {_FLAGS[extra[0]]} (got {str(given[extra[0]])!r}); it reads "
                        f"{', '.join(_FLAGS[k] for k in takes) or 'no options'}.")
    for k in ("data_dir", "data_file"):
        if k in takes and given[k] is None:
            what = "DIR holding its IDX .gz files" if "mnist" in name else "DIR" if k == "data_dir" else "FILE"
            raise DataError(f"data set {name!r} needs {_FLAGS[k]} {what}.")
    seq = 128 if seq_len is None else seq_len
    data: Dataset | LoaderData
    if ":" in name:
        from .user import from_factory

        data = from_factory(name, seed=seed)
    elif name == "digits":
        data = digits(seed=seed)
    elif name in ("mnist", "fashion-mnist"):
        data = mnist(data_dir, seed=seed, name=name)  # type: ignore[arg-type]
    elif name == "imagefolder":
        from .images import image_folder

        data = image_folder(data_dir, resize=resize, normalize=normalize, seed=seed)  # type: ignore[arg-type]
    elif name == "npz":
        from .user import npz_arrays

        data = npz_arrays(data_file, seed=seed)  # type: ignore[arg-type]
    elif name == "tokens":
        from .text import token_file

        data = token_file(data_file, seq_len=seq, dtype=token_dtype)  # type: ignore[arg-type]
    elif name == "text":
        from .text import text_file

        data = text_file(data_file, seq_len=seq)  # type: ignore[arg-type]
    else:
        from .text import stdlib_text

        data = stdlib_text(seq_len=seq)
    return data.with_metric(metric)
