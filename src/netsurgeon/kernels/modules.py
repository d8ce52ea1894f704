"""The runtime's layer modules: what a compressed Linear layer (or a run of them) becomes to run fast.

- :class:`FusedLinearChain`: a run of sparse Linear(+ReLU) layers in one compiled call (kernels.py), with
  float32 values or k-means codes (uint8) into a per-layer codebook: no dense float copy is ever held.
- :class:`CSRLinear`: torch's CSR matmul for one layer (a candidate at large batch).
- :class:`Int8Chain`: a run of int8 Linear(+ReLU) layers, int8 weights x int8 activations (per-sample
  scales) through ``torch._int_mm``, each int32 result rescaled (+bias, ReLU) in one pass (kernels.py).
- :class:`SignLutLinear`: a Linear layer with ±1 weights and a real input (BinaryConnect; a BNN's first
  layer): 1 bit per weight in memory, the product by table lookup over bytes of 8 inputs (bitops.py).
- :class:`BinaryChain`: a BNN's run of binary Linear (+BatchNorm) (+HardTanh) layers in one call: each
  BatchNorm is folded into its layer's scale and bias, and between layers only the packed signs travel.
- :class:`XnorLinear` / :class:`XnorConv2d`: a binary layer whose input is binarized too (BNN, XNOR-Net):
  the input's signs are packed into 64-bit words and multiplied by the packed weights with XNOR + popcount
  (bitops.py); weights take 1 bit each in memory as on disk.
Every module holds its arrays as plain tensors/numpy arrays; ``resident_bytes`` counts them.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..stats import kept_columns
from . import bitops
from . import fused as kernels

__all__ = ["FusedLinearChain", "CSRLinear", "Int8Chain", "XnorLinear", "XnorConv2d", "ColumnConv2d",
           "StridedMaxPool2d", "ChannelsLast", "BatchChunks", "SignLutLinear", "BinaryChain", "resident_bytes"]


class FusedLinearChain(nn.Module):
    """``layers`` (dicts, see :func:`kernels.pack_chain`) run as one compiled call on the last input axis."""

    def __init__(self, layers: list[dict], names: list[str], flatten: bool = False) -> None:
        super().__init__()
        self.packed = kernels.pack_chain(layers)
        self.names = names
        self.flatten = flatten  # the run absorbed the nn.Flatten before it (one module call less)
        self.nnz = int(sum(len(layer["rows"]) for layer in layers))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.requires_grad or not x.is_contiguous():
            x = x.detach().float().contiguous()
        xn = x.numpy()  # shapes are handled on the numpy side: a torch reshape costs ~1 us at batch 1
        lead = xn.shape[:1] if self.flatten else xn.shape[:-1]
        xn = xn.reshape(xn.shape[0], -1) if self.flatten else xn.reshape(-1, xn.shape[-1])
        if xn.shape[0] > 1:
            kernels.set_threads(torch.get_num_threads())
        y = torch.from_numpy(kernels.chain_forward(self.packed, xn))
        return y if len(lead) == 1 else y.reshape(*lead, self.packed.n_out)

    def resident_bytes(self) -> int:
        return self.packed.nbytes()

    def extra_repr(self) -> str:
        kind = "k-means codes" if self.packed.shared else "float32"
        return f"layers={self.names}, in={self.packed.n_in}, out={self.packed.n_out}, nnz={self.nnz}, values={kind}"


def _to_csr(w: Tensor) -> Tensor:
    with warnings.catch_warnings():  # torch flags CSR support as beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return w.to_sparse_csr()


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held as a torch CSR sparse matrix (only the nonzeros are stored and multiplied)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight_csr = _to_csr(weight.detach())
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.sparse.mm(self.weight_csr, x.reshape(-1, self.in_features).t()).t()  # (out, in) @ (in, B)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*lead, self.out_features)

    def __deepcopy__(self, memo: dict) -> CSRLinear:
        """A copy sharing nothing (a CSR tensor cannot be deep-copied by storage; the pack step copies graphs)."""
        return CSRLinear(self.weight_csr.to_dense(), self.bias)

    def resident_bytes(self) -> int:
        w = self.weight_csr
        parts = [w.crow_indices(), w.col_indices(), w.values()] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nnz={self.weight_csr.values().numel()}"


class Int8Chain(nn.Module):
    """A run of Linear(+ReLU) layers with int8 weights (one scale per output row, as stored) computed on int8
    activations (one scale per sample, computed on the fly): per layer ``y = (q_x @ q_wᵀ) * s_x * s_w + b``
    with int32 accumulation (``torch._int_mm``), the rescale, bias and ReLU in one pass (kernels.py)."""

    def __init__(self, layers: list[dict], names: list[str], flatten: bool = False) -> None:
        super().__init__()
        self.names, self.flatten = names, flatten
        self.q_t = [layer["q"].to(torch.int8).t().contiguous() for layer in layers]  # (in, out) for _int_mm
        self.scales = [np.ascontiguousarray(np.broadcast_to(layer["scale"].float().reshape(-1).numpy(),
                                                            (layer["q"].shape[0],)), dtype=np.float32)
                       for layer in layers]
        self.biases = [None if layer["bias"] is None else layer["bias"].detach().float().numpy().copy()
                       for layer in layers]
        self.relus = [bool(layer["relu"]) for layer in layers]
        self.n_in, self.n_out = layers[0]["q"].shape[1], layers[-1]["q"].shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.requires_grad or not x.is_contiguous():
            x = x.detach().float().contiguous()
        xn = x.numpy()
        lead = xn.shape[:1] if self.flatten else xn.shape[:-1]
        xn = xn.reshape(xn.shape[0], -1) if self.flatten else xn.reshape(-1, xn.shape[-1])
        kernels.set_threads(torch.get_num_threads())
        for q_t, scale, bias, relu in zip(self.q_t, self.scales, self.biases, self.relus, strict=True):
            q, s = kernels.quantize_rows(xn)
            acc = torch._int_mm(torch.from_numpy(q), q_t).numpy()
            xn = kernels.dequantize_rows(acc, s, scale, bias, relu)
        y = torch.from_numpy(xn)
        return y if len(lead) == 1 else y.reshape(*lead, self.n_out)

    def resident_bytes(self) -> int:
        return sum(t.numel() for t in self.q_t) + sum(a.nbytes for a in self.scales) + sum(
            b.nbytes for b in self.biases if b is not None)

    def extra_repr(self) -> str:
        return f"layers={self.names}, in={self.n_in}, out={self.n_out}, int8 x int8 -> int32"


class _Xnor(nn.Module):
    """Shared state of the XNOR layers: packed weight signs [N, W] (uint64), per-output scale, bias, and the
    input mode (``sign``: BNN; ``scaled``: XNOR-Net's β / K output scale)."""

    def __init__(self, signs: Tensor, scale: Tensor, bias: Tensor | None, mode: str) -> None:
        super().__init__()
        flat = signs.reshape(signs.shape[0], -1).float().numpy()
        self.k = flat.shape[1]
        self.packed = bitops.pack_signs(flat)
        self.scale = np.ascontiguousarray(np.broadcast_to(scale.float().reshape(-1).numpy(), (signs.shape[0],)),
                                          dtype=np.float32)
        self.bias = None if bias is None else bias.detach().float().numpy().copy()
        self.mode = mode

    def _matmul(self, cols: np.ndarray, row_scale: np.ndarray | None) -> np.ndarray:
        if cols.shape[0] > 1:
            kernels.set_threads(torch.get_num_threads())
        return bitops.xnor_matmul(bitops.pack_signs(cols), self.packed, self.k, self.scale, row_scale, self.bias)

    def resident_bytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + (0 if self.bias is None else self.bias.nbytes)


class XnorLinear(_Xnor):
    """A binary Linear layer with a binarized input: y = (sign(x)·sign(W)ᵀ)·α (·β) + b, by XNOR + popcount."""

    def __init__(self, layer: nn.Linear, signs: Tensor, scale: Tensor, mode: str) -> None:
        super().__init__(signs, scale, layer.bias, mode)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        xn = x.detach().float().contiguous().numpy()
        lead = xn.shape[:-1]
        xn = xn.reshape(-1, self.in_features)
        beta = np.abs(xn).mean(1, dtype=np.float32) if self.mode == "scaled" else None
        y = torch.from_numpy(self._matmul(xn, beta))
        return y if len(lead) == 1 else y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, input={self.mode}, XNOR + popcount"


class XnorConv2d(_Xnor):
    """A binary Conv2d (padding 0, dilation 1, groups 1) with a binarized input, as im2col + XNOR GEMM; for
    ``scaled`` the output is multiplied by XNOR-Net's K (Eq. (11))."""

    def __init__(self, layer: nn.Conv2d, signs: Tensor, scale: Tensor, mode: str) -> None:
        if any(p != 0 for p in layer.padding) or any(d != 1 for d in layer.dilation) or layer.groups != 1:  # type: ignore[union-attr]
            raise ValueError("XnorConv2d: needs padding 0, dilation 1 and groups 1 (zero padding is not ±1).")
        super().__init__(signs, scale, layer.bias, mode)
        self.out_channels, self.kernel_size, self.stride = layer.out_channels, layer.kernel_size, layer.stride

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().float()
        b, _, h, w = x.shape
        oh = (h - self.kernel_size[0]) // self.stride[0] + 1
        ow = (w - self.kernel_size[1]) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, stride=self.stride).transpose(1, 2).reshape(-1, self.k)  # [B·L, K]
        out = torch.from_numpy(self._matmul(cols.contiguous().numpy(), None))  # [B·L, N]
        out = out.reshape(b, oh * ow, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, oh, ow)
        if self.mode == "scaled":
            k = F.avg_pool2d(x.abs().mean(1, keepdim=True), self.kernel_size, self.stride)
            bias = 0 if self.bias is None else torch.from_numpy(self.bias).view(1, -1, 1, 1)
            out = (out - bias) * k + bias
        return out

    def extra_repr(self) -> str:
        return f"out={self.out_channels}, kernel={tuple(self.kernel_size)}, input={self.mode}, XNOR + popcount"


