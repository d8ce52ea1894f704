"""The ``.nsz`` header schema: every field typed and bounded, and every blob's length checked against its record,
before anything is decoded or allocated.

A header can be edited and its CRC recomputed by anyone, so the CRCs only catch accidents. This module is the
guard against crafted files: wrong types, huge numbers, shapes that do not match ``numel``, bit widths that would
make huge tables, streams that cannot hold the entries they declare, unknown fields or blobs, and files that
declare far more elements than their bytes can plausibly encode. Every failure is an :class:`NszError` naming
the tensor record and the field.

The fields every record has are checked here; what a codec adds (its own integer fields and their bounds, its
value dtypes, the lengths of its blobs) is declared by its storage form (``netsurgeon.forms``), which the reader
passes in as ``codecs``: this module never imports the forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .bits import packed_size
from .container import NszError

__all__ = ["TensorRecord", "CodecSchema", "parse_records", "max_elements_for", "VALUE_ITEMSIZE", "need_blob",
           "stream_blobs", "check_int", "check_mapping", "short", "MAX_STREAM_BITS", "MAX_NAME"]

VALUE_ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8}
_CORE_INTS = ("index_bits", "numel", "nonzero", "entries", "bytes", "code_bits", "codebook_size", "bytes_fixed")
_CORE = {"name", "shape", "codec", "value_dtype", "huffman", *_CORE_INTS}
_OPTIONAL = {"code_bits": 0, "huffman": False, "codebook_size": 0, "bytes_fixed": 0}  # absent in version 1
MAX_TENSORS = 100_000
MAX_DIMS = 8
MAX_NAME = 512
MAX_STREAM_BITS = 16          # the writer uses at most 16-bit gaps and codes
MAX_ELEMENTS_FLOOR = 1 << 26  # 64M elements (256 MB as float32) are always allowed
ELEMENTS_PER_BYTE = 512       # beyond the floor: at most 512 elements per file byte (2,048x smaller than float32)


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor is stored. ``bytes`` counts its payload (index + value streams); ``extra`` holds the
    integer fields its codec declares (e.g. a hashed tensor's ``seed``)."""

    name: str
    shape: tuple[int, ...]
    codec: str              # the storage form's name: "dense", "sparse", "shared", "int8", ...
    value_dtype: str
    index_bits: int         # 0 for dense
    numel: int
    nonzero: int
    entries: int            # stored values, fillers included (= numel for dense)
    bytes: int
    code_bits: int = 0      # bits of one code (shared: a codebook index before Huffman; int8: 8; binary: 1)
    huffman: bool = False   # shared: streams are Huffman-coded
    codebook_size: int = 0  # shared: number of shared values; int8, binary: number of scales; ...
    bytes_fixed: int = 0    # shared: payload bytes with fixed-width streams (before Huffman)
    extra: Mapping[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "codec": self.codec, "value_dtype": self.value_dtype,
                "index_bits": self.index_bits, "numel": self.numel, "nonzero": self.nonzero,
                "entries": self.entries, "bytes": self.bytes, "code_bits": self.code_bits, "huffman": self.huffman,
                "codebook_size": self.codebook_size, "bytes_fixed": self.bytes_fixed, **dict(self.extra)}


class CodecSchema(Protocol):
    """What the reader needs of a codec (a storage form) to check a record before anything is decoded."""

    value_dtypes: tuple[str, ...]
    fields: Mapping[str, tuple[int, int, int | None]]   # extra field -> (low, high, default; None = required)

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]: ...


def max_elements_for(file_bytes: int) -> int:
    """The most elements a file of ``file_bytes`` may declare (see module doc); pass a larger cap to readers to
    load an extreme (e.g. almost all-zero) model."""
    return max(MAX_ELEMENTS_FLOOR, ELEMENTS_PER_BYTE * file_bytes)


def check_int(where: str, name: str, v: Any, lo: int = 0, hi: int = 1 << 62) -> int:
    """``v`` if it is an int in [lo, hi] (bools refused), else an NszError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise NszError(f"{where}: field {name!r} must be an integer in [{lo}, {hi}]; got {short(v)}.")
    return v


def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def need_blob(where: str, rec: TensorRecord, blobs: Mapping[str, bytes], key: str, size: int) -> str:
    """The name of ``rec``'s blob ``key`` after checking it holds exactly ``size`` bytes."""
    data = blobs.get(f"{rec.name}/{key}")
    if data is None or len(data) != size:
        got = "missing" if data is None else f"{len(data)} bytes"
        raise NszError(f"{where}: {key} stream is {got}; the record needs {size} bytes.")
    return f"{rec.name}/{key}"


