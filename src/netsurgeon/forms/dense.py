"""The ``dense`` form: every value stored raw (float32 or float16; integer buffers as int64)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.container import NszError
from ..coding.schema import VALUE_ITEMSIZE, TensorRecord, need_blob
from . import EncodeOptions, Form, as_numpy, register_form, value_array
from ._onnx import sparse_values

__all__ = ["Dense"]


@register_form
class Dense(Form):
    codec = "dense"
    weight_form = "float"
    text = "float weights"
    value_dtypes = ("float32", "float16", "int64")
    preference = 90  # the fallback: every tensor can be stored dense

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        shape = tuple(value.shape)
        if not value.is_floating_point():
            raw = as_numpy(value).astype(np.int64)
            rec = TensorRecord(name, shape, "dense", "int64", 0, raw.size, int(np.count_nonzero(raw)), raw.size,
                               raw.nbytes)
            return rec, {f"{name}/values": raw.tobytes()}
        vals = value_array(name, value, opts.value_dtype)
        rec = TensorRecord(name, shape, "dense", opts.value_dtype, 0, vals.size, int(np.count_nonzero(vals)),
                           vals.size, vals.nbytes)
        return rec, {f"{name}/values": vals.tobytes()}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        if rec.index_bits != 0 or rec.entries != rec.numel:
            raise NszError(f"{where}: a dense record needs index_bits 0 and entries = numel ({rec.numel}); got "
                           f"{rec.index_bits} and {rec.entries}.")
        return [need_blob(where, rec, blobs, "values", rec.numel * VALUE_ITEMSIZE[rec.value_dtype])]

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        dt = {"float32": np.float32, "float16": np.float16, "int64": np.int64}[rec.value_dtype]
        data = blobs.get(f"{rec.name}/values")
        if data is None or len(data) != rec.numel * np.dtype(dt).itemsize:
            raise NszError(f"{where}: value stream has the wrong length.")
        out = torch.from_numpy(np.frombuffer(data, dtype=dt).copy()).reshape(rec.shape)
        return out.float() if out.is_floating_point() else out

    def onnx(self, graph, rec, weight, parts):  # a dense record of a very sparse tensor (rare): still compact
        return sparse_values(graph, weight, rec.value_dtype)
