"""The ``.nsz`` model file: every tensor in the storage form that holds it, written and read through the form
registry (``netsurgeon.forms``).

A tensor held by a form's parametrization (k-means codebook, int8, binary, hashed, pq, ...) is written by that
form; a plain (possibly masked) tensor is written by whichever plain form is smallest: ``dense`` raw values, or
``sparse`` relative indices (Han et al. 2016, Sec. 2; ``index_bits="auto"`` tries 1..16 bits). The header
(zlib-compressed since version 2) carries the architecture record and metadata; every record is validated
against its form's schema before anything is decoded (``coding.schema``; docs/design.md "The .nsz reader under
attack"). Version 1 files still load. The size of a compressed model is ``os.path.getsize`` of this file, never a
count of zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_finite_model
from .coding.container import NszError, read_container, write_container
from .coding.schema import TensorRecord, max_elements_for, parse_records
from .forms import EncodeOptions, forms, stored_parametrization
from .masks import effective_state_dict, layer_kind

__all__ = ["FORMAT_VERSION", "TensorRecord", "CompressedFile", "save_compressed", "read_header", "decode_state",
           "check_state_shapes", "read_compressed", "load_state_checked", "encode_tensor", "tensor_shapes"]

FORMAT_VERSION = 2
_READABLE = (1, 2)
_VALUE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class CompressedFile:
    """What :func:`save_compressed` wrote or :func:`read_header` read."""

    path: str
    file_bytes: int
    dense_bytes: int        # the model before compression as dense float32 (stats.dense_bytes)
    records: list[TensorRecord]
    header: dict[str, Any]
    blobs: dict[str, bytes] | None = None

    @property
    def compression(self) -> float:
        return self.dense_bytes / self.file_bytes

    def where(self, rec: TensorRecord) -> str:
        return f"{self.path}: tensor {rec.name!r}"


def _bits_for(model: nn.Module, fqn: str, index_bits: int | str | Mapping[str, int | str]) -> int | str:
    """The index width of tensor ``fqn``: one value, or from a mapping by tensor name, layer name, then the
    layer's type ("conv" or "fc"); "auto" where the mapping says nothing (e.g. BatchNorm buffers)."""
    if not isinstance(index_bits, Mapping):
        return index_bits
    layer = fqn.rpartition(".")[0]
    for key in (fqn, layer):
        if key in index_bits:
            return index_bits[key]
    try:
        module = model.get_submodule(layer.split(".parametrizations")[0]) if layer else model
    except AttributeError:
        return "auto"
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return index_bits.get(layer_kind(module), "auto")
    return "auto"


