"""The ``grouped_nm`` form: weights both group-quantized (``forms/grouped.py``: GPTQ or round to nearest, Frantar et
al. 2023, arXiv:2210.17323) and N:M sparse (``forms/nm.py``: NVIDIA's 2:4, Mishra et al. 2021, arXiv:2104.08378),
as SparseGPT or ``magnitude`` with ``pattern="2:4"`` followed by ``gptq``/``rtn`` leave them. The file holds the
kept codes only.

Found by the writer, not by a method: a ``grouped`` weight (``GroupQuantWeights``) is written in this form when its
codes leave an N:M pattern and the record is smaller (``Form.alternative_to``). A weight is pruned where its code
is its group's zero point (the symmetric grid's 2^(bits-1), or the stored zero point): such a weight dequantizes to
exactly 0, whether a pruning method or the rounding put it there. Viewed as the (out, in) matrix of the codes
(a convolution's inputs x kernel; a Hugging Face Conv1D transposed), every M consecutive inputs of a row hold at
most N such live codes (M in 4, 8, 16, N <= M/2; the (N, M) giving the smallest record), and every scale group
spans whole groups of M (group_size a multiple of M, or one group per row). Act-order (a column permutation) is
not taken: its groups run in another order than the N:M groups.

In the file (codec ``grouped_nm``; ``code_bits`` = bits; fields ``n``, ``m``, ``group_size`` (0: one group per
row), ``zero_points``, ``transposed``; ``entries`` = rows·in·N/M kept slots; ``codebook_size`` = rows x groups):

- ``codes``: the N kept codes of every group of M (row-major, groups in order, in position order), bit-packed at
  ``bits`` bits in one stream (little-endian, so 4-bit codes are two per byte, the even slot in the low nibble). A
  group with fewer than N live codes fills its slots with the first unused positions and the zero point's code.
- ``patterns``: each group's set of kept positions as one index among the C(M, N) sets, in the colex order of the
  combinatorial number system (rank = sum_i C(p_i, i+1) for positions p_0 < ... < p_{N-1}; Knuth, TAOCP 4A,
  7.2.1.3), bit-packed at ``index_bits`` = ceil(log2 C(M, N)) bits: 3 bits per group of 4 for 2:4 (C(4, 2) = 6),
  i.e. 1.5 bits per kept value where NVIDIA's 2:4 metadata (Mishra et al. 2021) spends 2. An index past C(M, N)
  is refused on read; two slots can never name the same position.
- ``scales`` in the record's value dtype and ``zeros`` (with zero points, at ``bits`` bits), exactly as
  ``grouped`` stores them: one per row and group of ``group_size`` *dense* inputs. Groups are counted over the
  dense input dimension, not over kept values, because that is how the quantizer made them: the file then holds
  the very scales GPTQ/RTN computed and the round trip is bit-identical (re-grouping over kept values would need a
  re-quantization). As every group spans whole groups of M, a group of g inputs is g·N/M kept values, which is the
  group ``QuantNMLinear`` counts.

Bytes per kept value at 2:4, int4, group 128, float32 scales: 4 bits code + 1.5 bits pattern + 32/64 bits scale
(+ 4/64 zero point) = 6.0-6.06 bits, i.e. 3.0-3.03 bits per dense weight against ``grouped``'s 4.25-4.28 (0.71x).

In memory (:class:`GroupQuantNMWeights`): the kept codes and their positions (uint8, (out, in·N/M)), the scales
and zero points as ``grouped``'s; the runtime builds ``QuantNMLinear`` (``kernels/quant_linear.py``) from these
arrays directly, and the plain int4 ``QuantLinear`` from the codes scattered back (the faster one at the batch
size is kept). ONNX export rebuilds the weight in the graph: codes unpacked from nibbles, dequantized with the
gathered scales, and written at their columns by ScatterElements.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.bits import pack_bits, packed_size, unpack_bits
from ..coding.container import NszError
from ..coding.schema import VALUE_ITEMSIZE, TensorRecord, need_blob
from . import EncodeOptions, Form, as_numpy, chain, read_values, register_form, stored_parametrization, value_array
from .grouped import Grouped, GroupQuantWeights, groups_of

__all__ = ["GroupQuantNMWeights", "GroupedNM", "from_grouped", "pattern_bits", "pattern_table", "pattern_rank"]

_MS = (4, 8, 16)


def pattern_bits(n: int, m: int) -> int:
    """Bits of one group's pattern index: ceil(log2 C(m, n)), at least 1."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


