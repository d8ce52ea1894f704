"""The ``.nsz`` model file: every tensor stored dense, as a relative-index sparse stream, or shared.

Per tensor the writer picks the smaller of
* ``dense``: the raw values (float32 or float16), and
* ``sparse``: Deep Compression's relative indices (Han et al. 2016 Sec. 2) bit-packed at ``index_bits``
  bits plus the values (fillers included). ``index_bits="auto"`` tries 1..16 bits and keeps the smallest.

* ``int8`` (version 2): post-training int8 weights (``quantization.uniform``) as raw int8 plus float32
  scales (per tensor or per output channel).
* ``binary`` (version 2): a binarized weight (``quantization.binary``) as one bit per weight (1 = +1, bit
  order little-endian within each byte, row-major) plus float32 scales (one, or one per output channel).
* ``hashed`` (version 2): a HashedNets tensor (``sharing.hashed``): its K real weights and the hash seed; the
  virtual tensor is rebuilt as ξ·w[h] (``coding.hashing``).
* ``shared`` (version 2): a k-means-shared tensor (Deep Compression Sec. 3) stored as relative gaps plus
  codebook indices (code 0 = zero/filler) and the codebook; both integer streams Huffman-coded (Sec. 4)
  with canonical codes whose lengths are stored, or bit-packed when ``huffman=False``.

Version 2 also zlib-compresses the header. Version 1 files still load.
The size of a compressed model is ``os.path.getsize`` of this file, never a count of zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
from .huffman import encoded_bits, huffman_code_lengths, huffman_decode, huffman_encode
from .schema import TensorRecord, check_arch, max_elements_for, parse_records
from .sparse import best_index_bits, decode_relative, encode_relative, relative_entries

__all__ = ["FORMAT_VERSION", "TensorRecord", "CompressedFile", "save_compressed", "read_header", "decode_state",
           "check_state_shapes",
           "read_compressed", "load_state_checked", "decode_shared_parts", "decode_int8", "decode_binary",
           "decode_hashed", "decode_pq"]

FORMAT_VERSION = 2
_READABLE = (1, 2)
_VALUE_DTYPES = {"float32": np.float32, "float16": np.float16}
_RAW_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass(frozen=True)
class CompressedFile:
    """What :func:`save_compressed` wrote or :func:`read_compressed` read."""

    path: str
    file_bytes: int
    dense_bytes: int        # the same parameters as dense float32
    records: list[TensorRecord]
    header: dict[str, Any]
    blobs: dict[str, bytes] | None = None

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


def _parametrization(model: nn.Module, fqn: str) -> nn.Module | None:
    """The first parametrization on tensor ``fqn`` (storage never imports the method modules: duck typing)."""
    from torch.nn.utils import parametrize

    mod_name, _, attr = fqn.rpartition(".")
    m = model.get_submodule(mod_name) if mod_name else model
    return m.parametrizations[attr][0] if parametrize.is_parametrized(m, attr) else None


def _stream(symbols: np.ndarray, nbits: int, huffman: bool) -> tuple[int, np.ndarray | None]:
    """Bits a stream takes, and its Huffman code lengths (None when fixed width is smaller or asked for).

    A Huffman stream also pays for its table (one byte per symbol), so small streams stay fixed-width.
    """
    fixed = 8 * packed_size(symbols.size, nbits)
    if not huffman or symbols.size == 0:
        return fixed, None
    lengths = huffman_code_lengths(np.bincount(symbols.astype(np.int64), minlength=1 << nbits))
    coded = 8 * ((encoded_bits(symbols, lengths) + 7) // 8) + 8 * lengths.size
    return (coded, lengths) if coded < fixed else (fixed, None)


def _encode_shared(name: str, codebook: Tensor, index: Tensor, value_dtype: str, index_bits: int | str,
                   huffman: bool) -> tuple[TensorRecord, dict]:
    idx = index.detach().cpu().numpy().ravel().astype(np.int64)
    k = codebook.numel()
    code_bits = max(1, int(k).bit_length())            # codes 0..k
    candidates = range(1, 13) if index_bits == "auto" else [int(index_bits)]
    best = None
    for b in candidates:
        gaps, codes = encode_relative(idx, b)
        total = _stream(gaps, b, huffman)[0] + _stream(codes, code_bits, huffman)[0]
        if best is None or total < best[0]:
            best = (total, b, gaps, codes)
    _, b, gaps, codes = best
    book = codebook.detach().cpu().numpy().astype(_VALUE_DTYPES[value_dtype])
    blobs = {f"{name}/codebook": book.tobytes()}
    fixed = packed_size(gaps.size, b) + packed_size(codes.size, code_bits) + book.nbytes
    for key, sym, nbits in (("index", gaps, b), ("codes", codes, code_bits)):
        _, lengths = _stream(sym, nbits, huffman)
        if lengths is None:
            blobs[f"{name}/{key}"] = pack_bits(sym, nbits)
        else:
            blobs[f"{name}/{key}"] = huffman_encode(sym, lengths)
            blobs[f"{name}/{key}_lengths"] = lengths.astype(np.uint8).tobytes()
    nbytes = sum(len(v) for v in blobs.values())
    used_huffman = any(key.endswith("_lengths") for key in blobs)
    rec = TensorRecord(name, tuple(index.shape), "shared", value_dtype, b, idx.size, int(np.count_nonzero(idx)),
                       gaps.size, nbytes, code_bits, used_huffman, k, fixed)
    return rec, blobs


def _bits_for(model: nn.Module, fqn: str, index_bits: int | str | Mapping[str, int | str]) -> int | str:
    """The index width of tensor ``fqn``: one value, or from a mapping by tensor name, layer name, then the
    layer's type ("conv" or "fc"); "auto" where the mapping says nothing (e.g. BatchNorm buffers)."""
    if not isinstance(index_bits, Mapping):
        return index_bits
    from ..masks import layer_kind

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
    from ..models import arch_of

    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"save_compressed: value_dtype must be one of {list(_VALUE_DTYPES)}; got {value_dtype!r}.")
    widths = index_bits.values() if isinstance(index_bits, Mapping) else [index_bits]
    if not widths or any(w != "auto" and not (isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 16)
                         for w in widths):
        raise ValueError(f"save_compressed: index_bits must be 'auto', an int in [1, 16], or a mapping "
                         f"{{conv|fc|layer: bits}}; got {index_bits!r}.")
    check_finite_model("save_compressed", model)
    state = effective_state_dict(model)
    records, blobs = [], {}
    for name, t in state.items():
        bits = _bits_for(model, name, index_bits)
        par = _parametrization(model, name)
        i8 = par if hasattr(par, "q") and hasattr(par, "scale") else None            # quantization.uniform
        sw = par if hasattr(par, "codebook") and hasattr(par, "index") else None     # quantization.kmeans
        bw = par if hasattr(par, "signs") and hasattr(par, "scale") else None        # quantization.binary
        hw = par if hasattr(par, "buckets") and hasattr(par, "seed") else None       # sharing.hashed
        pq = par if hasattr(par, "codebooks") and hasattr(par, "codes") else None    # quantization.pq
        if pq is not None:
            rec, b = _encode_pq(name, pq.codebooks.detach(), pq.codes, tuple(t.shape), value_dtype)
        elif hw is not None:
            mod_name, _, attr = name.rpartition(".")
            real = (model.get_submodule(mod_name) if mod_name else model).parametrizations[attr].original
            vals = real.detach().cpu().numpy().astype(_VALUE_DTYPES[value_dtype])
            if not np.isfinite(vals).all():
                raise ValueError(f"save_compressed: tensor {name!r} does not fit in {value_dtype} (overflow or NaN).")
            rec = TensorRecord(name, tuple(t.shape), "hashed", value_dtype, 0, t.numel(),
                               int(np.count_nonzero(vals)), vals.size, vals.nbytes, codebook_size=vals.size,
                               seed=int(hw.seed))
            b = {f"{name}/values": vals.tobytes()}
        elif bw is not None:
            bits = np.packbits(bw.signs.numpy().ravel() > 0, bitorder="little")
            scale = bw.scale.numpy().astype(np.float32).ravel()
            rec = TensorRecord(name, tuple(t.shape), "binary", "float32", 0, t.numel(), t.numel(), t.numel(),
                               bits.nbytes + scale.nbytes, code_bits=1, codebook_size=scale.size)
            b = {f"{name}/bits": bits.tobytes(), f"{name}/scale": scale.tobytes()}
        elif i8 is not None:
            q = i8.q.numpy().ravel()
            rec = TensorRecord(name, tuple(t.shape), "int8", "float32", 0, q.size, int(np.count_nonzero(q)), q.size,
                               q.nbytes + i8.scale.numel() * 4, code_bits=8, codebook_size=i8.scale.numel())
            b = {f"{name}/values": q.astype(np.int8).tobytes(), f"{name}/scale": i8.scale.numpy().tobytes()}
        elif sw is not None:
            rec, b = _encode_shared(name, sw.codebook, sw.index, value_dtype, bits, huffman)
        else:
            rec, b = _encode(name, t, value_dtype, bits)
        records.append(rec)
        blobs.update(b)
    header = {"format": "netsurgeon.nsz", "version": FORMAT_VERSION, "arch": arch or arch_of(model),
              "meta": meta or {}, "tensors": [_record_to_json(r) for r in records]}
    size = write_container(path, header, blobs)
    dense = sum(r.numel * 4 for r in records)
    return CompressedFile(str(path), size, dense, records, header)


