"""The ``pq`` form: vector-quantized weights (Gong et al. 2014, arXiv:1412.6115, Sec. 3.3-3.4; Q-CNN's layout for
convolutions, Wu et al. 2016; ``quantization.pq``).

A weight is read as rows of vectors along its input dimension ((out, in) for Linear, (out·kh·kw, in) for a
convolution); the stored form is codebooks (T stages, S subspaces, k centroids, sub_dim) and codes (T, rows, S):
``W[row, segment s] = Σ_t codebooks[t, s, codes[t, row, s]]`` (the last segment truncated). In the file: the
codebook floats plus the codes at ceil(log2 k) bits each; the record carries ``stages`` and ``subspaces``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.bits import pack_bits, packed_size, unpack_bits
from ..coding.container import NszError
from ..coding.schema import MAX_STREAM_BITS, VALUE_ITEMSIZE, TensorRecord, need_blob
from . import EncodeOptions, Form, as_numpy, read_values, register_form, value_array

__all__ = ["ProductQuantized", "PQ", "from_rows"]


def from_rows(rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The weight of ``shape`` from its rows (the inverse of ``quantization.pq.rows_of``)."""
    if len(shape) == 2:
        return rows.reshape(shape)
    out, cin, *k = shape
    return rows.reshape(out, *k, cin).movedim(-1, 1)


class ProductQuantized(nn.Module):
    """Parametrization: the weight rebuilt from ``codebooks`` (T, S, k, sub_dim; trainable) and ``codes``
    (T, rows, S; a buffer) for a weight of ``shape`` (see the module docstring)."""

    def __init__(self, codebooks: Tensor, codes: Tensor, shape: tuple[int, ...]) -> None:
        super().__init__()
        t, s, k, d = codebooks.shape
        cols = shape[1]
        rows = math.prod(shape) // cols
        if codes.shape != (t, rows, s) or s * d < cols or (s - 1) * d >= cols:
            raise ValueError(f"ProductQuantized: codebooks {list(codebooks.shape)} and codes {list(codes.shape)} do "
                             f"not describe a weight of shape {list(shape)}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"ProductQuantized: codes must lie in [0, {k}).")
        self.codebooks = nn.Parameter(codebooks.float().clone())
        self.register_buffer("codes", codes.long())
        self.shape = tuple(shape)

    def forward(self, w: Tensor) -> Tensor:
        t, s, k, d = self.codebooks.shape
        seg = torch.arange(s, device=self.codebooks.device)
        rows = sum(self.codebooks[i][seg[None, :], self.codes[i]] for i in range(t))  # (rows, S, d)
        rows = rows.reshape(rows.shape[0], s * d)[:, : self.shape[1]]
        return from_rows(rows, self.shape)


def _layout(rec: TensorRecord) -> tuple[int, int, int, int, int]:
    """(stages T, rows, subspaces S, centroids k, sub_dim) of a pq record."""
    cols = rec.shape[1]
    s = rec.extra["subspaces"]
    return rec.extra["stages"], rec.numel // cols, s, rec.codebook_size, -(-cols // s)


@register_form
class PQ(Form):
    codec = "pq"
    weight_form = "pq"
    text = "vector-quantized weights (codebooks + codes)"
    parametrization = ProductQuantized
    value_dtypes = ("float32", "float16")
    fields = {"stages": (1, 16, None), "subspaces": (1, 1 << 40, None)}
    rank = 10

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        assert isinstance(par, ProductQuantized)
        t, s, k, _ = par.codebooks.shape
        vals = value_array(name, par.codebooks, opts.value_dtype)
        bits = max(1, (k - 1).bit_length())
        packed = pack_bits(as_numpy(par.codes).astype(np.int64), bits)
        shape = tuple(value.shape)
        numel = int(np.prod(shape))
        rec = TensorRecord(name, shape, "pq", opts.value_dtype, 0, numel, numel, par.codes.numel(),
                           vals.nbytes + len(packed), code_bits=bits, codebook_size=k,
                           extra={"stages": t, "subspaces": s})
        return rec, {f"{name}/codebook": vals.tobytes(), f"{name}/codes": packed}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        # codebooks (T, S, k, sub_dim) and T x rows x S codes of code_bits bits
        cols = rec.shape[1] if len(rec.shape) >= 2 else 0
        stages, subspaces = rec.extra["stages"], rec.extra["subspaces"]
        if (cols == 0 or not 1 <= subspaces <= cols or rec.index_bits != 0
                or not 1 <= rec.code_bits <= MAX_STREAM_BITS or not 1 <= rec.codebook_size <= (1 << rec.code_bits)):
            raise NszError(f"{where}: a pq record needs a shape of 2+ dimensions, 1 <= stages <= 16, 1 <= subspaces "
                           f"<= shape[1], index_bits 0, 1 <= code_bits <= {MAX_STREAM_BITS} and 1 <= codebook_size "
                           f"<= 2**code_bits; got shape {list(rec.shape)}, stages {stages}, subspaces "
                           f"{subspaces}, code_bits {rec.code_bits}, codebook_size {rec.codebook_size}.")
        t, rows, sub, k, d = _layout(rec)
        if rec.entries != t * rows * sub:
            raise NszError(f"{where}: a pq record holds stages x rows x subspaces = {t * rows * sub} codes; field "
                           f"'entries' is {rec.entries}.")
        return [need_blob(where, rec, blobs, "codebook", t * sub * k * d * VALUE_ITEMSIZE[rec.value_dtype]),
                need_blob(where, rec, blobs, "codes", packed_size(rec.entries, rec.code_bits))]

    def _parts(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> tuple[Tensor, Tensor]:
        t, rows, s, k, d = _layout(rec)
        books = read_values(where, blobs.get(f"{rec.name}/codebook"), t * s * k * d, rec.value_dtype, "pq codebook")
        codes_b = blobs.get(f"{rec.name}/codes", b"")
        if len(codes_b) != packed_size(rec.entries, rec.code_bits):
            raise NszError(f"{where}: pq streams have the wrong length.")
        codes = unpack_bits(codes_b, rec.entries, rec.code_bits).astype(np.int64)
        if codes.size and int(codes.max()) >= k:
            raise NszError(f"{where}: a pq code is {int(codes.max())}, past the codebook's {k} entries.")
        return torch.from_numpy(books.copy()).reshape(t, s, k, d), torch.from_numpy(codes.copy()).reshape(t, rows, s)

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        with torch.no_grad():
            return ProductQuantized(*self._parts(where, rec, blobs), rec.shape)(torch.empty(0))

    def attach(self, module, attr, where, rec, blobs) -> bool:
        from torch.nn.utils import parametrize

        par = ProductQuantized(*self._parts(where, rec, blobs), rec.shape)
        parametrize.register_parametrization(module, attr, par, unsafe=True)
        return True