@functools.lru_cache(maxsize=32)
def pattern_table(n: int, m: int) -> np.ndarray:
    """(C(m, n), n) uint8: row r holds the sorted positions of the pattern of colex rank r."""
    combos = list(itertools.combinations(range(m), n))
    table = np.zeros((len(combos), n), np.uint8)
    for c in combos:
        table[sum(math.comb(p, i + 1) for i, p in enumerate(c))] = c
    return table


def pattern_rank(pos: np.ndarray, m: int) -> np.ndarray:
    """The colex rank sum_i C(pos_i, i+1) of each set of sorted positions ``pos`` (..., n)."""
    n = pos.shape[-1]
    binom = np.array([[math.comb(p, i + 1) for i in range(n)] for p in range(m)], np.int64)  # (m, n)
    return binom[pos.astype(np.int64), np.arange(n)].sum(-1)


def _zero_points(bits: int, scales: Tensor, zeros: Tensor | None) -> Tensor:
    """(rows, groups) long: the stored zero points, or the symmetric grid's 2^(bits-1)."""
    return zeros.long() if zeros is not None else torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.long,
                                                                          device=scales.device)


def _group_width(group_size: int | None, cols: int) -> int:
    return cols if group_size is None or group_size >= cols else group_size


class GroupQuantNMWeights(nn.Module):
    """Parametrization holding group-quantized N:M weights in their compact form; forward dequantizes (the input
    weight is ignored).

    Buffers: ``codes`` uint8 (out, in·k·N/M): the kept codes, N per group of M inputs in position order;
    ``positions`` uint8 (same shape): each one's position 0..M-1 within its group; ``scales`` float32 (out, groups
    of ``group_size`` dense inputs) and ``zeros`` uint8 (same) or None (symmetric: 2^(bits-1)), as
    :class:`~netsurgeon.forms.grouped.GroupQuantWeights` holds them. w[r, (k // N)·M + positions[r, k]] =
    scale · (codes[r, k] − zero); every other weight is 0.
    """

    def __init__(self, codes: Tensor, positions: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                 group_size: int | None, n: int, m: int, shape: tuple[int, ...], transposed: bool = False) -> None:
        super().__init__()
        rows, kept = codes.shape
        cols = kept // n * m
        if positions.shape != codes.shape or kept % n or scales.shape != (rows, groups_of(cols, group_size)) \
                or _group_width(group_size, cols) % m:
            raise ValueError(f"GroupQuantNMWeights: codes {tuple(codes.shape)}, positions {tuple(positions.shape)} "
                             f"and scales {tuple(scales.shape)} do not match {n}:{m} with group_size={group_size}.")
        self.bits, self.group_size, self.n, self.m, self.transposed = bits, group_size, n, m, transposed
        self.shape = tuple(shape)
        self.cols = cols
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("positions", positions.to(torch.uint8))
        self.register_buffer("scales", scales.to(torch.float32))
        self.register_buffer("zeros", None if zeros is None else zeros.to(torch.uint8))

    def columns(self) -> Tensor:
        """(out, kept) long: each kept value's input column."""
        k = torch.arange(self.codes.shape[1], device=self.codes.device)
        return (k // self.n * self.m) + self.positions.long()

    def dense_codes(self) -> Tensor:
        """(out, in·k) uint8: every code, the zero point's where a weight is pruned (``grouped``'s layout)."""
        g = _group_width(self.group_size, self.cols)
        z = _zero_points(self.bits, self.scales, self.zeros).repeat_interleave(g, 1)[:, :self.cols]
        return z.scatter(1, self.columns(), self.codes.long()).to(torch.uint8)

    def to_grouped(self) -> GroupQuantWeights:
        """The same weights as a :class:`GroupQuantWeights` (every code held)."""
        return GroupQuantWeights(self.dense_codes(), self.scales, self.zeros, self.bits, self.group_size,
                                 shape=self.shape, transposed=self.transposed)

    def dequantized_matrix(self) -> Tensor:
        """The (out, in·k) weight matrix: the same float32 operations as ``GroupQuantWeights`` (scale ·
        (code − zero)), so the values are bit-identical."""
        cols = self.columns()
        grp = cols // _group_width(self.group_size, self.cols)
        s = self.scales.gather(1, grp)
        z = _zero_points(self.bits, self.scales, self.zeros).gather(1, grp).to(torch.float32)
        vals = s * (self.codes.to(torch.float32) - z)
        return torch.zeros(self.codes.shape[0], self.cols, device=vals.device).scatter(1, cols, vals)

    def forward(self, w: Tensor) -> Tensor:
        mat = self.dequantized_matrix()
        return (mat.T if self.transposed else mat.reshape(self.shape)).to(w.dtype)


def from_grouped(par: GroupQuantWeights) -> GroupQuantNMWeights | None:
    """``par`` in the compact N:M form when its codes leave an N:M pattern (module docstring), else None. Of the
    patterns it satisfies, the one with the fewest bits per row."""
    if par.perm is not None or par.q.numel() == 0:
        return None
    q = par.q.cpu().numpy()
    rows, cols = q.shape
    g = _group_width(par.group_size, cols)
    zero = _zero_points(par.bits, par.scales, par.zeros).cpu().repeat_interleave(g, 1)[:, :cols].numpy()
    live = q != zero
    best = None
    for m in _MS:
        if cols % m or g % m:
            continue
        n = max(1, int(live.reshape(rows, cols // m, m).sum(2).max()))
        if 2 * n > m:
            continue
        size = n * par.bits + pattern_bits(n, m)  # bits per group of m
        if best is None or size * best[2] < best[0] * m:
            best = (size, n, m)
    if best is None:
        return None
    _, n, m = best
    grouped = live.reshape(rows, cols // m, m)
    pos = np.sort(np.argsort(~grouped, axis=2, kind="stable")[:, :, :n], axis=2)  # live first, then unused
    kept = np.take_along_axis(q.reshape(rows, cols // m, m), pos, 2)
    return GroupQuantNMWeights(torch.from_numpy(kept.reshape(rows, -1).copy()),
                               torch.from_numpy(pos.reshape(rows, -1).astype(np.uint8)), par.scales.cpu(),
                               None if par.zeros is None else par.zeros.cpu(), par.bits, par.group_size, n, m,
                               par.shape, par.transposed)


@register_form
class GroupedNM(Form):
    codec = "grouped_nm"
    weight_form = "grouped"
    text = "group-quantized weights (low-bit codes, a scale and zero point per group)"
    parametrization = GroupQuantNMWeights
    alternative_to = ("grouped",)
    value_dtypes = ("float32", "float16")
    fields = {"n": (1, 15, None), "m": (2, 16, None), "group_size": (0, 1 << 30, 0), "zero_points": (0, 1, 0),
              "transposed": (0, 1, 0)}
    rank = 35
    runtime_names = ("quant", "quant_nm")

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]] | None:
        if isinstance(par, GroupQuantWeights):
            par = from_grouped(par)
        if not isinstance(par, GroupQuantNMWeights):
            return None
        n, m = par.n, par.m
        codes = pack_bits(as_numpy(par.codes).astype(np.int64), par.bits)
        rows, kept = par.codes.shape
        ranks = pattern_rank(par.positions.numpy().reshape(rows, kept // n, n), m)
        ibits = pattern_bits(n, m)
        scales = value_array(name, par.scales, opts.value_dtype)
        blobs = {f"{name}/codes": codes, f"{name}/patterns": pack_bits(ranks.ravel(), ibits),
                 f"{name}/scales": scales.tobytes()}
        if par.zeros is not None:
            blobs[f"{name}/zeros"] = pack_bits(as_numpy(par.zeros).astype(np.int64), par.bits)
        with torch.no_grad():
            nonzero = int((par.dequantized_matrix() != 0).sum())
        extra = {"n": n, "m": m, "group_size": par.group_size or 0, "zero_points": int(par.zeros is not None),
                 "transposed": int(par.transposed)}
        rec = TensorRecord(name, tuple(value.shape), self.codec, opts.value_dtype, ibits, value.numel(), nonzero,
                           rows * kept, sum(len(b) for b in blobs.values()), code_bits=par.bits,
                           codebook_size=scales.size, extra=extra)
        return rec, blobs

    _layout = staticmethod(Grouped._layout)  # (rows, cols, groups): the (out, in) matrix the codes index

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        rows, cols, groups = self._layout(rec)
        n, m, g = rec.extra["n"], rec.extra["m"], rec.extra["group_size"]
        width = cols if g == 0 or g >= cols else g
        if (not 2 <= rec.code_bits <= 8 or rows == 0 or rows * cols != rec.numel or n >= m or cols % m
                or width % m or rec.entries != rows * cols // m * n or rec.index_bits != pattern_bits(n, m)
                or rec.codebook_size != rows * groups or (rec.extra["transposed"] and len(rec.shape) != 2)):
            raise NszError(f"{where}: a grouped_nm record needs 2 <= code_bits <= 8, n < m, inputs and group_size "
                           f"multiples of m, entries = numel·n/m, index_bits = ceil(log2 C(m, n)) and one scale per "
                           f"row and group ({rows} x {groups}); got shape {list(rec.shape)}, code_bits "
                           f"{rec.code_bits}, n {n}, m {m}, group_size {g}, entries {rec.entries}, index_bits "
                           f"{rec.index_bits}, codebook_size {rec.codebook_size}.")
        owned = [need_blob(where, rec, blobs, "codes", packed_size(rec.entries, rec.code_bits)),
                 need_blob(where, rec, blobs, "patterns", packed_size(rows * cols // m, rec.index_bits)),
                 need_blob(where, rec, blobs, "scales", rows * groups * VALUE_ITEMSIZE[rec.value_dtype])]
        if rec.extra["zero_points"]:
            owned.append(need_blob(where, rec, blobs, "zeros", packed_size(rows * groups, rec.code_bits)))
        return owned

    def _parts(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> GroupQuantNMWeights:
        rows, cols, groups = self._layout(rec)
        n, m, bits = rec.extra["n"], rec.extra["m"], rec.code_bits
        codes = unpack_bits(blobs[f"{rec.name}/codes"], rec.entries, bits).astype(np.uint8).reshape(rows, -1)
        ranks = unpack_bits(blobs[f"{rec.name}/patterns"], rows * cols // m, rec.index_bits)
        table = pattern_table(n, m)
        if ranks.size and int(ranks.max()) >= len(table):
            raise NszError(f"{where}: a pattern index is {int(ranks.max())}, past the {len(table)} ways to keep {n} "
                           f"of {m}.")
        pos = table[ranks.astype(np.int64)].reshape(rows, -1)
        scales = read_values(where, blobs.get(f"{rec.name}/scales"), rows * groups, rec.value_dtype, "scale")
        zeros = None
        if rec.extra["zero_points"]:
            zeros = torch.from_numpy(unpack_bits(blobs[f"{rec.name}/zeros"], rows * groups, bits).astype(np.uint8)
                                     ).reshape(rows, groups)
        return GroupQuantNMWeights(torch.from_numpy(codes), torch.from_numpy(pos),
                                   torch.from_numpy(scales.copy()).reshape(rows, groups), zeros, bits,
                                   rec.extra["group_size"] or None, n, m, rec.shape, bool(rec.extra["transposed"]))

    # as grouped's: both build the weight from this form's own ``_parts``
    decode = Grouped.decode
    attach = Grouped.attach

    def describe(self, rec: TensorRecord) -> str:
        g = rec.extra["group_size"]
        return (f"int{rec.code_bits} g{g if g else 'row'}{' +z' if rec.extra['zero_points'] else ''} "
                f"{rec.extra['n']}:{rec.extra['m']}")

    def parts(self, par, weight):
        return {"codes": par.codes, "positions": par.positions, "scales": par.scales, "zeros": par.zeros}

    def linear_candidates(self, layers, relus, names, density):
        """``QuantNMLinear`` built from the kept codes and positions as held (no dense copy), and ``QuantLinear``
        on the codes scattered back (int4/int3, as for ``grouped``), when the layers are large enough for the
        kernels' fixed cost to pay; the runtime keeps the faster."""
        from ..kernels import simd
        from .grouped import _quant_linear
        from .nm import MIN_KERNEL_WEIGHTS

        held = [stored_parametrization(m, "weight")[1] for m in layers]
        if not simd.available() or sum(m.weight.numel() for m in layers) < MIN_KERNEL_WEIGHTS or \
                not all(isinstance(p, GroupQuantNMWeights) and not p.transposed for p in held):
            return {}
        out = {}
        nm_kind = [_quant_nm_linear(m, p, r) for m, p, r in zip(layers, held, relus, strict=True)]
        if all(q is not None for q in nm_kind):
            out["quant_nm"] = chain(nm_kind, [False] * len(layers))  # type: ignore[arg-type]
        dense_kind = [_quant_linear(m, p.to_grouped(), r) for m, p, r in zip(layers, held, relus, strict=True)]
        if all(q is not None for q in dense_kind):
            out["quant"] = chain(dense_kind, [False] * len(layers))  # type: ignore[arg-type]
        return out

    def onnx(self, graph, rec, weight, parts):
        return onnx_nodes(graph, rec, parts)


def _quant_nm_linear(layer: nn.Linear, par: GroupQuantNMWeights, relu: bool) -> nn.Module | None:
    """The layer on ``QuantNMLinear`` from the held arrays: codes of up to 4 bits (int3/int2 symmetric grids get
    their zero point 2^(bits-1) as explicit zeros: the kernel's symmetric table is int4's)."""
    from ..kernels.quant_linear import QuantNMLinear, pack_nibbles

    if par.bits > 4:
        return None
    zeros = par.zeros
    if zeros is None and par.bits != 4:
        zeros = _zero_points(par.bits, par.scales, None).to(torch.uint8)
    group = _group_width(par.group_size, par.cols) * par.n // par.m  # kept values per scale group
    bias = None if layer.bias is None else layer.bias.detach().float().numpy()
    return QuantNMLinear.from_layout(pack_nibbles(par.codes.numpy()), par.positions.numpy(), par.scales.numpy(),
                                     None if zeros is None else zeros.numpy(), par.n, par.m, group, bias,
                                     "relu" if relu else None)


def _unpacked(g, arr: np.ndarray, bits: int) -> str:
    """A (rows, k) uint8 constant of values < 2^bits, stored 8 // bits to a byte (bits 1, 2, 4 or 8) and unpacked
    in the graph (Div, Mod, Concat: opset 13+): the graph value's name."""
    from onnx import TensorProto

    rows, k = arr.shape
    per = 8 // bits
    if per == 1:
        return g.const(arr.astype(np.uint8))
    padded = np.zeros((rows, -(-k // per) * per), np.uint8)
    padded[:, :k] = arr
    packed = np.zeros((rows, padded.shape[1] // per), np.uint8)
    for i in range(per):
        packed |= (padded[:, i::per] << (bits * i)).astype(np.uint8)
    src = g.node("Cast", [g.const(packed)], to=TensorProto.INT32)  # integer Div / Mod on int32 everywhere
    axis = g.const(np.array([2], np.int64))
    pieces = [g.node("Unsqueeze", [g.node("Mod", [g.node("Div", [src, g.const(np.array([1 << (bits * i)], np.int32))]),
                                                  g.const(np.array([1 << bits], np.int32))]), axis])
              for i in range(per)]
    flat = g.node("Reshape", [g.node("Concat", pieces, axis=2), g.const(np.array([rows, -1], np.int64))])
    return g.node("Slice", [flat, g.const(np.array([0], np.int64)), g.const(np.array([k], np.int64)),
                            g.const(np.array([1], np.int64))])


def onnx_nodes(g, rec: TensorRecord, parts: dict[str, Tensor]) -> str:
    """Nodes that rebuild the weight from the kept codes (nibbles for <= 4 bits), positions (2 or 4 bits each),
    scales and zero points: values = (code − zero) · scale with both gathered per kept value, written at column
    (k // N)·M + position of a zero (out, in) matrix by ScatterElements, then reshaped (or transposed) to the
    weight."""
    from onnx import TensorProto, helper

    codes, pos = parts["codes"].numpy(), parts["positions"].numpy()
    scales, zeros = parts["scales"].numpy().astype(np.float32), parts["zeros"]
    n, m, bits = rec.extra["n"], rec.extra["m"], rec.code_bits
    rows, kept = codes.shape
    cols = kept // n * m
    gs = rec.extra["group_size"]
    per_group = (cols if gs == 0 or gs >= cols else gs) * n // m   # kept values per scale group

    def i64(v):
        return g.const(np.array(v, np.int64))

    def scalar(v):  # Range takes 0-d inputs (an initializer from numpy is stored 1-d)
        return g.node("Constant", [], value=helper.make_tensor("v", TensorProto.INT64, [], [v]))

    k = g.node("Range", [scalar(0), scalar(kept), scalar(1)])
    grp = g.node("Div", [k, i64(per_group)])
    scale = g.node("Gather", [g.const(scales), grp], axis=1)
    if zeros is None:
        zero = g.const(np.array(2 ** (bits - 1), np.float32))
    else:
        zero = g.node("Gather", [g.node("Cast", [g.const(zeros.numpy())], to=TensorProto.FLOAT), grp], axis=1)
    code = g.node("Cast", [_unpacked(g, codes, 4 if bits <= 4 else 8)], to=TensorProto.FLOAT)
    values = g.node("Mul", [scale, g.node("Sub", [code, zero])])
    base = g.node("Mul", [g.node("Div", [k, i64(n)]), i64(m)])
    col = g.node("Add", [base, g.node("Cast", [_unpacked(g, pos, 2 if m <= 4 else 4)], to=TensorProto.INT64)])
    empty = g.node("ConstantOfShape", [i64([rows, cols])], value=helper.make_tensor("zero", TensorProto.FLOAT, [1],
                                                                                  [0.0]))
    mat = g.node("ScatterElements", [empty, col, values], axis=1)
    if rec.extra["transposed"]:
        g.node("Transpose", [mat], output=rec.name, perm=[1, 0])
    else:
        g.node("Reshape", [mat, i64(list(rec.shape))], output=rec.name)
    return (f"int{bits} {n}:{m}: kept codes ({'nibbles' if bits <= 4 else 'bytes'}) + positions -> dequantized, "
            "ScatterElements")