class ColumnConv2d(nn.Module):
    """A Conv2d (groups 1, zero padding) computed as a GEMM over the kept columns of its lowered weight only.

    Lowered (im2col), a convolution is ``W[O, C·kh·kw] @ patches[C·kh·kw, L]``. Structured sparsity learning's
    shape-wise groups (Wen et al. 2016, Sec. 3.3) zero whole columns of ``W``: the (input channel, kernel
    position) pairs no filter reads. This form gathers only the kept rows of the patch matrix, straight from
    the padded input through a precomputed index (one per input size, cached), and multiplies by the
    ``O x K'`` weight: work and memory traffic scale with the kept columns K'.
    """

    def __init__(self, layer: nn.Conv2d) -> None:
        if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.padding_mode != "zeros" \
                or isinstance(layer.padding, str):
            raise ValueError("ColumnConv2d: needs an nn.Conv2d with groups 1 and numeric zero padding.")
        super().__init__()
        w = layer.weight.detach().float()
        self.out_channels, self.in_channels = w.shape[0], w.shape[1]
        self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
        self.padding, self.dilation = tuple(layer.padding), tuple(layer.dilation)  # type: ignore[arg-type]
        flat = w.reshape(w.shape[0], -1)
        self.keep = torch.nonzero(kept_columns(flat)).flatten()  # kept columns, in (c, i, j) order
        self.total_columns = flat.shape[1]
        self.register_buffer("weight", flat[:, self.keep].contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self._index: dict[tuple[int, int], tuple[Tensor, int, int]] = {}
        self.channels_last = False  # hand the output back in channels-last order (a model run in that order)

    def _gather_index(self, h: int, w: int) -> tuple[Tensor, int, int]:
        """Positions in the flattened padded input (C, H+2p, W+2p) of every kept patch row, for one input size."""
        got = self._index.get((h, w))
        if got is None:
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
            hp, wp = h + 2 * ph, w + 2 * pw
            oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
            if oh < 1 or ow < 1:
                raise ValueError(f"ColumnConv2d: input {h}x{w} is smaller than the kernel {kh}x{kw}.")
            c, r = self.keep // (kh * kw), self.keep % (kh * kw)
            start = c * hp * wp + (r // kw) * dh * wp + (r % kw) * dw  # top-left tap of each kept column
            dev = start.device
            grid = (torch.arange(oh, device=dev) * sh)[:, None] * wp + (torch.arange(ow, device=dev) * sw)[None, :]
            got = ((start[:, None] + grid.reshape(1, -1)).reshape(-1), oh, ow)
            self._index[(h, w)] = got
        return got

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        idx, oh, ow = self._gather_index(h, w)
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        cols = x.reshape(n, -1).index_select(1, idx).view(n, self.weight.shape[1], oh * ow)
        if self.channels_last:  # [n, L, O]: the same values, each pixel's channels contiguous
            out = torch.matmul(cols.transpose(1, 2), self.weight.t())
            if self.bias is not None:
                out = out + self.bias
            return out.view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)
        out = torch.matmul(self.weight, cols)  # [n, O, L]
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(n, self.out_channels, oh, ow)

    def to_conv2d(self) -> nn.Conv2d:
        """The plain convolution this form computes (its dropped columns as zeros): the inverse of ``__init__``."""
        full = self.weight.new_zeros(self.out_channels, self.total_columns)
        full[:, self.keep] = self.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(full.view_as(conv.weight))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"out={self.out_channels}, kernel={self.kernel_size}, kept columns {len(self.keep)}/"
                f"{self.total_columns}, im2col gather + GEMM")