def _encode_pq(name: str, books: Tensor, codes: Tensor, shape: tuple[int, ...], value_dtype: str
               ) -> tuple[TensorRecord, dict[str, bytes]]:
    """A ``pq`` record: the codebooks (T, S, k, sub_dim) as floats and the codes at ceil(log2 k) bits."""
    t, s, k, _ = books.shape
    vals = books.cpu().numpy().astype(_VALUE_DTYPES[value_dtype])
    if not np.isfinite(vals).all():
        raise ValueError(f"save_compressed: tensor {name!r} does not fit in {value_dtype} (overflow or NaN).")
    bits = max(1, (k - 1).bit_length())
    packed = pack_bits(codes.cpu().numpy().astype(np.int64).ravel(), bits)
    numel = int(np.prod(shape))
    rec = TensorRecord(name, shape, "pq", value_dtype, 0, numel, numel, codes.numel(), vals.nbytes + len(packed),
                       code_bits=bits, codebook_size=k, stages=t, subspaces=s)
    return rec, {f"{name}/codebook": vals.tobytes(), f"{name}/codes": packed}


def decode_pq(p: Path | str, rec: TensorRecord, blobs: dict[str, bytes]) -> tuple[Tensor, Tensor]:
    """The codebooks (T, S, k, sub_dim; float32) and codes (T, rows, S; int64) of a ``pq`` record."""
    t, rows, s, k, d = rec.pq_layout()
    dt = np.dtype(_VALUE_DTYPES.get(rec.value_dtype, np.float32))
    book_b, codes_b = blobs.get(f"{rec.name}/codebook", b""), blobs.get(f"{rec.name}/codes", b"")
    if len(book_b) != t * s * k * d * dt.itemsize or len(codes_b) != packed_size(rec.entries, rec.code_bits):
        raise NszError(f"{p}: tensor {rec.name!r}: pq streams have the wrong length.")
    books = np.frombuffer(book_b, dtype=dt).astype(np.float32)
    if not np.isfinite(books).all():
        raise NszError(f"{p}: tensor {rec.name!r}: the pq codebook holds NaN/inf values.")
    codes = unpack_bits(codes_b, rec.entries, rec.code_bits).astype(np.int64)
    if codes.size and int(codes.max()) >= k:
        raise NszError(f"{p}: tensor {rec.name!r}: a pq code is {int(codes.max())}, past the codebook's {k} entries.")
    return torch.from_numpy(books.copy()).reshape(t, s, k, d), torch.from_numpy(codes.copy()).reshape(t, rows, s)


