"""Rebuild a runnable module from a ``.nsz`` file, and make it fast: the runtime.

``load_compressed(path)`` gives the model as a plain ``nn.Module`` with dense float weights (what training and
evaluation want); ``load_compressed(path, runtime=True, batch=B)`` gives its runtime form, where each run of
Linear layers computes from the stored form (sparse, k-means codes, int8) with the kernel that measured fastest
for batch ``B``, and a network with convolutions also gets its BatchNorm folded and the memory order and batch
slicing that measured fastest (compile.py, kernels.py, docs/runtime.md). ``bench.latency_report`` is what
``netsurgeon bench-latency`` prints.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..coding import nsz
from ..coding.nsz import CompressedFile, decode_int8, decode_shared_parts, decode_state, load_state_checked, read_header
from .compile import compile_runtime
from .modules import BatchChunks, ChannelsLast, ColumnConv2d, CSRLinear, FusedLinearChain, Int8Chain, resident_bytes
from .plan import RunChoice, RuntimePlan
from .weights import linear_form

__all__ = ["load_compressed", "compile_runtime", "RuntimePlan", "RunChoice", "CSRLinear", "FusedLinearChain",
           "Int8Chain", "ColumnConv2d", "ChannelsLast", "BatchChunks", "resident_bytes", "linear_form"]


def _restore_codecs(model: nn.Module, info: CompressedFile) -> None:
    from torch.nn.utils import parametrize

    from ..masks import mask_zeros, prunable_tensors
    from ..quantization.binary import BinaryWeights
    from ..quantization.kmeans import SharedWeights
    from ..quantization.uniform import Int8Weights

    assert info.blobs is not None
    coded = set()
    for rec in info.records:
        if rec.codec not in ("shared", "int8", "binary", "hashed", "pq"):
            continue
        mod_name, _, attr = rec.name.rpartition(".")
        module = model.get_submodule(mod_name)
        if rec.codec == "shared":
            book, index = decode_shared_parts(info.path, rec, info.blobs)
            par: nn.Module = SharedWeights(book, index)
        elif rec.codec == "hashed":
            from ..sharing.hashed import HashedWeights

            par = HashedWeights(rec.shape, rec.codebook_size, rec.seed)
            parametrize.register_parametrization(module, attr, par, unsafe=True)
            with torch.no_grad():
                module.parametrizations[attr].original.copy_(nsz.decode_hashed(info.path, rec, info.blobs))
            coded.add(rec.name)
            continue
        elif rec.codec == "binary":
            par = BinaryWeights(*nsz.decode_binary(info.path, rec, info.blobs))
        elif rec.codec == "pq":
            from ..quantization.pq import ProductQuantized

            par = ProductQuantized(*nsz.decode_pq(info.path, rec, info.blobs), rec.shape)
        else:
            par = Int8Weights(*decode_int8(info.path, rec, info.blobs))
        parametrize.register_parametrization(module, attr, par, unsafe=True)
        coded.add(rec.name)
    rest = [n for n in prunable_tensors(model, owner="load_compressed") if n not in coded]
    if rest:
        mask_zeros(model, rest)


def load_compressed(path: str | os.PathLike[str], model: nn.Module | None = None, *, runtime: bool = False,
                    batch: int = 1, threads: int | None = None, trust_code: bool = False,
                    keep_codecs: bool = False, max_elements: int | None = None) -> nn.Module:
    """Load a ``.nsz`` file as a plain ``nn.Module`` in eval mode.

    Args:
        model: a module of the right architecture to fill; by default it is rebuilt from the file's
            ``arch`` record: netsurgeon's models by name, a user's model by its recorded import path and
            keyword arguments (only with ``trust_code=True``: that imports and calls code the file names).
        runtime: return the fast runtime form (:func:`compile_runtime`): each run of Linear layers gets the
            kernel that measures fastest at ``batch`` samples with ``threads`` threads (fused sparse, codebook,
            int8, CSR or dense); k-means and int8 layers then run from their codes, with no dense copy; a
            convolution with all-zero lowered columns (SSL's filter shapes) gets an im2col over its kept
            columns where that is faster.
        max_elements: the most elements the file may declare (default: bounded by its size, see
            ``coding.schema.max_elements_for``); the header is validated in full before anything is decoded.
        keep_codecs: rebuild k-means-shared and int8 weights in their stored form (codebook + indices, int8 +
            scales, as parametrizations) instead of dense floats, so a later stage (centroid fine-tuning, saving
            again) keeps them; zero weights of other tensors get masks so they stay zero.

    Raises:
        NszError: corrupt/truncated file, or tensors that do not match the model's names or shapes.
        UntrustedCodeError: the file names a user's model factory and ``trust_code`` is False.
    """
    from ..modelfile import model_for_file

    info = read_header(path, max_elements=max_elements)
    # before decoding: a file for another (or a huge) model allocates nothing
    model = model_for_file(model, info.header.get("arch"), {r.name: r.shape for r in info.records},
                           trust_code=trust_code, source=str(path))
    state = decode_state(info)
    load_state_checked(model, state, str(path))
    if keep_codecs or runtime:
        _restore_codecs(model, info)
    model.eval()
    if runtime:
        return compile_runtime(model, batch, threads=threads)[0]
    return model
