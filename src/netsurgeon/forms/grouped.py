"""The ``grouped`` form: weight-only quantization with one scale (and zero point) per group of input columns of a
row, as GPTQ and round-to-nearest leave it (Frantar et al. 2023, arXiv:2210.17323; ``quantization/groupwise.py``,
``quantization/gptq.py``).

In memory (:class:`GroupQuantWeights`): uint8 codes (out, in), in GPTQ's column order when act-order permuted the
columns (``perm``: column c of the codes is input ``perm[c]``), scales (out, groups) and zero points (out, groups)
or the symmetric grid's 2^(bits-1); a weight w = scale · (code − zero). Zero is always on the grid, so pruned
weights stay exact zeros.

In the file, per record: ``code_bits`` = bits (2..8); fields ``group_size`` (0: one group per row),
``zero_points``, ``act_order`` and ``transposed`` (0/1; a Hugging Face Conv1D weight stored (in, out));
``codebook_size`` = the number of scales (rows x groups). Blobs: ``codes``, each row's codes bit-packed at
``bits`` bits (little-endian within each byte, so 4-bit codes are two per byte with the even column in the low
nibble, the layout the runtime reads) and padded to a whole byte; ``scales`` in the record's value dtype;
``zeros`` (with zero points) packed at ``bits`` bits; ``perm`` (with act-order) as uint16 (uint32 past 65,536
columns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.bits import pack_bits, packed_size, unpack_bits
from ..coding.container import NszError
from ..coding.schema import VALUE_ITEMSIZE, TensorRecord, need_blob
from . import EncodeOptions, Form, as_numpy, chain, read_values, register_form, stored_parametrization, value_array

__all__ = ["GroupQuantWeights", "Grouped", "dequantize", "dequantize_codes", "groups_of", "row_bytes"]


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """scale · (q − zero)."""
    return scale * (q - zero)


def groups_of(d: int, group_size: int | None) -> int:
    return 1 if group_size is None or group_size >= d else math.ceil(d / group_size)


def dequantize_codes(q: Tensor, scales: Tensor, zeros: Tensor, g: int) -> Tensor:
    d = q.shape[1]
    s = scales.repeat_interleave(g, dim=1)[:, :d]
    z = zeros.to(scales.dtype).repeat_interleave(g, dim=1)[:, :d]
    return dequantize(q.to(scales.dtype), s, z)


class GroupQuantWeights(nn.Module):
    """Parametrization holding group-quantized weights; forward dequantizes (the input weight is ignored).

    Buffers: ``q`` uint8 codes (out, in·k), in column processing order when ``perm`` is set; ``scales`` float32
    (out, groups); ``zeros`` uint8 zero points (out, groups), or None for the symmetric grid (zero point
    2^(bits−1)); ``perm`` (in·k,) long or None: column c of ``q`` is input ``perm[c]`` (GPTQ's act-order; groups
    are consecutive in that order). ``shape`` is the weight's shape; ``transposed`` marks a weight stored (in, out)
    (Hugging Face Conv1D). Groups: ``group_size`` columns, the last one possibly shorter; None: one per row.
    """

    def __init__(self, q: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int | None,
                 perm: Tensor | None = None, shape: tuple[int, ...] | None = None, transposed: bool = False) -> None:
        super().__init__()
        if q.dim() != 2 or scales.shape != (q.shape[0], groups_of(q.shape[1], group_size)):
            raise ValueError(f"GroupQuantWeights: codes {tuple(q.shape)} and scales {tuple(scales.shape)} do not "
                             f"match group_size={group_size}.")
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        self.shape = tuple(shape) if shape is not None else (q.shape[1], q.shape[0]) if transposed else tuple(q.shape)
        self.register_buffer("q", q.to(torch.uint8))
        self.register_buffer("scales", scales.to(torch.float32))
        self.register_buffer("zeros", None if zeros is None else zeros.to(torch.uint8))
        self.register_buffer("perm", None if perm is None else perm.to(torch.long))

    def dequantized_matrix(self) -> Tensor:
        """The (out, in·k) weight matrix in input order."""
        d = self.q.shape[1]
        g = d if self.group_size is None or self.group_size >= d else self.group_size
        zeros = self.zeros if self.zeros is not None else torch.full_like(self.scales, 2 ** (self.bits - 1))
        w = dequantize_codes(self.q, self.scales, zeros, g)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w

    def forward(self, w: Tensor) -> Tensor:
        m = self.dequantized_matrix()
        return (m.T if self.transposed else m.reshape(self.shape)).to(w.dtype)




def row_bytes(cols: int, bits: int) -> int:
    """Bytes of one row of codes in the file: ``cols`` codes of ``bits`` bits, padded to a whole byte."""
    return packed_size(cols, bits)


def _perm_dtype(cols: int) -> type:
    return np.uint16 if cols <= 1 << 16 else np.uint32


@register_form
class Grouped(Form):
    codec = "grouped"
    weight_form = "grouped"
    text = "group-quantized weights (low-bit codes, a scale and zero point per group)"
    parametrization = GroupQuantWeights
    value_dtypes = ("float32", "float16")
    fields = {"group_size": (0, 1 << 30, 0), "zero_points": (0, 1, 0), "act_order": (0, 1, 0),
              "transposed": (0, 1, 0)}
    rank = 35
    runtime_names = ("quant", "quant_nm")

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        assert isinstance(par, GroupQuantWeights)
        q = par.q.cpu().numpy().astype(np.int64)
        rows, cols = q.shape
        codes = b"".join(pack_bits(q[r], par.bits) for r in range(rows))
        scales = value_array(name, par.scales, opts.value_dtype)
        blobs = {f"{name}/codes": codes, f"{name}/scales": scales.tobytes()}
        if par.zeros is not None:
            blobs[f"{name}/zeros"] = pack_bits(as_numpy(par.zeros).astype(np.int64), par.bits)
        if par.perm is not None:
            blobs[f"{name}/perm"] = as_numpy(par.perm).astype(_perm_dtype(cols)).tobytes()
        deq = par.dequantized_matrix()
        extra = {"group_size": par.group_size or 0, "zero_points": int(par.zeros is not None),
                 "act_order": int(par.perm is not None), "transposed": int(par.transposed)}
        rec = TensorRecord(name, tuple(value.shape), self.codec, opts.value_dtype, 0, value.numel(),
                           int((deq != 0).sum()), rows * cols, sum(len(b) for b in blobs.values()),
                           code_bits=par.bits, codebook_size=scales.size, extra=extra)
        return rec, blobs

    @staticmethod
    def _layout(rec: TensorRecord) -> tuple[int, int, int]:
        """(rows, cols, groups) of a record: the weight as the (out, in) matrix the codes hold."""
        if rec.extra["transposed"]:
            rows, cols = (rec.shape[1], rec.shape[0]) if len(rec.shape) == 2 else (0, 0)
        else:
            rows = rec.shape[0] if rec.shape else 0
            cols = rec.numel // rows if rows else 0
        g = rec.extra["group_size"]
        return rows, cols, 1 if g == 0 or g >= cols else math.ceil(cols / g)

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        rows, cols, groups = self._layout(rec)
        if (not 2 <= rec.code_bits <= 8 or rows * cols != rec.numel or rows == 0 or rec.entries != rec.numel
                or rec.codebook_size != rows * groups or rec.index_bits != 0
                or (rec.extra["transposed"] and len(rec.shape) != 2)):
            raise NszError(f"{where}: a grouped record needs 2 <= code_bits <= 8, entries = numel, one scale per "
                           f"row and group ({rows} x {groups}), index_bits 0 and a 2-D shape when transposed; got "
                           f"code_bits {rec.code_bits}, entries {rec.entries}, codebook_size {rec.codebook_size}.")
        owned = [need_blob(where, rec, blobs, "codes", rows * row_bytes(cols, rec.code_bits)),
                 need_blob(where, rec, blobs, "scales", rows * groups * VALUE_ITEMSIZE[rec.value_dtype])]
        if rec.extra["zero_points"]:
            owned.append(need_blob(where, rec, blobs, "zeros", packed_size(rows * groups, rec.code_bits)))
        if rec.extra["act_order"]:
            owned.append(need_blob(where, rec, blobs, "perm", cols * np.dtype(_perm_dtype(cols)).itemsize))
        return owned

    def _parts(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> GroupQuantWeights:
        rows, cols, groups = self._layout(rec)
        bits, rb = rec.code_bits, row_bytes(cols, rec.code_bits)
        data = blobs[f"{rec.name}/codes"]
        q = np.stack([unpack_bits(data[r * rb:(r + 1) * rb], cols, bits) for r in range(rows)]) if rows else \
            np.zeros((0, cols))
        scales = read_values(where, blobs.get(f"{rec.name}/scales"), rows * groups, rec.value_dtype, "scale")
        zeros = None
        if rec.extra["zero_points"]:
            zeros = torch.from_numpy(unpack_bits(blobs[f"{rec.name}/zeros"], rows * groups, bits).astype(np.uint8)
                                     ).reshape(rows, groups)
        perm = None
        if rec.extra["act_order"]:
            p = np.frombuffer(blobs[f"{rec.name}/perm"], dtype=_perm_dtype(cols)).astype(np.int64)
            if not np.array_equal(np.sort(p), np.arange(cols)):
                raise NszError(f"{where}: the act-order permutation is not a permutation of its {cols} columns.")
            perm = torch.from_numpy(p.copy())
        g = rec.extra["group_size"] or None
        return GroupQuantWeights(torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(scales.copy()).reshape(
            rows, groups), zeros, bits, g, perm, shape=rec.shape, transposed=bool(rec.extra["transposed"]))

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        with torch.no_grad():
            return self._parts(where, rec, blobs)(torch.empty(0))

    def attach(self, module, attr, where, rec, blobs) -> bool:
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(module, attr, self._parts(where, rec, blobs), unsafe=True)
        return True

    def describe(self, rec: TensorRecord) -> str:
        g = rec.extra["group_size"]
        return f"int{rec.code_bits} g{g if g else 'row'}{' +z' if rec.extra['zero_points'] else ''}"

    def parts(self, par, weight):
        return {"q": par.q, "scales": par.scales, "zeros": par.zeros, "perm": par.perm}

    def linear_candidates(self, layers, relus, names, density):
        """``QuantLinear`` (int3/int4 as nibbles, int8 as bytes, group scales, act-order permutation) for each layer,
        and ``QuantNMLinear`` (int4 codes on the kept values) where every layer's codes are also N:M with groups that
        are whole multiples of M (``kernels/quant_linear.py``), when the layers are large enough for the kernels'
        fixed cost to pay."""
        from ..kernels import simd
        from .nm import MIN_KERNEL_WEIGHTS

        # a run may mix in grouped_nm layers (runtime.passes.linear._run_form): their codes scattered back
        held = [p.to_grouped() if callable(getattr(p, "to_grouped", None)) else p
                for p in (stored_parametrization(m, "weight")[1] for m in layers)]
        if not simd.available() or sum(m.weight.numel() for m in layers) < MIN_KERNEL_WEIGHTS or \
                not all(isinstance(p, GroupQuantWeights) and not p.transposed for p in held):
            return {}
        out = {}
        dense_kind = [_quant_linear(m, p, r) for m, p, r in zip(layers, held, relus, strict=True)]
        if all(q is not None for q in dense_kind):
            out["quant"] = chain(dense_kind, [False] * len(layers))  # type: ignore[arg-type]
        nm_kind = [_quant_nm_linear(m, p, r) for m, p, r in zip(layers, held, relus, strict=True)]
        if all(q is not None for q in nm_kind):
            out["quant_nm"] = chain(nm_kind, [False] * len(layers))  # type: ignore[arg-type]
        return out


def _quant_linear(layer: nn.Linear, par: GroupQuantWeights, relu: bool) -> nn.Module | None:
    """The layer on ``QuantLinear``: codes as stored (nibbles for 3 and 4 bits), scales, zero points, permutation."""
    from ..kernels.quant_linear import QuantLinear, pack_nibbles

    rows, cols = par.q.shape
    group = par.group_size or cols
    if par.bits not in (3, 4, 8) or group % 2 or group < 2:
        return None
    codes = par.q.cpu().numpy()
    qweight = codes if par.bits == 8 else pack_nibbles(codes)
    bias = None if layer.bias is None else layer.bias.detach().float().numpy()
    zeros = None if par.zeros is None else par.zeros.cpu().numpy()
    perm = None if par.perm is None else par.perm.cpu().numpy()
    return QuantLinear.from_layout(qweight, par.scales.cpu().numpy(), zeros, par.bits, group, cols, bias, perm,
                                   "relu" if relu else None)


def _quant_nm_linear(layer: nn.Linear, par: GroupQuantWeights, relu: bool) -> nn.Module | None:
    """The layer on ``QuantNMLinear`` when its 4-bit codes leave an N:M pattern (pruned weights hold the zero point)
    and each scale group spans whole groups of M, so a group of g inputs is g·N/M kept values with the same
    scale."""
    from ..kernels.quant_linear import QuantNMLinear, pack_nibbles
    from .nm import nm_layout, nm_pattern

    if par.bits != 4 or par.perm is not None:
        return None
    rows, cols = par.q.shape
    group = par.group_size or cols
    zero = (par.zeros.long() if par.zeros is not None else torch.full_like(par.scales, 2 ** (par.bits - 1)).long())
    codes = par.q.long()
    live = (codes - zero.repeat_interleave(group, 1)[:, :cols]).numpy()   # nonzero where the weight is
    pattern = nm_pattern(live.astype(np.float32))
    if pattern is None or group % pattern[1]:
        return None
    n, m = pattern
    _, pos = nm_layout(live.astype(np.float32), n, m)
    kept = np.take_along_axis(codes.numpy().reshape(rows, cols // m, m), pos.reshape(rows, cols // m, n).astype(
        np.int64), 2).reshape(rows, -1)
    bias = None if layer.bias is None else layer.bias.detach().float().numpy()
    zeros = None if par.zeros is None else par.zeros.cpu().numpy()
    return QuantNMLinear.from_layout(pack_nibbles(kept), pos, par.scales.cpu().numpy(), zeros, n, m, group * n // m,
                                     bias, "relu" if relu else None)