def _record_to_json(r: TensorRecord) -> dict[str, Any]:
    return {"name": r.name, "shape": list(r.shape), "codec": r.codec, "value_dtype": r.value_dtype,
            "index_bits": r.index_bits, "numel": r.numel, "nonzero": r.nonzero, "entries": r.entries,
            "bytes": r.bytes, "code_bits": r.code_bits, "huffman": r.huffman, "codebook_size": r.codebook_size,
            "bytes_fixed": r.bytes_fixed, **({"seed": r.seed} if r.codec == "hashed" else {}),
            **({"stages": r.stages, "subspaces": r.subspaces} if r.codec == "pq" else {})}


def _int_stream(p: Path, rec: TensorRecord, blobs: dict[str, bytes], key: str, nbits: int) -> np.ndarray:
    data = blobs.get(f"{rec.name}/{key}")
    if data is None:
        raise NszError(f"{p}: tensor {rec.name!r}: missing {key} stream.")
    try:
        if f"{rec.name}/{key}_lengths" in blobs:  # each stream is Huffman-coded only where that was smaller
            lengths = np.frombuffer(blobs[f"{rec.name}/{key}_lengths"], dtype=np.uint8)
            if lengths.size != 1 << nbits:
                raise ValueError(f"{key} code table has {lengths.size} entries, expected {1 << nbits}")
            out = huffman_decode(data, lengths, rec.entries)
            used = encoded_bits(out, lengths)
            pad = 8 * len(data) - used  # bitarray writes big-endian bits: padding is the low bits of the last byte
            if pad >= 8 or pad < 0 or (pad and data[-1] & ((1 << pad) - 1)):
                raise ValueError(f"{key} stream holds {pad} bits after its {rec.entries} entries "
                                 "(the record's entry count does not match the stream)")
            return out
        if len(data) != packed_size(rec.entries, nbits):
            raise ValueError(f"{key} stream has the wrong length")
        return unpack_bits(data, rec.entries, nbits).astype(np.int64)
    except ValueError as e:
        raise NszError(f"{p}: tensor {rec.name!r}: {e}") from e