class StridedMaxPool2d(nn.Module):
    """Max-pooling whose window equals its stride (no padding, dilation 1, floor mode), as an elementwise
    maximum of the k·k strided views of the input: on this torch build NCHW ``max_pool2d`` computes indices
    it then drops and runs ~7x slower at batch 256 (docs/runtime.md). Same values, NaN propagated."""

    def __init__(self, layer: nn.MaxPool2d) -> None:
        kh, kw = _pair(layer.kernel_size)
        if _pair(layer.stride or layer.kernel_size) != (kh, kw) or _pair(layer.padding) != (0, 0) \
                or _pair(layer.dilation) != (1, 1) or layer.ceil_mode or layer.return_indices:
            raise ValueError("StridedMaxPool2d: needs stride = kernel size, padding 0, dilation 1, floor mode.")
        super().__init__()
        self.kernel_size = (kh, kw)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        oh, ow = x.shape[-2] // kh, x.shape[-1] // kw
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return self._nhwc(x, kh, kw, oh, ow)
        out = None
        for i in range(kh):
            for j in range(kw):
                v = x[..., i: i + kh * oh: kh, j: j + kw * ow: kw]
                out = v if out is None else torch.maximum(out, v)
        return out  # type: ignore[return-value]

    @staticmethod
    def _nhwc(x: Tensor, kh: int, kw: int, oh: int, ow: int) -> Tensor:
        """Channels-last input: the window's rows are whole contiguous image rows and its columns whole
        contiguous pixel vectors, so the maximum runs over long contiguous runs (first across the kh rows of each
        output row, then across the kw pixels of each output pixel) instead of strided views of C floats each:
        1.3-2.4x faster at batch 256 here (docs/runtime.md)."""
        b, c = x.shape[0], x.shape[1]
        n = x.permute(0, 2, 3, 1)[:, :kh * oh, :kw * ow]  # (B, H, W, C), contiguous unless cropped
        rows = n.reshape(b, oh, kh, ow * kw * c)
        out = rows[:, :, 0]
        for i in range(1, kh):
            out = torch.maximum(out, rows[:, :, i])
        cols = out.view(b, oh, ow, kw, c)
        out = cols[:, :, :, 0]
        for j in range(1, kw):
            out = torch.maximum(out, cols[:, :, :, j])
        return out.permute(0, 3, 1, 2)  # (B, C, oh, ow) in channels-last memory

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_size}, maximum of strided views"


