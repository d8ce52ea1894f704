"""The ``shared`` form: k-means weight sharing (Han, Mao, Dally 2016, "Deep Compression", arXiv:1510.00149,
Sec. 3, stored as in Sec. 2 and Huffman-coded as in Sec. 4).

In memory a weight is ``[0, codebook][index]`` (:class:`SharedWeights`; index 0 = a pruned zero). In the file:
relative gaps to the nonzeros and their codebook indices, each stream Huffman-coded with canonical codes whose
lengths are stored (or bit-packed where that is smaller, or with ``huffman=False``), plus the codebook.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.bits import pack_bits, packed_size, unpack_bits
from ..coding.container import NszError
from ..coding.huffman import encoded_bits, huffman_code_lengths, huffman_decode, huffman_encode
from ..coding.schema import MAX_STREAM_BITS, VALUE_ITEMSIZE, TensorRecord, need_blob, stream_blobs
from ..coding.sparse import decode_relative, encode_relative
from . import EncodeOptions, Form, as_numpy, register_form, stored_parametrization, value_array
from ._linear import float_linear_candidates

__all__ = ["SharedWeights", "Shared"]


class SharedWeights(nn.Module):
    """Parametrization ``W -> [0, codebook][index]``: every weight is one of the shared values (or zero).

    ``codebook`` is trainable (centroid fine-tuning); ``index`` is a buffer, 0 meaning a pruned weight.
    """

    def __init__(self, codebook: Tensor, index: Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.float().clone())
        self.register_buffer("index", index.long())

    def forward(self, w: Tensor) -> Tensor:
        table = torch.cat([self.codebook.new_zeros(1), self.codebook])
        # index_select, not table[index]: advanced indexing's backward accumulates into the codebook with atomic adds
        # on several threads (run-to-run differences of 1e-3 per step); index_select's backward sums in order
        return torch.index_select(table, 0, self.index.reshape(-1)).view(self.index.shape)


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


def _int_stream(where: str, rec: TensorRecord, blobs: Mapping[str, bytes], key: str, nbits: int) -> np.ndarray:
    data = blobs.get(f"{rec.name}/{key}")
    if data is None:
        raise NszError(f"{where}: missing {key} stream.")
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
        raise NszError(f"{where}: {e}") from e


@register_form
class Shared(Form):
    codec = "shared"
    runtime_names = ("fused", "csr")
    weight_form = "shared"
    text = "k-means-shared weights (codebook + indices)"
    parametrization = SharedWeights
    value_dtypes = ("float32", "float16")
    rank = 50

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        assert isinstance(par, SharedWeights)
        idx = as_numpy(par.index).astype(np.int64)
        k = par.codebook.numel()
        code_bits = max(1, int(k).bit_length())            # codes 0..k
        candidates = range(1, 13) if opts.index_bits == "auto" else [int(opts.index_bits)]
        best = None
        for b in candidates:
            gaps, codes = encode_relative(idx, b)
            total = _stream(gaps, b, opts.huffman)[0] + _stream(codes, code_bits, opts.huffman)[0]
            if best is None or total < best[0]:
                best = (total, b, gaps, codes)
        assert best is not None
        _, b, gaps, codes = best
        book = value_array(name, par.codebook, opts.value_dtype)
        blobs = {f"{name}/codebook": book.tobytes()}
        fixed = packed_size(gaps.size, b) + packed_size(codes.size, code_bits) + book.nbytes
        for key, sym, nbits in (("index", gaps, b), ("codes", codes, code_bits)):
            _, lengths = _stream(sym, nbits, opts.huffman)
            if lengths is None:
                blobs[f"{name}/{key}"] = pack_bits(sym, nbits)
            else:
                blobs[f"{name}/{key}"] = huffman_encode(sym, lengths)
                blobs[f"{name}/{key}_lengths"] = lengths.astype(np.uint8).tobytes()
        nbytes = sum(len(v) for v in blobs.values())
        used_huffman = any(key.endswith("_lengths") for key in blobs)
        rec = TensorRecord(name, tuple(par.index.shape), "shared", opts.value_dtype, b, idx.size,
                           int(np.count_nonzero(idx)), gaps.size, nbytes, code_bits, used_huffman, k, fixed)
        return rec, blobs

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        if not 1 <= rec.index_bits <= MAX_STREAM_BITS:
            raise NszError(f"{where}: field 'index_bits' must be in [1, {MAX_STREAM_BITS}]; got {rec.index_bits}.")
        # codes 0..k (0 = zero) in code_bits bits
        if not 1 <= rec.code_bits <= MAX_STREAM_BITS or not 1 <= rec.codebook_size < (1 << rec.code_bits):
            raise NszError(f"{where}: a shared record needs 1 <= code_bits <= {MAX_STREAM_BITS} and 1 <= "
                           f"codebook_size < 2**code_bits; got code_bits {rec.code_bits}, codebook_size "
                           f"{rec.codebook_size}.")
        return [need_blob(where, rec, blobs, "codebook", rec.codebook_size * VALUE_ITEMSIZE[rec.value_dtype]),
                *stream_blobs(where, rec, blobs, "index", rec.index_bits),
                *stream_blobs(where, rec, blobs, "codes", rec.code_bits)]

    def decode_parts(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> tuple[Tensor, Tensor]:
        """The codebook (codebook_size,) float32 and the index (rec.shape, int64; 0 = zero)."""
        from . import read_values

        book = read_values(where, blobs.get(f"{rec.name}/codebook"), rec.codebook_size, rec.value_dtype, "codebook")
        gaps = _int_stream(where, rec, blobs, "index", rec.index_bits)
        codes = _int_stream(where, rec, blobs, "codes", rec.code_bits)
        if codes.size and int(codes.max()) > rec.codebook_size:
            raise NszError(f"{where}: code {int(codes.max())} outside the codebook.")
        try:
            flat_codes = decode_relative(gaps, codes, rec.numel)
        except ValueError as e:
            raise NszError(f"{where}: {e}") from e
        return torch.from_numpy(book.copy()), torch.from_numpy(flat_codes.astype(np.int64)).reshape(rec.shape)

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        book, index = self.decode_parts(where, rec, blobs)
        return torch.cat([book.new_zeros(1), book])[index]

    def attach(self, module, attr, where, rec, blobs) -> bool:
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(module, attr, SharedWeights(*self.decode_parts(where, rec, blobs)),
                                             unsafe=True)
        return True

    def describe(self, rec: TensorRecord) -> str:
        return f"shared/{rec.codebook_size}{'+H' if rec.huffman else ''}"

    def parts(self, par, weight):
        return {"book": par.codebook.detach(), "index": par.index}

    def linear_candidates(self, layers, relus, names, density):
        held = [stored_parametrization(m, "weight")[1] for m in layers]
        return float_linear_candidates(layers, relus, names, density,
                                       codebooks=[(p.codebook.detach(), p.index) for p in held])

    def onnx(self, graph, rec, weight, parts):
        from onnx import TensorProto

        from ._onnx import scatter

        g, shape = graph, tuple(weight.shape)
        nz = np.flatnonzero(weight.reshape(-1))
        index = parts["index"].numpy().reshape(-1)
        table = g.const(np.concatenate([[0.0], parts["book"].numpy()]).astype(np.float32))
        if nz.size < 0.5 * index.size:
            codes = g.node("Cast", [g.const(index[nz].astype(np.uint8))], to=TensorProto.INT32)
            scatter(g, nz, g.node("Gather", [table, codes], axis=0), shape)
            return "positions (gaps) + uint8 codes -> Gather + ScatterElements"
        codes = g.node("Cast", [g.const(index.astype(np.uint8))], to=TensorProto.INT32)
        flat_w = g.node("Gather", [table, codes], axis=0)
        g.node("Reshape", [flat_w, g.const(np.array(shape, np.int64))], output=rec.name)
        return "uint8 codes -> Gather"