def decode_shared_parts(p: Path | str, rec: TensorRecord, blobs: dict[str, bytes]) -> tuple[Tensor, Tensor]:
    """The codebook (codebook_size,) float32 and the index (rec.shape, int64; 0 = zero) of a ``shared`` record."""
    p = Path(p)
    dt = np.dtype(_VALUE_DTYPES.get(rec.value_dtype, np.float32))
    book_b = blobs.get(f"{rec.name}/codebook", b"")
    if len(book_b) != rec.codebook_size * dt.itemsize:
        raise NszError(f"{p}: tensor {rec.name!r}: codebook has the wrong length.")
    book = np.frombuffer(book_b, dtype=dt).astype(np.float32)
    if not np.isfinite(book).all():
        raise NszError(f"{p}: tensor {rec.name!r}: the codebook holds NaN/inf values.")
    gaps = _int_stream(p, rec, blobs, "index", rec.index_bits)
    codes = _int_stream(p, rec, blobs, "codes", rec.code_bits)
    if codes.size and int(codes.max()) > rec.codebook_size:
        raise NszError(f"{p}: tensor {rec.name!r}: code {int(codes.max())} outside the codebook.")
    try:
        flat_codes = decode_relative(gaps, codes, rec.numel)
    except ValueError as e:
        raise NszError(f"{p}: tensor {rec.name!r}: {e}") from e
    return torch.from_numpy(book.copy()), torch.from_numpy(flat_codes.astype(np.int64)).reshape(rec.shape)


def _decode_shared(p: Path, rec: TensorRecord, blobs: dict[str, bytes]) -> Tensor:
    book, index = decode_shared_parts(p, rec, blobs)
    return torch.cat([book.new_zeros(1), book])[index]


def decode_int8(p: Path | str, rec: TensorRecord, blobs: dict[str, bytes]) -> tuple[Tensor, Tensor]:
    """The int8 values (rec.shape) and scales of an ``int8`` record."""
    vals, scale = blobs.get(f"{rec.name}/values", b""), blobs.get(f"{rec.name}/scale", b"")
    if len(vals) != rec.numel or len(scale) != 4 * rec.codebook_size:
        raise NszError(f"{p}: tensor {rec.name!r}: int8 streams have the wrong length.")
    q = torch.from_numpy(np.frombuffer(vals, dtype=np.int8).copy()).reshape(rec.shape)
    scales = np.frombuffer(scale, dtype=np.float32)
    if not np.isfinite(scales).all():
        raise NszError(f"{p}: tensor {rec.name!r}: the int8 scales hold NaN/inf values.")
    return q, torch.from_numpy(scales.copy()).reshape(
        (rec.codebook_size,) if rec.codebook_size > 1 else ())


