"""Token data for language models: a file of token ids, any file read as bytes, and the CPython standard
library's own source as a fixed, reproducible corpus.

A token stream of L tokens becomes ``(L - 1) // T`` non-overlapping sequences of ``T = seq_len`` tokens: input
``x[i] = t[iT : iT + T]`` and next-token targets ``y[i] = t[iT + 1 : iT + T + 1]``, both (N, T) int64 views of one
tensor (no copy). A single stream is split in order: the first 90% of the tokens train, the next 5% validate,
the last 5% test (contiguous blocks: no test sequence is a neighbour of a training one). Data sets made here are
judged by perplexity, exp(mean next-token cross-entropy).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .core import DataError, Dataset, Split

__all__ = ["tokens_dataset", "token_file", "text_file", "stdlib_files", "stdlib_text", "TOKEN_DTYPES",
           "STDLIB_EXCLUDED_DIRS"]

TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}  # raw .bin files: little-endian
# directories of the standard library left out of the corpus: tests (and their data files), third-party packages
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_SPLITS = ("train", "val", "test")


def _sequences(t: Tensor, seq_len: int) -> Split:
    n = (len(t) - 1) // seq_len
    return Split(t[:n * seq_len].view(n, seq_len), t[1:n * seq_len + 1].view(n, seq_len))  # (N, T) views


def tokens_dataset(train: Tensor | np.ndarray, val: Tensor | np.ndarray, test: Tensor | np.ndarray, *,
                   seq_len: int = 128, vocab_size: int | None = None, name: str = "tokens",
                   info: dict[str, object] | None = None) -> Dataset:
    """Three 1-D token streams as a :class:`~netsurgeon.data.Dataset` of (N, ``seq_len``) sequences with
    next-token targets, judged by perplexity.

    Args:
        train, val, test: token ids, any integer dtype, each at least ``seq_len + 1`` long.
        seq_len: tokens per sequence (the model's context).
        vocab_size: number of distinct ids (``num_classes``); default: the largest id + 1.

    Raises:
        DataError: ``seq_len`` out of range for the shortest split (quoted), negative ids or ids >= vocab_size.
    """
    streams = {}
    for label, s in zip(_SPLITS, (train, val, test), strict=True):
        a = s.numpy() if isinstance(s, Tensor) else np.asarray(s)
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise DataError(f"{name}: the {label} tokens must be a 1-D integer array; got {a.dtype} of shape "
                            f"{a.shape}.")
        streams[label] = torch.from_numpy(np.array(a, dtype=np.int64))  # a writable int64 copy
    shortest = min(streams, key=lambda k: len(streams[k]))
    most = len(streams[shortest]) - 1
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= most:
        raise DataError(f"{name}: seq_len must be an integer in [1, {max(most, 1)}] (the {shortest} split holds "
                        f"{most + 1} tokens); got {seq_len!r}.")
    lo = min(int(t.min()) for t in streams.values())
    hi = max(int(t.max()) for t in streams.values())
    vocab = hi + 1 if vocab_size is None else vocab_size
    if lo < 0 or hi >= vocab:
        raise DataError(f"{name}: token ids must be in [0, {vocab}); the data holds ids from {lo} to {hi}.")
    return Dataset(name, *(_sequences(streams[k], seq_len) for k in _SPLITS), num_classes=vocab,
                   metric="perplexity", info={**(info or {}), "seq_len": seq_len,
                                              "tokens": {k: len(v) for k, v in streams.items()}})


def _split_stream(t: np.ndarray, fractions: Sequence[float]) -> list[np.ndarray]:
    n = len(t)
    n_val, n_test = (int(round(f * n)) for f in fractions)
    return [t[:n - n_val - n_test], t[n - n_val - n_test:n - n_test], t[n - n_test:]]


def _existing_file(owner: str, path: str | os.PathLike[str] | None) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{owner}: a file is required (pass --data-file FILE).")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{owner}: file not found: {str(p)!r}.")
    if p.stat().st_size == 0:
        raise DataError(f"{owner}: file {str(p)!r} is empty.")
    return p


def token_file(path: str | os.PathLike[str], *, seq_len: int = 128, dtype: str | None = None,
               vocab_size: int | None = None, val_fraction: float = 0.05, test_fraction: float = 0.05) -> Dataset:
    """A file of token ids: ``.npy`` (a 1-D integer array) or raw little-endian ids (``.bin``, nanoGPT's layout;
    ``dtype`` ``uint16``, the default, or ``int32``), split in order into train / val / test.

    Raises:
        DataError: missing or empty file, a size that is not a multiple of the dtype's, an unknown dtype, a
            ``.npy`` that is not 1-D integers, or ``seq_len`` out of range.
    """
    p = _existing_file("tokens", path)
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"tokens: {str(p)!r} is not a readable .npy file ({e}).") from e
        if dtype is not None:
            raise DataError(f"tokens: a .npy file records its own dtype ({arr.dtype} in {str(p)!r}); drop "
                            f"--token-dtype (got {dtype!r}).")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"tokens: {str(p)!r} must hold a 1-D integer array; got {arr.dtype} of shape {arr.shape}.")
    else:
        name = "uint16" if dtype is None else dtype
        if name not in TOKEN_DTYPES:
            raise DataError(f"tokens: token dtype must be one of {', '.join(TOKEN_DTYPES)}; got {dtype!r}.")
        size, item = p.stat().st_size, TOKEN_DTYPES[name].itemsize
        if size % item:
            raise DataError(f"tokens: {str(p)!r} holds {size} bytes, not a multiple of {item} ({name} ids); "
                            "is --token-dtype right?")
        arr = np.fromfile(p, dtype=TOKEN_DTYPES[name])
    parts = _split_stream(arr, (val_fraction, test_fraction))
    return tokens_dataset(*parts, seq_len=seq_len, vocab_size=vocab_size, name="tokens",
                          info={"file": str(p), "split": "contiguous 90/5/5 %"})


def text_file(path: str | os.PathLike[str], *, seq_len: int = 128, val_fraction: float = 0.05,
              test_fraction: float = 0.05) -> Dataset:
    """Any file read as bytes, each byte a token (vocabulary 256: a byte-level tokenizer, no training, no
    unknown symbols), split in order into train / val / test."""
    p = _existing_file("text", path)
    parts = _split_stream(np.frombuffer(p.read_bytes(), dtype=np.uint8), (val_fraction, test_fraction))
    return tokens_dataset(*parts, seq_len=seq_len, vocab_size=256, name="text",
                          info={"file": str(p), "split": "contiguous 90/5/5 %"})


def _split_of(relpath: str) -> str:
    """A file's split from the SHA-256 of its path: 1 in 20 val, 1 in 20 test. A file keeps its split when
    files are added or removed (another Python version), so the held-out files stay held out."""
    bucket = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "big") % 20
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """The corpus's files as ``(path relative to root, split)``, sorted by path: every ``.py`` file under the
    standard library (``sysconfig.get_paths()["stdlib"]`` unless ``root`` is given), except under directories
    named in :data:`STDLIB_EXCLUDED_DIRS` (tests, site-packages)."""
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not base.is_dir():
        raise DataError(f"stdlib: the standard library directory does not exist: {str(base)!r}.")
    rel = []
    for d, subdirs, names in os.walk(base):
        subdirs[:] = [s for s in subdirs if s not in STDLIB_EXCLUDED_DIRS]  # not entered at all
        rel += [(Path(d) / n).relative_to(base).as_posix() for n in names
                if n.endswith(".py") and (Path(d) / n).is_file()]
    return [(r, _split_of(r)) for r in sorted(rel)]


def stdlib_text(*, seq_len: int = 128, root: str | os.PathLike[str] | None = None) -> Dataset:
    """The CPython standard library's own source as byte-level token data, split by file (see
    :func:`stdlib_files`): each split is its files' bytes concatenated in path order.

    ``info`` records what a run elsewhere needs to know whether it saw the same text: the Python version, the
    files and bytes per split, and the SHA-256 of the whole corpus (all files' bytes concatenated in path order)
    and of each split.
    """
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = stdlib_files(base)
    whole = hashlib.sha256()
    chunks: dict[str, list[bytes]] = {k: [] for k in _SPLITS}
    for rel, split in files:
        b = (base / rel).read_bytes()
        whole.update(b)
        chunks[split].append(b)
    joined = {k: b"".join(v) for k, v in chunks.items()}
    info = {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "root": str(base), "excluded_dirs": sorted(STDLIB_EXCLUDED_DIRS),
            "split_rule": "sha256(relative path) mod 20: 0 val, 1 test, else train",
            "files": {k: len(v) for k, v in chunks.items()}, "bytes": {k: len(v) for k, v in joined.items()},
            "sha256": whole.hexdigest(), "sha256_split": {k: hashlib.sha256(v).hexdigest() for k, v in joined.items()}}
    if not all(joined.values()):
        raise DataError(f"stdlib: a split holds no files under {str(base)!r} ({info['files']}).")
    return tokens_dataset(*(np.frombuffer(joined[k], dtype=np.uint8) for k in _SPLITS), seq_len=seq_len,
                          vocab_size=256, name="stdlib", info=info)