def _aliases(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{name: earlier name}`` for every tensor of ``state`` that is the very same storage as an earlier one (a
    weight two modules share, e.g. GPT-2's ``lm_head`` and token embedding): the file stores it once."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], Any], str] = {}
    out = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            out[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return out


def _check_aliases(p: str, header: dict[str, Any], records: list[TensorRecord]) -> dict[str, str]:
    """The header's aliases, checked: each names a stored tensor (not another alias) under a new name."""
    aliases = header.get("aliases", {})
    names = {r.name for r in records}
    if not isinstance(aliases, dict) or len(aliases) > len(names) or not all(
            isinstance(k, str) and isinstance(v, str) and k not in names and v in names and 0 < len(k) <= 512
            for k, v in aliases.items()):
        raise NszError(f"{p}: the header's 'aliases' must map new tensor names to stored tensors.")
    return aliases


def encode_tensor(model: nn.Module, name: str, value: Tensor, opts: EncodeOptions
                  ) -> tuple[TensorRecord, dict[str, bytes]]:
    """The record and blobs of tensor ``name`` of ``model`` (``value``: its effective dense value): by the form
    whose parametrization holds it or a form that is its ``alternative_to`` (the smaller record), else by the
    smallest plain form (ties: the form's ``preference``)."""
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    form, par = stored_parametrization(module, attr)
    if form is not None:
        original = module.parametrizations[attr].original
        out = form.encode(name, value, par, opts, original)
        if out is None:
            raise ValueError(f"save_compressed: the {form.codec} form could not encode tensor {name!r}.")
        alts = [c for f in forms().values() if form.codec in f.alternative_to
                and (c := f.encode(name, value, par, opts, original)) is not None]
        return min([out, *alts], key=lambda c: c[0].bytes)  # ties: the owner's record (first)
    plain = sorted((f for f in forms().values() if f.parametrization is None), key=lambda f: f.preference)
    cands = [c for f in plain if (c := f.encode(name, value, None, opts)) is not None]
    return min(cands, key=lambda c: c[0].bytes)


def save_compressed(model: nn.Module, path: str | os.PathLike[str], *, value_dtype: str = "float32",
                    index_bits: int | str | Mapping[str, int | str] = "auto", arch: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None, huffman: bool = True) -> CompressedFile:
    """Write ``model`` (masks multiplied in) to a ``.nsz`` file atomically.

    Args:
        value_dtype: "float32" (lossless) or "float16".
        index_bits: gap width of the sparse streams, 1..16, or "auto" (smallest file, per tensor), or a
            mapping by tensor, layer or layer type, e.g. ``{"conv": 8, "fc": 5}`` (Deep Compression's format).
        arch: how to rebuild the model, e.g. ``{"name": "lenet5", "input_shape": [1, 28, 28],
            "num_classes": 10}``; defaults to what :func:`netsurgeon.models.build_model` recorded.
        meta: free-form JSON-serializable facts to keep (data set, accuracy, method).
        huffman: Huffman-code the streams of weight-shared tensors (Deep Compression Sec. 4).

    Raises:
        ValueError: NaN/inf weights, an unknown value dtype, index_bits out of range.
    """
    from .changes import arch_of

    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"save_compressed: value_dtype must be one of {list(_VALUE_DTYPES)}; got {value_dtype!r}.")
    widths = index_bits.values() if isinstance(index_bits, Mapping) else [index_bits]
    if not widths or any(w != "auto" and not (isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 16)
                         for w in widths):
        raise ValueError(f"save_compressed: index_bits must be 'auto', an int in [1, 16], or a mapping "
                         f"{{conv|fc|layer: bits}}; got {index_bits!r}.")
    check_finite_model("save_compressed", model)
    records, blobs = [], {}
    state = effective_state_dict(model)
    aliases = _aliases(state)
    for name, t in state.items():
        if name in aliases:  # a tensor two modules share (tied weights) is stored once
            continue
        opts = EncodeOptions(value_dtype, _bits_for(model, name, index_bits), huffman)
        rec, b = encode_tensor(model, name, t, opts)
        records.append(rec)
        blobs.update(b)
    header = {"format": "netsurgeon.nsz", "version": FORMAT_VERSION, "arch": arch or arch_of(model),
              "meta": meta or {}, "tensors": [r.to_json() for r in records]}
    if aliases:
        header["aliases"] = aliases
    size = write_container(path, header, blobs)
    return CompressedFile(str(path), size, _dense_bytes(records, header["arch"], trust_code=True), records, header)


def _dense_bytes(records: list[TensorRecord], arch: Any, *, trust_code: bool) -> int:
    """The model before compression as dense float32 bytes (``stats.dense_bytes``): the architecture before its
    shape-changing changes where the record has any and it can be built on the meta device (a user's factory only
    with ``trust_code``), else the file's own tensors."""
    from .architecture import UntrustedCodeError, original_model
    from .stats import dense_bytes

    try:
        orig = original_model(arch, trust_code=trust_code) if isinstance(arch, dict) else None
    except (UntrustedCodeError, ValueError, TypeError, RuntimeError):
        orig = None
    return dense_bytes(orig) if orig is not None else 4 * sum(r.numel for r in records)


def read_header(path: str | os.PathLike[str], *, max_elements: int | None = None) -> CompressedFile:
    """Read and validate a ``.nsz`` file's header and streams without decoding any tensor.

    Every field is typed and bounded and every stream's length checked against its record's form; the file may
    declare at most ``max_elements`` elements (default :func:`~netsurgeon.coding.schema.max_elements_for` its
    size). The returned description keeps the raw streams for :func:`decode_state`.

    Raises:
        NszError: missing, truncated, corrupt, of a newer version, or a header that fails the schema.
    """
    from .architecture import check_arch

    p = Path(path)
    header, blobs = read_container(p)
    if header.get("format") != "netsurgeon.nsz":
        raise NszError(f"{p}: not a netsurgeon model file (format {str(header.get('format'))[:40]!r}).")
    if header.get("version") not in _READABLE:
        raise NszError(f"{p}: format version {str(header.get('version'))[:20]} is not supported "
                       f"(this netsurgeon reads versions {', '.join(map(str, _READABLE))}).")
    size = os.path.getsize(p)
    cap = max_elements if max_elements is not None else max_elements_for(size)
    records = parse_records(str(p), header, blobs, cap, forms())
    _check_aliases(str(p), header, records)
    check_arch(str(p), header.get("arch"))
    meta = header.get("meta", {})
    if meta is not None and not isinstance(meta, dict):
        raise NszError(f"{p}: the header's 'meta' must be a mapping.")
    return CompressedFile(str(p), size, _dense_bytes(records, header.get("arch"), trust_code=False), records, header,
                          blobs)


def decode_state(info: CompressedFile) -> dict[str, Tensor]:
    """Decode every tensor of a validated file (float tensors as float32); a stream that does not decode to
    exactly what its record declares is an NszError naming the tensor."""
    if info.blobs is None:
        raise ValueError("decode_state: the file description holds no streams (read it with read_header).")
    known, state = forms(), {}
    for r in info.records:
        try:
            state[r.name] = known[r.codec].decode(info.where(r), r, info.blobs)
        except NszError:
            raise
        except (ValueError, TypeError, OverflowError, IndexError) as e:
            raise NszError(f"{info.where(r)}: {' '.join(str(e).split())[:200]}") from e
    for name, target in info.header.get("aliases", {}).items():
        state[name] = state[target]
    return state


def tensor_shapes(info: CompressedFile) -> dict[str, tuple[int, ...]]:
    """Every tensor name the file restores (aliases of tied weights included) and its shape."""
    shapes = {r.name: r.shape for r in info.records}
    return {**shapes, **{a: shapes[t] for a, t in info.header.get("aliases", {}).items()}}


def read_compressed(path: str | os.PathLike[str], *, with_blobs: bool = False,
                    max_elements: int | None = None) -> tuple[CompressedFile, dict[str, Tensor]]:
    """Read a ``.nsz`` file: its description and the decoded state dict (float tensors as float32).

    With ``with_blobs`` the raw streams stay on the returned description (``info.blobs``) for callers that
    rebuild the stored form (k-means codebooks, int8 values) rather than dense tensors.

    Raises:
        NszError: the file is missing, truncated, corrupt, of a newer format version, or fails the schema.
    """
    info = read_header(path, max_elements=max_elements)
    state = decode_state(info)
    if not with_blobs:
        info = CompressedFile(info.path, info.file_bytes, info.dense_bytes, info.records, info.header)
    return info, state


def check_state_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str = "file") -> None:
    """Refuse, naming the mismatch, a file whose tensor names or shapes differ from ``model``'s state_dict."""
    own = model.state_dict()
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    if missing or unexpected:
        raise NszError(f"{source}: tensors do not match the model: missing {missing[:8]}, unexpected "
                       f"{unexpected[:8]}.")
    for k, shape in shapes.items():
        if tuple(own[k].shape) != tuple(shape):
            raise NszError(f"{source}: tensor {k!r} has shape {list(shape)} in the file but "
                           f"{list(own[k].shape)} in the model.")


def load_state_checked(model: nn.Module, state: dict[str, Tensor], source: str = "file") -> nn.Module:
    """Copy ``state`` into ``model`` after checking names, shapes and finiteness; errors name each problem."""
    own = model.state_dict()
    check_state_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise NszError(f"{source}: tensor {k!r} holds {bad} NaN/inf value(s); refusing to load it.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model
