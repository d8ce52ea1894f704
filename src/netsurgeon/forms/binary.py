"""The ``binary`` form: binarized weights (BinaryConnect, BNN, XNOR-Net; ``quantization.binary``) as one bit per
weight (1 = +1; little-endian bit order within each byte, row-major) plus float32 scales (one, or one per output
channel): w = sign * scale."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.container import NszError
from ..coding.schema import TensorRecord, need_blob
from . import EncodeOptions, Form, as_numpy, read_values, register_form, stored_parametrization
from .int8 import qdq_nodes

__all__ = ["BinaryWeights", "Binary", "binary_parts"]


class BinaryWeights(nn.Module):
    """The stored form: ``signs`` (int8, ±1) and ``scale`` (one per output channel, or one); forward gives
    signs · scale. A ``.nsz`` file holds it as one bit per weight plus the float32 scales."""

    def __init__(self, signs: Tensor, scale: Tensor) -> None:
        super().__init__()
        if signs.dtype != torch.int8 or not bool(((signs == 1) | (signs == -1)).all()):
            raise ValueError("BinaryWeights: signs must be an int8 tensor of ±1.")
        if scale.dim() > 1 or (scale.dim() == 1 and scale.numel() != signs.shape[0]):
            raise ValueError(f"BinaryWeights: need one scale or one per output channel ({signs.shape[0]}); "
                             f"got shape {list(scale.shape)}.")
        self.register_buffer("signs", signs)
        self.register_buffer("scale", scale.float())

    def forward(self, w: Tensor) -> Tensor:
        s = self.scale.view(-1, *([1] * (self.signs.dim() - 1))) if self.scale.dim() else self.scale
        return self.signs.to(s.dtype) * s


def binary_parts(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The (signs, scale) of a layer whose weight is held binary, else None."""
    _, par = stored_parametrization(m, "weight")
    return (par.signs, par.scale) if isinstance(par, BinaryWeights) else None


def _decode_parts(where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> tuple[Tensor, Tensor]:
    bits = blobs.get(f"{rec.name}/bits", b"")
    if len(bits) != (rec.numel + 7) // 8:
        raise NszError(f"{where}: binary streams have the wrong length.")
    ones = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=rec.numel, bitorder="little")
    signs = torch.from_numpy(ones.astype(np.int8) * 2 - 1).reshape(rec.shape)
    scales = read_values(where, blobs.get(f"{rec.name}/scale"), rec.codebook_size, "float32", "binary scale")
    return signs, torch.from_numpy(scales.copy()).reshape((rec.codebook_size,) if rec.codebook_size > 1 else ())


@register_form
class Binary(Form):
    codec = "binary"
    runtime_names = ("lut",)
    weight_form = "binary"
    text = "binary weights (one bit each, plus scales)"
    parametrization = BinaryWeights
    rank = 30

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        assert isinstance(par, BinaryWeights)
        bits = np.packbits(as_numpy(par.signs) > 0, bitorder="little")
        scale = as_numpy(par.scale).astype(np.float32)
        n = value.numel()
        rec = TensorRecord(name, tuple(value.shape), "binary", "float32", 0, n, n, n, bits.nbytes + scale.nbytes,
                           code_bits=1, codebook_size=scale.size)
        return rec, {f"{name}/bits": bits.tobytes(), f"{name}/scale": scale.tobytes()}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        channels = rec.shape[0] if rec.shape else 1
        if rec.codebook_size not in (1, channels) or rec.code_bits != 1 or rec.index_bits != 0:
            raise NszError(f"{where}: a binary record needs 1 or {channels} scales, code_bits 1 and index_bits 0; "
                           f"got codebook_size {rec.codebook_size}, code_bits {rec.code_bits}, index_bits "
                           f"{rec.index_bits}.")
        return [need_blob(where, rec, blobs, "bits", (rec.numel + 7) // 8),
                need_blob(where, rec, blobs, "scale", 4 * rec.codebook_size)]

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        signs, scale = _decode_parts(where, rec, blobs)
        return signs.float() * (scale.view(-1, *([1] * (signs.dim() - 1))) if scale.dim() else scale)

    def attach(self, module, attr, where, rec, blobs) -> bool:
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(module, attr, BinaryWeights(*_decode_parts(where, rec, blobs)),
                                             unsafe=True)
        return True

    def parts(self, par, weight):
        return {"q": par.signs, "scale": par.scale}

    def linear_candidates(self, layers, relus, names, density):
        """±1 weights, real inputs (BinaryConnect, a BNN's first layer): the product by table lookup. A layer
        whose input is binarized too gets XNOR + popcount from the runtime's binary pass instead."""
        from ..kernels import fused as kernels
        from ..kernels.modules import SignLutLinear
        from . import chain

        if not kernels.available():
            return {}
        return {"lut": chain([SignLutLinear(m, *binary_parts(m)) for m in layers], relus)}  # type: ignore[misc]

    def onnx(self, graph, rec, weight, parts):
        return qdq_nodes(graph, rec, parts, "±1 as int8 + DequantizeLinear (QDQ)")
