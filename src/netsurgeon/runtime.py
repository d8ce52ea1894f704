"""Rebuild a runnable module from a ``.nsz`` file, with kernels that skip pruned work where that pays.

On a 2-core CPU (measurements: docs/design.md, "Runtime kernels") torch's CSR matmul beats a dense
Linear layer at batch 256 from about 90% sparsity, while at batch 1 its fixed per-call cost (~7.5 us)
dominates small layers. So a Linear layer becomes a :class:`CSRLinear` only above ``min_sparsity``
(default 0.9) and, when a ``tune_batch`` is given, only if timing both kernels on that batch size shows
CSR to be faster; convolutions stay dense (unstructured sparsity does not speed them up here; structured
pruning does).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import Tensor, nn

from .coding.nsz import (
    CompressedFile,
    decode_int8,
    decode_shared_parts,
    decode_state,
    load_state_checked,
    read_header,
)
from .stats import measure_latency

__all__ = ["CSRLinear", "sparsify_linear_layers", "int8_linear_layers", "load_compressed"]


def _to_csr(w: Tensor) -> Tensor:
    with warnings.catch_warnings():  # torch flags CSR support as beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return w.to_sparse_csr()


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held as a CSR sparse matrix (only the nonzeros are stored and multiplied)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight_csr = _to_csr(weight.detach())
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sparse.mm(self.weight_csr, x.t()).t()  # (out, in) @ (in, B) -> (B, out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return f"in={self.in_features}, out={self.out_features}, nnz={nnz}"


def _csr_is_faster(dense: nn.Linear, csr: CSRLinear, batch: int, repeats: int = 30) -> bool:
    """Time both kernels on a random (batch, in_features) input; True if CSR wins by more than 5%."""
    x = torch.randn(batch, dense.in_features, generator=torch.Generator().manual_seed(0))
    lat = measure_latency(csr, dense, x, warmup=5, repeats=repeats)
    return lat.speedup > 1.05


@torch.no_grad()
def sparsify_linear_layers(model: nn.Module, min_sparsity: float = 0.9, tune_batch: int | None = None) -> nn.Module:
    """Return a copy of ``model`` whose Linear layers with sparsity >= ``min_sparsity`` are :class:`CSRLinear`.

    With ``tune_batch``, a layer is converted only if CSR measures faster than dense at that batch size,
    so the runtime form is never slower layer by layer than the dense one (up to timing noise).
    """
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, nn.Linear):
            sparsity = 1.0 - float((m.weight != 0).sum()) / m.weight.numel()
            if sparsity >= min_sparsity:
                fast = CSRLinear(m.weight, m.bias)
                if tune_batch is None or _csr_is_faster(m, fast, tune_batch):
                    parent, _, attr = name.rpartition(".")
                    setattr(out.get_submodule(parent), attr, fast)
    return out.eval()


@torch.no_grad()
def int8_linear_layers(model: nn.Module, names: list[str]) -> nn.Module:
    """Return a copy of ``model`` whose Linear layers ``names`` (holding int8-representable weights) run
    PyTorch's dynamic int8 kernels (weights int8, activations quantized on the fly)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    out = copy.deepcopy(model)
    for name in names:
        m = out.get_submodule(name)
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach()
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).double()
        with warnings.catch_warnings():  # torch deprecates quantized tensor creation but has no successor here
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            fast = nnqd.Linear(m.in_features, m.out_features, dtype=torch.qint8)
            fast.set_weight_bias(q, None if m.bias is None else m.bias.detach())
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, fast)
    return out.eval()


def _restore_codecs(model: nn.Module, info: CompressedFile) -> None:
    from torch.nn.utils import parametrize

    from .masks import mask_zeros, prunable_tensors
    from .quantization.kmeans import SharedWeights
    from .quantization.uniform import Int8Weights

    assert info.blobs is not None
    coded = set()
    for rec in info.records:
        if rec.codec not in ("shared", "int8"):
            continue
        mod_name, _, attr = rec.name.rpartition(".")
        module = model.get_submodule(mod_name)
        if rec.codec == "shared":
            book, index = decode_shared_parts(info.path, rec, info.blobs)
            par: nn.Module = SharedWeights(book, index)
        else:
            par = Int8Weights(*decode_int8(info.path, rec, info.blobs))
        parametrize.register_parametrization(module, attr, par, unsafe=True)
        coded.add(rec.name)
    rest = [n for n in prunable_tensors(model, owner="load_compressed") if n not in coded]
    if rest:
        mask_zeros(model, rest)


def load_compressed(path: str | os.PathLike[str], model: nn.Module | None = None, *,
                    sparse_kernels: bool = False, min_sparsity: float = 0.9,
                    tune_batch: int | None = None, int8_kernels: bool = False, trust_code: bool = False,
                    keep_codecs: bool = False, max_elements: int | None = None) -> nn.Module:
    """Load a ``.nsz`` file as a plain ``nn.Module`` in eval mode.

    Args:
        model: a module of the right architecture to fill; by default it is rebuilt from the file's
            ``arch`` record: netsurgeon's models by name, a user's model by its recorded import path and
            keyword arguments (only with ``trust_code=True``: that imports and calls code the file names).
        sparse_kernels: replace sufficiently sparse Linear layers by CSR kernels (faster, see module doc).
        tune_batch: with ``sparse_kernels``, keep a CSR kernel only where it times faster at this batch.
        int8_kernels: run Linear layers stored as ``int8`` with PyTorch's int8 kernels.
        max_elements: the most elements the file may declare (default: bounded by its size, see
            ``coding.schema.max_elements_for``); the header is validated in full before anything is decoded.
        keep_codecs: rebuild k-means-shared and int8 weights in their stored form (codebook + indices, int8 +
            scales, as parametrizations) instead of dense floats, so a later stage (centroid fine-tuning, saving
            again) keeps them; zero weights of other tensors get masks so they stay zero.

    Raises:
        NszError: corrupt/truncated file, or tensors that do not match the model's names or shapes.
        UntrustedCodeError: the file names a user's model factory and ``trust_code`` is False.
    """
    from .modelfile import model_for_file

    info = read_header(path, max_elements=max_elements)
    # before decoding: a file for another (or a huge) model allocates nothing
    model = model_for_file(model, info.header.get("arch"), {r.name: r.shape for r in info.records},
                           trust_code=trust_code, source=str(path))
    state = decode_state(info)
    load_state_checked(model, state, str(path))
    if keep_codecs:
        _restore_codecs(model, info)
    info = CompressedFile(info.path, info.file_bytes, info.dense_bytes, info.records, info.header)
    model.eval()
    if int8_kernels:
        model = int8_linear_layers(model, [r.name.rsplit(".", 1)[0] for r in info.records if r.codec == "int8"])
    return sparsify_linear_layers(model, min_sparsity, tune_batch) if sparse_kernels else model