def stream_blobs(where: str, rec: TensorRecord, blobs: Mapping[str, bytes], key: str, nbits: int) -> list[str]:
    """Check one integer stream of ``rec.entries`` symbols (fixed width, or Huffman with its length table);
    return its blob names."""
    data = blobs.get(f"{rec.name}/{key}")
    if data is None:
        raise NszError(f"{where}: missing {key} stream.")
    table = blobs.get(f"{rec.name}/{key}_lengths")
    if table is None:
        if len(data) != packed_size(rec.entries, nbits):
            raise NszError(f"{where}: {key} stream has {len(data)} bytes; {rec.entries} entries of {nbits} bits need "
                           f"{packed_size(rec.entries, nbits)}.")
        return [f"{rec.name}/{key}"]
    if len(table) != 1 << nbits:
        raise NszError(f"{where}: {key} code table has {len(table)} entries, expected {1 << nbits}.")
    if rec.entries > 8 * len(data):  # every Huffman code is at least one bit
        raise NszError(f"{where}: field 'entries' ({rec.entries}) is more than the {8 * len(data)} bits of its "
                       f"Huffman-coded {key} stream can hold.")
    return [f"{rec.name}/{key}", f"{rec.name}/{key}_lengths"]


def _parse_one(p: str, i: int, t: Any, codecs: Mapping[str, CodecSchema]) -> TensorRecord:
    if not isinstance(t, dict):
        raise NszError(f"{p}: tensor record {i} is not a mapping ({short(t)}).")
    name = t.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise NszError(f"{p}: tensor record {i}: field 'name' must be a non-empty string; got {short(name)}.")
    where = f"{p}: tensor {name!r}"
    codec = t.get("codec")
    if not isinstance(codec, str) or codec not in codecs:
        raise NszError(f"{where}: field 'codec' must be one of {sorted(codecs)}; got {short(codec)}.")
    form = codecs[codec]
    unknown = sorted(map(str, set(t) - _CORE - set(form.fields)))
    missing = sorted(_CORE - set(t) - set(_OPTIONAL))
    missing += sorted(k for k, (_, _, d) in form.fields.items() if d is None and k not in t)
    if unknown or missing:
        raise NszError(f"{where}: " + (f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}")
                       + ".")
    shape = t["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise NszError(f"{where}: field 'shape' must be a list of at most {MAX_DIMS} integers; got {short(shape)}.")
    dims = tuple(check_int(where, "shape", d, 0, 1 << 40) for d in shape)
    dtype = t["value_dtype"]
    if not isinstance(dtype, str) or dtype not in form.value_dtypes:
        raise NszError(f"{where}: field 'value_dtype' of a {codec} record must be one of "
                       f"{list(form.value_dtypes)}; got {short(dtype)}.")
    ints = {f: check_int(where, f, t.get(f, _OPTIONAL.get(f)), 0, 32 if f.endswith("_bits") else 1 << 62)
            for f in _CORE_INTS}
    extra = {f: check_int(where, f, t.get(f, d), lo, hi) for f, (lo, hi, d) in form.fields.items()}
    huffman = t.get("huffman", False)
    if not isinstance(huffman, bool):
        raise NszError(f"{where}: field 'huffman' must be true or false; got {short(huffman)}.")
    if math.prod(dims) != ints["numel"]:
        raise NszError(f"{where}: field 'numel' is {ints['numel']} but shape {list(dims)} holds {math.prod(dims)}.")
    if ints["nonzero"] > ints["numel"]:
        raise NszError(f"{where}: field 'nonzero' ({ints['nonzero']}) exceeds 'numel' ({ints['numel']}).")
    return TensorRecord(name, dims, codec, dtype, ints["index_bits"], ints["numel"], ints["nonzero"],
                        ints["entries"], ints["bytes"], ints["code_bits"], huffman, ints["codebook_size"],
                        ints["bytes_fixed"], extra)


def parse_records(p: str, header: dict[str, Any], blobs: dict[str, bytes], max_elements: int,
                  codecs: Mapping[str, CodecSchema]) -> list[TensorRecord]:
    """Validate the tensor table of ``header`` against ``blobs`` with each record's codec from ``codecs``;
    return the records. Nothing is decoded."""
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise NszError(f"{p}: the header's 'tensors' must be a list of at most {MAX_TENSORS} records.")
    records = [_parse_one(p, i, t, codecs) for i, t in enumerate(tensors)]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise NszError(f"{p}: tensor name(s) {dup[:5]} appear more than once.")
    total = sum(r.numel for r in records)
    if total > max_elements:
        raise NszError(f"{p}: the file declares {total:,} elements, more than the {max_elements:,} a file of its size "
                       "may hold (pass max_elements to load an extreme file you trust).")
    owned: set[str] = set()
    for r in records:
        owned.update(codecs[r.codec].check(f"{p}: tensor {r.name!r}", r, blobs))
    stray = sorted(set(blobs) - owned)
    if stray:
        raise NszError(f"{p}: blob(s) {stray[:5]} belong to no tensor record.")
    return records


def check_mapping(where: str, name: str, value: Any, check_value: Callable[[str, Any], Any],
                  max_items: int = 10_000) -> dict[str, Any]:
    """A ``{layer name: value}`` record field: a mapping of at most ``max_items`` short string keys, each value
    checked by ``check_value(key, value)`` (which raises NszError)."""
    if not isinstance(value, dict) or len(value) > max_items or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_NAME for k in value):
        raise NszError(f"{where}: field {name!r} must map layer names to values; got {short(value)}.")
    for k, v in value.items():
        check_value(k, v)
    return value
