"""The ``.nsz`` header schema: every field typed and bounded, and every blob's length checked against its record,
before anything is decoded or allocated.

A header can be edited and its CRC recomputed by anyone, so the CRCs only catch accidents. This module is the
guard against crafted files: wrong types, huge numbers, shapes that do not match ``numel``, bit widths that would
make huge tables, streams that cannot hold the entries they declare, unknown fields or blobs, and files that
declare far more elements than their bytes can plausibly encode. Every failure is an :class:`NszError` naming
the tensor record and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .bits import packed_size
from .container import NszError

__all__ = ["TensorRecord", "parse_records", "check_arch", "max_elements_for", "VALUE_ITEMSIZE"]

VALUE_ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8}
_CODEC_DTYPES = {"dense": ("float32", "float16", "int64"), "sparse": ("float32", "float16"),
                 "shared": ("float32", "float16"), "int8": ("float32",),
                 "binary": ("float32",), "hashed": ("float32", "float16"), "pq": ("float32", "float16")}
_INT_FIELDS = ("index_bits", "numel", "nonzero", "entries", "bytes", "code_bits", "codebook_size", "bytes_fixed",
               "seed", "stages", "subspaces")
_FIELDS = {"name", "shape", "codec", "value_dtype", "huffman", *_INT_FIELDS}
_OPTIONAL = {"code_bits": 0, "huffman": False, "codebook_size": 0, "bytes_fixed": 0,  # absent in version 1
             "seed": 0,                                                                 # hashed records only
             "stages": 0, "subspaces": 0}                                               # pq records only
MAX_TENSORS = 100_000
MAX_DIMS = 8
MAX_NAME = 512
MAX_STREAM_BITS = 16          # the writer uses at most 16-bit gaps and codes
MAX_ELEMENTS_FLOOR = 1 << 26  # 64M elements (256 MB as float32) are always allowed
ELEMENTS_PER_BYTE = 512       # beyond the floor: at most 512 elements per file byte (2,048x smaller than float32)
MAX_INPUT_ELEMENTS = 1 << 24
MAX_CLASSES = 1_000_000
CONV_FACTOR_KINDS = ("spatial", "cp", "tucker", "separable")  # netsurgeon.lowrank.CONV_KINDS (a test keeps them equal)


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor is stored. ``bytes`` counts its payload (index + value streams)."""

    name: str
    shape: tuple[int, ...]
    codec: str              # "dense", "sparse", "shared", "int8", "binary" or "hashed"
    value_dtype: str
    index_bits: int         # 0 for dense
    numel: int
    nonzero: int
    entries: int            # stored values, fillers included (= numel for dense)
    bytes: int
    code_bits: int = 0      # shared: bits of a codebook index before Huffman
    huffman: bool = False   # shared: streams are Huffman-coded
    codebook_size: int = 0  # shared: number of shared values; int8, binary: number of scales
    bytes_fixed: int = 0    # shared: payload bytes with fixed-width streams (before Huffman)
    seed: int = 0           # hashed: the seed of the index and sign hashes (coding/hashing.py)
    stages: int = 0         # pq: residual stages T (quantization/pq.py)
    subspaces: int = 0      # pq: segments S per row

    def pq_layout(self) -> tuple[int, int, int, int, int]:
        """pq: (stages T, rows, subspaces S, centroids k, sub_dim) for this record's shape."""
        cols = self.shape[1]
        rows = self.numel // cols
        return self.stages, rows, self.subspaces, self.codebook_size, -(-cols // self.subspaces)

    @property
    def kept(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0


def max_elements_for(file_bytes: int) -> int:
    """The most elements a file of ``file_bytes`` may declare (see module doc); pass a larger cap to readers to
    load an extreme (e.g. almost all-zero) model."""
    return max(MAX_ELEMENTS_FLOOR, ELEMENTS_PER_BYTE * file_bytes)


def _int(where: str, field: str, v: Any, lo: int = 0, hi: int = 1 << 62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise NszError(f"{where}: field {field!r} must be an integer in [{lo}, {hi}]; got {_short(v)}.")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_one(p: str, i: int, t: Any) -> TensorRecord:
    if not isinstance(t, dict):
        raise NszError(f"{p}: tensor record {i} is not a mapping ({_short(t)}).")
    name = t.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise NszError(f"{p}: tensor record {i}: field 'name' must be a non-empty string; got {_short(name)}.")
    where = f"{p}: tensor {name!r}"
    unknown = sorted(map(str, set(t) - _FIELDS))
    missing = sorted(_FIELDS - set(t) - set(_OPTIONAL))
    if unknown or missing:
        raise NszError(f"{where}: " + (f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}")
                       + ".")
    shape = t["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise NszError(f"{where}: field 'shape' must be a list of at most {MAX_DIMS} integers; got {_short(shape)}.")
    dims = tuple(_int(where, "shape", d, 0, 1 << 40) for d in shape)
    codec, dtype = t["codec"], t["value_dtype"]
    if not isinstance(codec, str) or codec not in _CODEC_DTYPES:
        raise NszError(f"{where}: field 'codec' must be one of {list(_CODEC_DTYPES)}; got {_short(codec)}.")
    if not isinstance(dtype, str) or dtype not in _CODEC_DTYPES[codec]:
        raise NszError(f"{where}: field 'value_dtype' of a {codec} record must be one of "
                       f"{list(_CODEC_DTYPES[codec])}; got {_short(dtype)}.")
    ints = {f: _int(where, f, t.get(f, _OPTIONAL.get(f)), 0, 32 if f.endswith("_bits") else 1 << 62)
            for f in _INT_FIELDS}
    huffman = t.get("huffman", False)
    if not isinstance(huffman, bool):
        raise NszError(f"{where}: field 'huffman' must be true or false; got {_short(huffman)}.")
    if math.prod(dims) != ints["numel"]:
        raise NszError(f"{where}: field 'numel' is {ints['numel']} but shape {list(dims)} holds {math.prod(dims)}.")
    if ints["nonzero"] > ints["numel"]:
        raise NszError(f"{where}: field 'nonzero' ({ints['nonzero']}) exceeds 'numel' ({ints['numel']}).")
    return TensorRecord(name, dims, codec, dtype, ints["index_bits"], ints["numel"], ints["nonzero"],
                        ints["entries"], ints["bytes"], ints["code_bits"], huffman, ints["codebook_size"],
                        ints["bytes_fixed"], ints["seed"], ints["stages"], ints["subspaces"])


def _stream_keys(p: str, r: TensorRecord, blobs: dict[str, bytes], key: str, nbits: int) -> list[str]:
    """Check one integer stream (fixed width, or Huffman with its length table); return its blob names."""
    where = f"{p}: tensor {r.name!r}"
    data = blobs.get(f"{r.name}/{key}")
    if data is None:
        raise NszError(f"{where}: missing {key} stream.")
    table = blobs.get(f"{r.name}/{key}_lengths")
    if table is None:
        if len(data) != packed_size(r.entries, nbits):
            raise NszError(f"{where}: {key} stream has {len(data)} bytes; {r.entries} entries of {nbits} bits need "
                           f"{packed_size(r.entries, nbits)}.")
        return [f"{r.name}/{key}"]
    if len(table) != 1 << nbits:
        raise NszError(f"{where}: {key} code table has {len(table)} entries, expected {1 << nbits}.")
    if r.entries > 8 * len(data):  # every Huffman code is at least one bit
        raise NszError(f"{where}: field 'entries' ({r.entries}) is more than the {8 * len(data)} bits of its "
                       f"Huffman-coded {key} stream can hold.")
    return [f"{r.name}/{key}", f"{r.name}/{key}_lengths"]


def _check_blobs(p: str, r: TensorRecord, blobs: dict[str, bytes]) -> list[str]:
    """Check the record's fields against its codec and its blobs' lengths; return the blob names it owns."""
    where = f"{p}: tensor {r.name!r}"

    def need(key: str, size: int) -> str:
        data = blobs.get(f"{r.name}/{key}")
        if data is None or len(data) != size:
            got = "missing" if data is None else f"{len(data)} bytes"
            raise NszError(f"{where}: {key} stream is {got}; the record needs {size} bytes.")
        return f"{r.name}/{key}"

    item = VALUE_ITEMSIZE[r.value_dtype]
    if r.codec == "dense":
        if r.index_bits != 0 or r.entries != r.numel:
            raise NszError(f"{where}: a dense record needs index_bits 0 and entries = numel ({r.numel}); got "
                           f"{r.index_bits} and {r.entries}.")
        return [need("values", r.numel * item)]
    if r.codec == "int8":
        channels = r.shape[0] if r.shape else 1
        if r.codebook_size not in (1, channels) or r.code_bits not in (0, 8):
            raise NszError(f"{where}: an int8 record needs 1 or {channels} scales (one per output channel) and "
                           f"8-bit codes; got codebook_size {r.codebook_size}, code_bits {r.code_bits}.")
        return [need("values", r.numel), need("scale", 4 * r.codebook_size)]
    if r.codec == "hashed":  # K real weights; the virtual tensor is rebuilt from (shape, K, seed)
        if not 1 <= r.codebook_size <= max(r.numel, 1) or r.entries != r.codebook_size or r.index_bits != 0:
            raise NszError(f"{where}: a hashed record needs 1 <= codebook_size (buckets) <= numel ({r.numel}), "
                           f"entries = codebook_size and index_bits 0; got codebook_size {r.codebook_size}, "
                           f"entries {r.entries}, index_bits {r.index_bits}.")
        return [need("values", r.codebook_size * item)]
    if r.codec == "pq":  # codebooks (T, S, k, sub_dim) and T x rows x S codes of code_bits bits
        cols = r.shape[1] if len(r.shape) >= 2 else 0
        if (cols == 0 or not 1 <= r.stages <= 16 or not 1 <= r.subspaces <= cols or r.index_bits != 0
                or not 1 <= r.code_bits <= MAX_STREAM_BITS or not 1 <= r.codebook_size <= (1 << r.code_bits)):
            raise NszError(f"{where}: a pq record needs a shape of 2+ dimensions, 1 <= stages <= 16, 1 <= subspaces "
                           f"<= shape[1], index_bits 0, 1 <= code_bits <= {MAX_STREAM_BITS} and 1 <= codebook_size "
                           f"<= 2**code_bits; got shape {list(r.shape)}, stages {r.stages}, subspaces "
                           f"{r.subspaces}, code_bits {r.code_bits}, codebook_size {r.codebook_size}.")
        t, rows, sub, k, d = r.pq_layout()
        if r.entries != t * rows * sub:
            raise NszError(f"{where}: a pq record holds stages x rows x subspaces = {t * rows * sub} codes; field "
                           f"'entries' is {r.entries}.")
        return [need("codebook", t * sub * k * d * item), need("codes", packed_size(r.entries, r.code_bits))]
    if r.codec == "binary":
        channels = r.shape[0] if r.shape else 1
        if r.codebook_size not in (1, channels) or r.code_bits != 1 or r.index_bits != 0:
            raise NszError(f"{where}: a binary record needs 1 or {channels} scales, code_bits 1 and index_bits 0; "
                           f"got codebook_size {r.codebook_size}, code_bits {r.code_bits}, index_bits {r.index_bits}.")
        return [need("bits", (r.numel + 7) // 8), need("scale", 4 * r.codebook_size)]
    if not 1 <= r.index_bits <= MAX_STREAM_BITS:
        raise NszError(f"{where}: field 'index_bits' must be in [1, {MAX_STREAM_BITS}]; got {r.index_bits}.")
    if r.codec == "sparse":
        return [need("values", r.entries * item), need("index", packed_size(r.entries, r.index_bits))]
    # shared: codes 0..k (0 = zero) in code_bits bits
    if not 1 <= r.code_bits <= MAX_STREAM_BITS or not 1 <= r.codebook_size < (1 << r.code_bits):
        raise NszError(f"{where}: a shared record needs 1 <= code_bits <= {MAX_STREAM_BITS} and 1 <= codebook_size "
                       f"< 2**code_bits; got code_bits {r.code_bits}, codebook_size {r.codebook_size}.")
    return [need("codebook", r.codebook_size * item), *_stream_keys(p, r, blobs, "index", r.index_bits),
            *_stream_keys(p, r, blobs, "codes", r.code_bits)]


def parse_records(p: str, header: dict[str, Any], blobs: dict[str, bytes], max_elements: int) -> list[TensorRecord]:
    """Validate the tensor table of ``header`` against ``blobs``; return the records. Nothing is decoded."""
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise NszError(f"{p}: the header's 'tensors' must be a list of at most {MAX_TENSORS} records.")
    records = [_parse_one(p, i, t) for i, t in enumerate(tensors)]
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
        owned.update(_check_blobs(p, r, blobs))
    stray = sorted(set(blobs) - owned)
    if stray:
        raise NszError(f"{p}: blob(s) {stray[:5]} belong to no tensor record.")
    return records


def check_arch(p: str, arch: Any) -> dict[str, Any] | None:
    """Validate an architecture record before any module is built (types, and an input shape that cannot make
    a model allocate without bound). Returns it, or None when the file records none."""
    if arch is None:
        return None
    where = f"{p}: architecture record"
    if not isinstance(arch, dict):
        raise NszError(f"{where} must be a mapping; got {_short(arch)}.")
    known = {"name", "input_shape", "num_classes", "kwargs", "factory", "resized", "binary_inputs", "factorized",
             "hwgq_inputs", "activations"}
    if set(arch) - known:
        raise NszError(f"{where}: unknown field(s) {sorted(map(str, set(arch) - known))}.")
    if ("name" in arch and "factory" in arch) or ("name" not in arch and "factory" not in arch
                                                   and not {"resized", "binary_inputs", "factorized",
                                                            "hwgq_inputs", "activations"} & set(arch)):
        raise NszError(f"{where} needs exactly one of 'name' or 'factory'.")
    for key in ("name", "factory"):
        if key in arch and (not isinstance(arch[key], str) or not 0 < len(arch[key]) <= 200):
            raise NszError(f"{where}: field {key!r} must be a short string; got {_short(arch[key])}.")
    if "kwargs" in arch and not isinstance(arch["kwargs"], dict):
        raise NszError(f"{where}: field 'kwargs' must be a mapping; got {_short(arch['kwargs'])}.")
    shape = arch.get("input_shape")
    if shape is not None or "name" in arch:
        if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
            raise NszError(f"{where}: field 'input_shape' must be a list of 1 to 4 integers; got {_short(shape)}.")
        dims = [_int(where, "input_shape", d, 1, MAX_INPUT_ELEMENTS) for d in shape]
        if math.prod(dims) > MAX_INPUT_ELEMENTS:
            raise NszError(f"{where}: field 'input_shape' {dims} has more than {MAX_INPUT_ELEMENTS:,} elements.")
    if "name" in arch:
        _int(where, "num_classes", arch.get("num_classes"), 1, MAX_CLASSES)
    resized = arch.get("resized")
    if resized is not None:  # structured pruning: {layer: {field: size}}, bounded like every other size
        fields = {"in_features", "out_features", "in_channels", "out_channels", "groups", "num_features"}
        if not isinstance(resized, dict) or len(resized) > 10_000:
            raise NszError(f"{where}: field 'resized' must be a mapping of layers; got {_short(resized)}.")
        for layer, sizes in resized.items():
            if not isinstance(layer, str) or not isinstance(sizes, dict) or not sizes or set(sizes) - fields:
                raise NszError(f"{where}: field 'resized' entry {_short(layer)}: {_short(sizes)} must map "
                               f"{sorted(fields)} to sizes.")
            for k, v in sizes.items():
                _int(where, f"resized.{layer}.{k}", v, 1, 1 << 24)
    ranks = arch.get("factorized")
    if ranks is not None:  # low-rank factors: {layer: rank} (Linear) or {layer: {"kind": k, "rank": r}} (Conv2d)
        if not isinstance(ranks, dict) or len(ranks) > 10_000 or not all(
                isinstance(k, str) and 0 < len(k) <= MAX_NAME for k in ranks):
            raise NszError(f"{where}: field 'factorized' must map layer names to ranks; got {_short(ranks)}.")
        for layer, r in ranks.items():
            if not isinstance(r, dict):
                _int(where, f"factorized.{layer}", r, 1, 1 << 24)
                continue
            kind = r.get("kind")
            if set(r) != {"kind", "rank"} or kind not in CONV_FACTOR_KINDS:
                raise NszError(f"{where}: field 'factorized' entry {_short(layer)} must be a rank or "
                               f"{{kind: one of {list(CONV_FACTOR_KINDS)}, rank}}; got {_short(r)}.")
            rank = r["rank"]
            if kind == "tucker":
                if not isinstance(rank, list) or len(rank) != 2:
                    raise NszError(f"{where}: field 'factorized.{layer}.rank' of a tucker factorization must be "
                                   f"[R_in, R_out]; got {_short(rank)}.")
                for x in rank:
                    _int(where, f"factorized.{layer}.rank", x, 1, 1 << 24)
            else:
                _int(where, f"factorized.{layer}.rank", rank, 1, 1 << 24)
    inputs = arch.get("binary_inputs")
    if inputs is not None:  # binary networks: {layer: "sign" | "scaled"}
        if not isinstance(inputs, dict) or len(inputs) > 10_000 or not all(
                isinstance(k, str) and 0 < len(k) <= MAX_NAME and v in ("sign", "scaled") for k, v in inputs.items()):
            raise NszError(f"{where}: field 'binary_inputs' must map layer names to 'sign' or 'scaled'; got "
                           f"{_short(inputs)}.")
    acts = arch.get("activations")
    if acts is not None:  # activation modules replaced (a ReLU feeding a binarized input): {module: "hardtanh"}
        if not isinstance(acts, dict) or len(acts) > 10_000 or not all(
                isinstance(k, str) and 0 < len(k) <= MAX_NAME and v == "hardtanh" for k, v in acts.items()):
            raise NszError(f"{where}: field 'activations' must map module names to 'hardtanh'; got {_short(acts)}.")
    hwgq = arch.get("hwgq_inputs")
    if hwgq is not None:  # HWGQ activations: {layer: bits}
        if not isinstance(hwgq, dict) or len(hwgq) > 10_000 or not all(
                isinstance(k, str) and 0 < len(k) <= MAX_NAME for k in hwgq):
            raise NszError(f"{where}: field 'hwgq_inputs' must map layer names to bits; got {_short(hwgq)}.")
        for layer, bits in hwgq.items():
            _int(where, f"hwgq_inputs.{layer}", bits, 1, 8)
    return arch
