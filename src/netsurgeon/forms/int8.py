"""The ``int8`` form: post-training int8 weights (``quantization.uniform``): raw int8 codes plus float32 scales,
one per output channel or one per tensor (symmetric: w = q * scale)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.container import NszError
from ..coding.schema import TensorRecord, need_blob
from . import EncodeOptions, Form, as_numpy, read_values, register_form

__all__ = ["Int8Weights", "Int8", "dequantize"]


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` with one scale per output channel (dim 0) or one in all."""
    view = scale.view(-1, *([1] * (q.dim() - 1))) if scale.dim() else scale
    return q.float() * view


class Int8Weights(nn.Module):
    """Parametrization holding int8 weights and their scales (post-training quantized); forward dequantizes."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, w: Tensor) -> Tensor:
        return dequantize(self.q, self.scale)


def _decode_parts(where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> tuple[Tensor, Tensor]:
    vals = blobs.get(f"{rec.name}/values", b"")
    if len(vals) != rec.numel:
        raise NszError(f"{where}: int8 streams have the wrong length.")
    q = torch.from_numpy(np.frombuffer(vals, dtype=np.int8).copy()).reshape(rec.shape)
    scales = read_values(where, blobs.get(f"{rec.name}/scale"), rec.codebook_size, "float32", "int8 scale")
    return q, torch.from_numpy(scales.copy()).reshape((rec.codebook_size,) if rec.codebook_size > 1 else ())


@register_form
class Int8(Form):
    codec = "int8"
    runtime_names = ("int8",)
    weight_form = "int8"
    text = "int8 weights"
    parametrization = Int8Weights
    rank = 40

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        assert isinstance(par, Int8Weights)
        q = as_numpy(par.q)
        scale = as_numpy(par.scale).astype(np.float32)
        rec = TensorRecord(name, tuple(value.shape), "int8", "float32", 0, q.size, int(np.count_nonzero(q)), q.size,
                           q.nbytes + scale.size * 4, code_bits=8, codebook_size=scale.size)
        return rec, {f"{name}/values": q.astype(np.int8).tobytes(), f"{name}/scale": scale.tobytes()}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        channels = rec.shape[0] if rec.shape else 1
        if rec.codebook_size not in (1, channels) or rec.code_bits not in (0, 8):
            raise NszError(f"{where}: an int8 record needs 1 or {channels} scales (one per output channel) and "
                           f"8-bit codes; got codebook_size {rec.codebook_size}, code_bits {rec.code_bits}.")
        return [need_blob(where, rec, blobs, "values", rec.numel),
                need_blob(where, rec, blobs, "scale", 4 * rec.codebook_size)]

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        return dequantize(*_decode_parts(where, rec, blobs))

    def attach(self, module, attr, where, rec, blobs) -> bool:
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(module, attr, Int8Weights(*_decode_parts(where, rec, blobs)),
                                             unsafe=True)
        return True

    def parts(self, par, weight):
        return {"q": par.q, "scale": par.scale}

    def linear_candidates(self, layers, relus, names, density):
        from ..kernels.modules import Int8Chain

        return {"int8": Int8Chain([{"q": self._par(m).q, "scale": self._par(m).scale, "bias": m.bias, "relu": r}
                                   for m, r in zip(layers, relus, strict=True)], names)}

    @staticmethod
    def _par(m: nn.Module) -> Int8Weights:
        from . import stored_parametrization

        par = stored_parametrization(m, "weight")[1]
        assert isinstance(par, Int8Weights)
        return par

    def onnx(self, graph, rec, weight, parts):
        return qdq_nodes(graph, rec, parts, "int8 + DequantizeLinear (QDQ)")


def qdq_nodes(g, rec: TensorRecord, parts: dict[str, Tensor], text: str) -> str | None:
    """``DequantizeLinear`` of int8 codes with per-output-channel (or one) scales: the ONNX form of int8 and
    binary weights (ONNX has no 1-bit type; ±1 signs travel as int8, 4x smaller than float32)."""
    if len(rec.shape) < 2:
        return None
    q, scale = parts["q"].numpy(), parts["scale"].numpy().astype(np.float32)
    g.node("DequantizeLinear", [g.const(q), g.const(scale), g.const(np.zeros(scale.shape, np.int8))],
           output=rec.name, **({"axis": 0} if scale.ndim == 1 else {}))
    return text