class ChannelsLast(nn.Module):
    """Run ``inner`` with its 4-D weights and its 4-D input in channels-last (NHWC) memory order: oneDNN's
    native layout, so its convolutions skip the reorders an NCHW call pays for, and channels are the
    contiguous dimension of the BatchNorm, ReLU and pooling passes. Same values; a 4-D output is handed back
    in the default (contiguous) order. ``inner``'s weights are converted in place (pass a copy to keep it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.inner(x)
        return out.contiguous() if isinstance(out, Tensor) and out.dim() == 4 else out


class BatchChunks(nn.Module):
    """Run ``inner`` on slices of at most ``size`` samples and concatenate the outputs: in inference every
    sample is computed on its own, and a slice's activations stay in cache between layers where a large
    batch's do not (the memory-bound BatchNorm, ReLU and pooling passes then read DRAM)."""

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__()
        self.inner, self.size = inner, int(size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.size:
            return self.inner(x)
        return torch.cat([self.inner(part) for part in x.split(self.size)])

    def extra_repr(self) -> str:
        return f"slices of {self.size} samples"


class SignLutLinear(nn.Module):
    """y = x · sign(W)ᵀ · α + b for a real input, the weights held as bits (:func:`bitops.sign_lut_matmul`)."""

    def __init__(self, layer: nn.Linear, signs: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.wbytes = np.ascontiguousarray(bitops.pack_signs(signs.float().numpy()).view(np.uint8))
        self.scale = np.ascontiguousarray(np.broadcast_to(scale.float().reshape(-1).numpy(), (self.out_features,)),
                                          dtype=np.float32)
        self.bias = None if layer.bias is None else layer.bias.detach().float().numpy().copy()

    def forward(self, x: Tensor) -> Tensor:
        xn = x.detach().float().contiguous().numpy()
        lead = xn.shape[:-1]
        kernels.set_threads(torch.get_num_threads())
        y = torch.from_numpy(bitops.sign_lut_matmul(xn.reshape(-1, self.in_features), self.wbytes, self.scale,
                                                    self.bias))
        return y if len(lead) == 1 else y.reshape(*lead, self.out_features)

    def resident_bytes(self) -> int:
        return self.wbytes.nbytes + self.scale.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ±1 weights as bits, table lookup"


def fold_batchnorm(scale: np.ndarray, bias: np.ndarray, bn: nn.Module | None) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with BN(dot·scale + bias) = dot·A + B for an eval-mode BatchNorm1d ``bn`` (None: unchanged)."""
    if bn is None:
        return scale.astype(np.float32), bias.astype(np.float32)
    inv = 1.0 / np.sqrt(bn.running_var.double().numpy() + bn.eps)
    gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones_like(inv)
    beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros_like(inv)
    g = gamma * inv
    return ((scale * g).astype(np.float32),
            ((bias - bn.running_mean.double().numpy()) * g + beta).astype(np.float32))


class BinaryChain(nn.Module):
    """Binary Linear layers, each optionally followed by an eval BatchNorm1d and a sign-preserving activation
    (HardTanh), every layer but the first taking the sign of the previous one's output (BNN). One call:

    - the first layer: its input packed as signs when it binarizes its input, else a real input times the ±1
      weights (table lookup up to ``lut_batch`` samples, torch's matmul above);
    - inner layers: XNOR + popcount with the BatchNorm folded into scale and bias, writing only the packed
      signs of the result (the next layer needs nothing else; HardTanh keeps signs, so it drops out);
    - the last layer: float output, its BatchNorm folded in (its activation, if any, stays outside the chain).
    """

    def __init__(self, units: list[dict], names: list[str], lut_batch: int = 8) -> None:
        super().__init__()
        self.names, self.lut_batch = names, lut_batch
        self.real_input = units[0]["real_input"]
        self.k, self.packed, self.A, self.B = [], [], [], []
        for u in units:
            signs = u["signs"].reshape(u["signs"].shape[0], -1).float()
            self.k.append(signs.shape[1])
            self.packed.append(bitops.pack_signs(signs.numpy()))
            n = signs.shape[0]
            scale = np.broadcast_to(u["scale"].float().reshape(-1).numpy(), (n,)).astype(np.float64)
            bias = np.zeros(n) if u["bias"] is None else u["bias"].detach().double().numpy()
            a, b = fold_batchnorm(scale, bias, u.get("bn"))
            self.A.append(np.ascontiguousarray(a))
            self.B.append(np.ascontiguousarray(b))
        self.first_bytes = np.ascontiguousarray(self.packed[0].view(np.uint8)) if self.real_input else None
        self.first_signs: Tensor | None = None  # float ±1 copy for large batches, made on first use
        self.n_in, self.n_out = self.k[0], len(self.A[-1])
        self.flatten = False  # the run absorbed the nn.Flatten before it

    def forward(self, x: Tensor) -> Tensor:
        xn = x.detach().float().contiguous().numpy()
        lead = xn.shape[:1] if self.flatten else xn.shape[:-1]
        xn = xn.reshape(-1, self.n_in)
        kernels.set_threads(torch.get_num_threads())
        if self.real_input:
            if xn.shape[0] <= self.lut_batch:
                z = bitops.sign_lut_matmul(xn, self.first_bytes, self.A[0], self.B[0])
            else:
                if self.first_signs is None:
                    bits = np.unpackbits(self.first_bytes, axis=1, count=self.n_in, bitorder="little")
                    self.first_signs = torch.from_numpy(bits.astype(np.float32) * 2 - 1)
                z = (torch.from_numpy(xn) @ self.first_signs.t()).numpy() * self.A[0] + self.B[0]
            if len(self.A) == 1:
                y = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
                return y if len(lead) == 1 else y.reshape(*lead, self.n_out)
            bits = bitops.pack_signs(z)
            start = 1
        else:
            bits, start = bitops.pack_signs(xn), 0
        last = len(self.A) - 1
        for i in range(start, last):
            bits = bitops.xnor_matmul_signs(bits, self.packed[i], self.k[i], self.A[i], self.B[i])
        y = torch.from_numpy(bitops.xnor_matmul(bits, self.packed[last], self.k[last], self.A[last], None,
                                                self.B[last]))
        return y if len(lead) == 1 else y.reshape(*lead, self.n_out)

    def resident_bytes(self) -> int:
        total = sum(p.nbytes for p in self.packed) + sum(a.nbytes + b.nbytes for a, b in zip(self.A, self.B,
                                                                                             strict=True))
        if self.first_signs is not None:  # the large-batch path of a real-input first layer: float ±1
            total += self.first_signs.numel() * 4
        return total

    def extra_repr(self) -> str:
        first = "real" if self.real_input else "sign"
        return f"layers={self.names}, in={self.n_in}, out={self.n_out}, first input {first}"


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s weights as it will run: parameters and buffers, plus what the runtime
    modules hold outside them (packed numpy arrays, CSR parts). Each tensor's storage is counted once."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if callable(getattr(type(m), "resident_bytes", None)):  # a kernel module counts its own arrays
            total += m.resident_bytes()
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total