def decode_binary(p: Path | str, rec: TensorRecord, blobs: dict[str, bytes]) -> tuple[Tensor, Tensor]:
    """The signs (int8 ±1, rec.shape) and scales of a ``binary`` record."""
    bits, scale = blobs.get(f"{rec.name}/bits", b""), blobs.get(f"{rec.name}/scale", b"")
    if len(bits) != (rec.numel + 7) // 8 or len(scale) != 4 * rec.codebook_size:
        raise NszError(f"{p}: tensor {rec.name!r}: binary streams have the wrong length.")
    ones = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=rec.numel, bitorder="little")
    signs = torch.from_numpy(ones.astype(np.int8) * 2 - 1).reshape(rec.shape)
    scales = np.frombuffer(scale, dtype=np.float32)
    if not np.isfinite(scales).all():
        raise NszError(f"{p}: tensor {rec.name!r}: the binary scales hold NaN/inf values.")
    return signs, torch.from_numpy(scales.copy()).reshape((rec.codebook_size,) if rec.codebook_size > 1 else ())


def decode_hashed(p: Path | str, rec: TensorRecord, blobs: dict[str, bytes]) -> Tensor:
    """The K real weights (float32) of a ``hashed`` record."""
    dt = np.dtype(_VALUE_DTYPES.get(rec.value_dtype, np.float32))
    vals = blobs.get(f"{rec.name}/values", b"")
    if len(vals) != rec.codebook_size * dt.itemsize:
        raise NszError(f"{p}: tensor {rec.name!r}: hashed value stream has the wrong length.")
    return torch.from_numpy(np.frombuffer(vals, dtype=dt).astype(np.float32))


def _decode(p: Path, rec: TensorRecord, blobs: dict[str, bytes]) -> Tensor:
    if rec.codec == "pq":
        from ..quantization.pq import ProductQuantized

        books, codes = decode_pq(p, rec, blobs)
        with torch.no_grad():
            return ProductQuantized(books, codes, rec.shape)(torch.empty(0))
    if rec.codec == "hashed":
        from .hashing import hash_maps

        idx, sign = hash_maps(rec.shape, rec.codebook_size, rec.seed)
        return decode_hashed(p, rec, blobs)[idx] * sign
    if rec.codec == "binary":
        signs, scale = decode_binary(p, rec, blobs)
        return signs.float() * (scale.view(-1, *([1] * (signs.dim() - 1))) if scale.dim() else scale)
    if rec.codec == "shared":
        return _decode_shared(p, rec, blobs)
    if rec.codec == "int8":
        q, scale = decode_int8(p, rec, blobs)
        return q.float() * (scale.view(-1, *([1] * (q.dim() - 1))) if scale.dim() else scale)
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


def read_header(path: str | os.PathLike[str], *, max_elements: int | None = None) -> CompressedFile:
    """Read and validate a ``.nsz`` file's header and streams without decoding any tensor.

    Every field is typed and bounded and every stream's length checked against its record (``coding.schema``);
    the file may declare at most ``max_elements`` elements (default :func:`~netsurgeon.coding.schema.
    max_elements_for` its size). The returned description keeps the raw streams for :func:`decode_state`.

    Raises:
        NszError: missing, truncated, corrupt, of a newer version, or a header that fails the schema.
    """
    p = Path(path)
    header, blobs = read_container(p)
    if header.get("format") != "netsurgeon.nsz":
        raise NszError(f"{p}: not a netsurgeon model file (format {str(header.get('format'))[:40]!r}).")
    if header.get("version") not in _READABLE:
        raise NszError(f"{p}: format version {str(header.get('version'))[:20]} is not supported "
                       f"(this netsurgeon reads versions {', '.join(map(str, _READABLE))}).")
    size = os.path.getsize(p)
    records = parse_records(str(p), header, blobs, max_elements if max_elements is not None else max_elements_for(size))
    check_arch(str(p), header.get("arch"))
    meta = header.get("meta", {})
    if meta is not None and not isinstance(meta, dict):
        raise NszError(f"{p}: the header's 'meta' must be a mapping.")
    return CompressedFile(str(p), size, sum(r.numel * 4 for r in records), records, header, blobs)


def decode_state(info: CompressedFile) -> dict[str, Tensor]:
    """Decode every tensor of a validated file (float tensors as float32); a stream that does not decode to
    exactly what its record declares is an NszError naming the tensor."""
    assert info.blobs is not None
    p, state = Path(info.path), {}
    for r in info.records:
        try:
            state[r.name] = _decode(p, r, info.blobs)
        except NszError:
            raise
        except (ValueError, TypeError, OverflowError, IndexError) as e:
            raise NszError(f"{p}: tensor {r.name!r}: {' '.join(str(e).split())[:200]}") from e
    return state


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
