"""The ``.nsz`` model file, version 1: every tensor stored dense or as a relative-index sparse stream.

Per tensor the writer picks the smaller of
* ``dense``: the raw values (float32 or float16), and
* ``sparse``: Deep Compression's relative indices (Han et al. 2016 Sec. 2) bit-packed at ``index_bits``
  bits plus the values (fillers included). ``index_bits="auto"`` tries 1..16 bits and keeps the smallest.

The size of a compressed model is ``os.path.getsize`` of this file, never a count of zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._validation import check_finite_model
from ..masks import effective_state_dict
from .bits import pack_bits, packed_size, unpack_bits
from .container import NszError, read_container, write_container
from .sparse import best_index_bits, decode_relative, encode_relative, relative_entries

__all__ = ["FORMAT_VERSION", "TensorRecord", "CompressedFile", "save_compressed",
           "read_compressed", "load_state_checked"]

FORMAT_VERSION = 1
_VALUE_DTYPES = {"float32": np.float32, "float16": np.float16}
_RAW_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor is stored. ``bytes`` counts its payload (index + value streams)."""

    name: str
    shape: tuple[int, ...]
    codec: str              # "dense" or "sparse"
    value_dtype: str
    index_bits: int         # 0 for dense
    numel: int
    nonzero: int
    entries: int            # stored values, fillers included (= numel for dense)
    bytes: int

    @property
    def kept(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class CompressedFile:
    """What :func:`save_compressed` wrote or :func:`read_compressed` read."""

    path: str
    file_bytes: int
    dense_bytes: int        # the same parameters as dense float32
    records: list[TensorRecord]
    header: dict[str, Any]

    @property
    def compression(self) -> float:
        return self.dense_bytes / self.file_bytes


def _encode(name: str, t: Tensor, value_dtype: str, index_bits: int | str) -> tuple[TensorRecord, dict]:
    arr = t.detach().cpu().contiguous().numpy().ravel()
    shape = tuple(t.shape)
    nz = int(np.count_nonzero(arr))
    if not t.is_floating_point():
        raw = arr.astype(_RAW_DTYPES["int64"])
        rec = TensorRecord(name, shape, "dense", "int64", 0, arr.size, nz, arr.size, raw.nbytes)
        return rec, {f"{name}/values": raw.tobytes()}
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        vals = arr.astype(_VALUE_DTYPES[value_dtype])
    if not np.isfinite(vals).all():
        raise ValueError(f"save_compressed: tensor {name!r} does not fit in {value_dtype} (overflow or NaN).")
    vbits = vals.itemsize * 8
    if index_bits == "auto":
        bits, sparse_bits = best_index_bits(vals, vbits)
    else:
        bits = int(index_bits)
        sparse_bits = relative_entries(np.flatnonzero(vals), bits) * (bits + vbits)
    if sparse_bits + 16 < vals.size * vbits:  # sparse streams pay two byte-roundings
        gaps, svals = encode_relative(vals, bits)
        idx = pack_bits(gaps, bits)
        rec = TensorRecord(name, shape, "sparse", value_dtype, bits, vals.size, nz, gaps.size,
                           len(idx) + svals.nbytes)
        return rec, {f"{name}/index": idx, f"{name}/values": svals.tobytes()}
    rec = TensorRecord(name, shape, "dense", value_dtype, 0, vals.size, nz, vals.size, vals.nbytes)
    return rec, {f"{name}/values": vals.tobytes()}


def save_compressed(model: nn.Module, path: str | os.PathLike[str], *, value_dtype: str = "float32",
                    index_bits: int | str = "auto", arch: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None) -> CompressedFile:
    """Write ``model`` (masks multiplied in) to a ``.nsz`` file atomically.

    Args:
        value_dtype: "float32" (lossless) or "float16".
        index_bits: gap width of the sparse streams, 1..16, or "auto" (smallest file, per tensor).
        arch: how to rebuild the model, e.g. ``{"name": "lenet5", "input_shape": [1, 28, 28],
            "num_classes": 10}``; defaults to what :func:`netsurgeon.models.build_model` recorded.
        meta: free-form JSON-serializable facts to keep (data set, accuracy, method).

    Raises:
        ValueError: NaN/inf weights, an unknown value dtype, index_bits out of range.
    """
    from ..models import arch_of

    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"save_compressed: value_dtype must be one of {list(_VALUE_DTYPES)}; got {value_dtype!r}.")
    if index_bits != "auto" and not (isinstance(index_bits, int) and 1 <= index_bits <= 16):
        raise ValueError(f"save_compressed: index_bits must be 'auto' or an int in [1, 16]; got {index_bits!r}.")
    check_finite_model("save_compressed", model)
    state = effective_state_dict(model)
    records, blobs = [], {}
    for name, t in state.items():
        rec, b = _encode(name, t, value_dtype, index_bits)
        records.append(rec)
        blobs.update(b)
    header = {"format": "netsurgeon.nsz", "version": FORMAT_VERSION, "arch": arch or arch_of(model),
              "meta": meta or {}, "tensors": [_record_to_json(r) for r in records]}
    size = write_container(path, header, blobs)
    dense = sum(r.numel * 4 for r in records)
    return CompressedFile(str(path), size, dense, records, header)


