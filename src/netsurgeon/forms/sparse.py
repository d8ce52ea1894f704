"""The ``sparse`` form: Deep Compression's relative indices (Han, Mao, Dally 2016, arXiv:1510.00149, Sec. 2).

The nonzeros of the flattened tensor are stored as (gap, value) pairs: gaps bit-packed at ``index_bits`` bits,
a step too long for them bridged by filler zeros (``coding.sparse``). ``index_bits="auto"`` tries 1..16 bits and
keeps the smallest stream. The writer uses this form only where it is smaller than dense.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.bits import pack_bits, packed_size, unpack_bits
from ..coding.container import NszError
from ..coding.schema import MAX_STREAM_BITS, VALUE_ITEMSIZE, TensorRecord, need_blob
from ..coding.sparse import best_index_bits, decode_relative, encode_relative, relative_entries
from . import EncodeOptions, Form, chain, register_form, value_array
from ._linear import float_linear_candidates
from ._onnx import sparse_values

__all__ = ["Sparse"]


@register_form
class Sparse(Form):
    codec = "sparse"
    runtime_names = ("fused", "csr", "ell", "sparse_conv")
    weight_form = "float"
    text = "float weights"
    value_dtypes = ("float32", "float16")
    preference = 50

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]] | None:
        if not value.is_floating_point():
            return None
        vals = value_array(name, value, opts.value_dtype)
        vbits = vals.itemsize * 8
        if opts.index_bits == "auto":
            bits, sparse_bits = best_index_bits(vals, vbits)
        else:
            bits = int(opts.index_bits)
            sparse_bits = relative_entries(np.flatnonzero(vals), bits) * (bits + vbits)
        if sparse_bits + 16 >= vals.size * vbits:  # sparse streams pay two byte-roundings
            return None
        gaps, svals = encode_relative(vals, bits)
        idx = pack_bits(gaps, bits)
        rec = TensorRecord(name, tuple(value.shape), "sparse", opts.value_dtype, bits, vals.size,
                           int(np.count_nonzero(vals)), gaps.size, len(idx) + svals.nbytes)
        return rec, {f"{name}/index": idx, f"{name}/values": svals.tobytes()}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        if not 1 <= rec.index_bits <= MAX_STREAM_BITS:
            raise NszError(f"{where}: field 'index_bits' must be in [1, {MAX_STREAM_BITS}]; got {rec.index_bits}.")
        return [need_blob(where, rec, blobs, "values", rec.entries * VALUE_ITEMSIZE[rec.value_dtype]),
                need_blob(where, rec, blobs, "index", packed_size(rec.entries, rec.index_bits))]

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        dt = np.float16 if rec.value_dtype == "float16" else np.float32
        vals_b, idx_b = blobs.get(f"{rec.name}/values"), blobs.get(f"{rec.name}/index")
        if vals_b is None or len(vals_b) != rec.entries * np.dtype(dt).itemsize:
            raise NszError(f"{where}: value stream has the wrong length.")
        if idx_b is None or len(idx_b) != packed_size(rec.entries, rec.index_bits):
            raise NszError(f"{where}: index stream has the wrong length.")
        try:
            flat = decode_relative(unpack_bits(idx_b, rec.entries, rec.index_bits), np.frombuffer(vals_b, dtype=dt),
                                   rec.numel)
        except ValueError as e:
            raise NszError(f"{where}: {e}") from e
        return torch.from_numpy(flat.copy()).reshape(rec.shape).float()

    def linear_candidates(self, layers, relus, names, density):
        out = float_linear_candidates(layers, relus, names, density)
        from ..kernels import simd
        from ..kernels.sparse_linear import SparseLinear
        from .nm import MIN_KERNEL_WEIGHTS

        if density <= 0.5 and simd.available() and sum(m.weight.numel() for m in layers) >= MIN_KERNEL_WEIGHTS:
            # sliced ELL in 16-row chunks, inputs from registers (kernels/sparse_linear.py): one module per layer
            out["ell"] = chain([SparseLinear.from_dense(m.weight, m.bias, "relu" if r else None)
                                for m, r in zip(layers, relus, strict=True)], [False] * len(layers))
        return out

    def conv_candidates(self, conv, density):
        """A direct sparse convolution over the nonzero taps (kernels/sparse_conv.py), where at most half the
        taps are kept and the layer is large enough for the kernel's fixed cost to pay."""
        from ..kernels import simd
        from ..kernels.sparse_conv import SparseConv2d
        from .nm import MIN_KERNEL_WEIGHTS

        if (density > 0.5 or not simd.available() or conv.weight.numel() < MIN_KERNEL_WEIGHTS // 4
                or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or conv.stride[0] != conv.stride[1]):
            return {}
        return {"sparse_conv": SparseConv2d.from_conv(conv)}

    def onnx(self, graph, rec, weight, parts):
        return sparse_values(graph, weight, rec.value_dtype)
