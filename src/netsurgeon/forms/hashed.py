"""The ``hashed`` form: a HashedNets tensor (Chen et al. 2015, arXiv:1504.04788, Eq. (8); ``sharing.hashed``).

In memory the stored tensor is the K real weights w and the virtual tensor is ξ·w[h] (:class:`HashedWeights`;
ξ = 1 everywhere when the layer was hashed without the sign hash). In the file: w, the hash seed, and whether the
sign hash is used (``signed``, written only when it is 0, so files of signed layers keep their earlier bytes);
the index and sign maps are rebuilt from (shape, K, seed) by ``coding.hashing``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.container import NszError
from ..coding.hashing import hash_maps
from ..coding.schema import VALUE_ITEMSIZE, TensorRecord, need_blob
from . import EncodeOptions, Form, read_values, register_form, value_array

__all__ = ["HashedWeights", "Hashed"]


class HashedWeights(nn.Module):
    """Parametrization: stored tensor = the K real weights; forward = the virtual tensor ξ·w[h].

    ``idx`` and ``sign`` are non-persistent buffers rebuilt from (shape, buckets, seed), so a state dict holds
    only w. ``right_inverse`` accepts the dense tensor (projected onto the buckets) or the K-vector itself.
    """

    def __init__(self, shape: tuple[int, ...], buckets: int, seed: int, use_sign: bool = True) -> None:
        super().__init__()
        self.shape, self.buckets, self.seed, self.use_sign = tuple(shape), int(buckets), int(seed), bool(use_sign)
        idx, sign = hash_maps(self.shape, self.buckets, self.seed)
        self.register_buffer("idx", idx, persistent=False)
        self.register_buffer("sign", sign if use_sign else torch.ones_like(sign), persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        # index_select, not w[idx]: advanced indexing's backward adds into the buckets with atomic adds on several
        # threads, so the same seed gave other weights (measured 3e-6 apart per step); index_select's sums in order
        return torch.index_select(w, 0, self.idx.reshape(-1)).view(self.idx.shape) * self.sign.to(w.dtype)

    def right_inverse(self, value: Tensor) -> Tensor:
        if tuple(value.shape) == (self.buckets,):
            return value
        if tuple(value.shape) != self.shape:
            raise ValueError(f"HashedWeights: expected a tensor of shape {list(self.shape)} or ({self.buckets},); "
                             f"got {list(value.shape)}.")
        flat = (value.detach() * self.sign.to(value.dtype)).reshape(-1)
        sums = torch.zeros(self.buckets, dtype=value.dtype, device=value.device)
        sums = sums.index_add_(0, self.idx.reshape(-1), flat)
        counts = torch.bincount(self.idx.reshape(-1), minlength=self.buckets).clamp_min(1).to(value.dtype)
        return sums / counts

    def extra_repr(self) -> str:
        return f"virtual={list(self.shape)}, buckets={self.buckets}, seed={self.seed}, signed={self.use_sign}"


@register_form
class Hashed(Form):
    codec = "hashed"
    weight_form = "hashed"
    text = "hashed weights (HashedNets buckets)"
    parametrization = HashedWeights
    value_dtypes = ("float32", "float16")
    fields = {"seed": (0, 1 << 62, 0), "signed": (0, 1, 1)}
    rank = 20

    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, dict[str, bytes]]:
        assert isinstance(par, HashedWeights) and original is not None
        vals = value_array(name, original, opts.value_dtype)
        extra = {"seed": int(par.seed), **({} if par.use_sign else {"signed": 0})}
        rec = TensorRecord(name, tuple(value.shape), "hashed", opts.value_dtype, 0, value.numel(),
                           int(np.count_nonzero(vals)), vals.size, vals.nbytes, codebook_size=vals.size, extra=extra)
        return rec, {f"{name}/values": vals.tobytes()}

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        # K real weights; the virtual tensor is rebuilt from (shape, K, seed, signed)
        if not 1 <= rec.codebook_size <= max(rec.numel, 1) or rec.entries != rec.codebook_size or rec.index_bits:
            raise NszError(f"{where}: a hashed record needs 1 <= codebook_size (buckets) <= numel ({rec.numel}), "
                           f"entries = codebook_size and index_bits 0; got codebook_size {rec.codebook_size}, "
                           f"entries {rec.entries}, index_bits {rec.index_bits}.")
        return [need_blob(where, rec, blobs, "values", rec.codebook_size * VALUE_ITEMSIZE[rec.value_dtype])]

    def _real(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        vals = read_values(where, blobs.get(f"{rec.name}/values"), rec.codebook_size, rec.value_dtype,
                           "hashed value", finite=False)
        return torch.from_numpy(vals.copy())

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        idx, sign = hash_maps(rec.shape, rec.codebook_size, rec.extra["seed"])
        real = self._real(where, rec, blobs)
        return real[idx] * (sign if rec.extra["signed"] else 1.0)

    def attach(self, module, attr, where, rec, blobs) -> bool:
        from torch.nn.utils import parametrize

        par = HashedWeights(rec.shape, rec.codebook_size, rec.extra["seed"], use_sign=bool(rec.extra["signed"]))
        parametrize.register_parametrization(module, attr, par, unsafe=True)
        with torch.no_grad():  # the K values themselves: a projection loses empty buckets' values
            module.parametrizations[attr].original.copy_(self._real(where, rec, blobs))
        return True