def _record_to_json(r: TensorRecord) -> dict[str, Any]:
    return {"name": r.name, "shape": list(r.shape), "codec": r.codec, "value_dtype": r.value_dtype,
            "index_bits": r.index_bits, "numel": r.numel, "nonzero": r.nonzero, "entries": r.entries,
            "bytes": r.bytes}


def _decode(p: Path, rec: TensorRecord, blobs: dict[str, bytes]) -> Tensor:
    dt = np.dtype(_RAW_DTYPES.get(rec.value_dtype, np.float32))
    vals_b = blobs.get(f"{rec.name}/values")
    if vals_b is None or len(vals_b) != rec.entries * dt.itemsize:
        raise NszError(f"{p}: tensor {rec.name!r}: value stream has the wrong length.")
    vals = np.frombuffer(vals_b, dtype=dt)
    if rec.codec == "dense":
        if rec.entries != rec.numel:
            raise NszError(f"{p}: tensor {rec.name!r}: dense stream of {rec.entries} for {rec.numel} entries.")
        flat = vals
    elif rec.codec == "sparse":
        idx_b = blobs.get(f"{rec.name}/index")
        if idx_b is None or len(idx_b) != packed_size(rec.entries, rec.index_bits):
            raise NszError(f"{p}: tensor {rec.name!r}: index stream has the wrong length.")
        try:
            flat = decode_relative(unpack_bits(idx_b, rec.entries, rec.index_bits), vals, rec.numel)
        except ValueError as e:
            raise NszError(f"{p}: tensor {rec.name!r}: {e}") from e
    else:
        raise NszError(f"{p}: tensor {rec.name!r}: unknown codec {rec.codec!r}.")
    out = torch.from_numpy(flat.copy()).reshape(rec.shape)
    return out.float() if out.is_floating_point() else out


def read_compressed(path: str | os.PathLike[str]) -> tuple[CompressedFile, dict[str, Tensor]]:
    """Read a ``.nsz`` file: its description and the decoded state dict (float tensors as float32).

    Raises:
        NszError: the file is missing, truncated, corrupt or of a newer format version.
    """
    p = Path(path)
    header, blobs = read_container(p)
    if header.get("format") != "netsurgeon.nsz":
        raise NszError(f"{p}: not a netsurgeon model file (format {header.get('format')!r}).")
    if header.get("version") != FORMAT_VERSION:
        raise NszError(f"{p}: format version {header.get('version')!r} is not supported "
                       f"(this netsurgeon reads version {FORMAT_VERSION}).")
    try:
        records = [TensorRecord(name=t["name"], shape=tuple(t["shape"]), codec=t["codec"],
                                value_dtype=t["value_dtype"], index_bits=t["index_bits"], numel=t["numel"],
                                nonzero=t["nonzero"], entries=t["entries"], bytes=t["bytes"])
                   for t in header["tensors"]]
    except (KeyError, TypeError) as e:
        raise NszError(f"{p}: malformed tensor table in the header ({e!r}).") from e
    state = {}
    for r in records:
        if int(np.prod(r.shape)) != r.numel:
            raise NszError(f"{p}: tensor {r.name!r}: shape {list(r.shape)} does not hold {r.numel} entries.")
        state[r.name] = _decode(p, r, blobs)
    info = CompressedFile(str(p), os.path.getsize(p), sum(r.numel * 4 for r in records), records, header)
    return info, state


def load_state_checked(model: nn.Module, state: dict[str, Tensor], source: str = "file") -> nn.Module:
    """Copy ``state`` into ``model`` after checking names and shapes; errors name each mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise NszError(f"{source}: tensors do not match the model: missing {missing}, unexpected {unexpected}.")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise NszError(f"{source}: tensor {k!r} has shape {list(v.shape)} in the file but "
                           f"{list(own[k].shape)} in the model.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model
