"""Argument checks shared by every method, with messages that name owner, parameter and value."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from torch import nn


def check_fraction(owner: str, name: str, value: object, *, closed_right: bool = False) -> float:
    """Return ``value`` as a float in [0, 1) (or [0, 1] with ``closed_right``), else raise ValueError."""
    hi = "1]" if closed_right else "1)"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = 0.0 <= float(value) <= 1.0 if closed_right else 0.0 <= float(value) < 1.0
    if not ok:
        raise ValueError(f"{owner}: {name} must be a number in [0, {hi}; got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_positive(owner: str, name: str, value: object, *, integer: bool = False) -> float:
    """Return ``value`` if it is a finite number > 0 (an int when ``integer``), else raise ValueError."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{owner}: {name} must be {what}; got {value!r}.")
    return value


def check_finite_model(owner: str, model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer that holds NaN or inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{owner}: tensor {name!r} holds {bad} NaN/inf value(s); refusing to continue.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish(tmp: str, path: Path) -> None:
    """Give the temporary file the mode a plain ``open()`` would (0666 minus the umask; mkstemp makes it 0600),
    flush it to disk, rename it over ``path`` and flush the directory entry."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or exception leaves no half-written file: either the old file or the new one exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _finish(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` (for APIs that take a path, e.g. torch.save) and rename atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _finish(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


@contextmanager
def _suppress() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass
