"""Model files: dense safetensors files (architecture in the metadata) and ``.nsz`` files, read back as modules.

Nothing here unpickles: a file's tensors go into a module rebuilt from its architecture record
(``architecture.py``) after the record and the tensors' names and shapes are checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._validation import atomic_save, check_finite_model
from .architecture import UntrustedCodeError, check_arch, rebuild_matching
from .changes import apply_changes, arch_of
from .coding.container import NszError
from .forms import forms
from .masks import effective_state_dict, mask_zeros, prunable_tensors
from .nsz import CompressedFile, check_state_shapes, decode_state, load_state_checked, read_header, tensor_shapes

__all__ = ["save_model", "load_model", "load_any", "model_for_file", "load_compressed", "MissingArchitectureError"]


class MissingArchitectureError(NszError):
    """A file records no architecture and no model was given to fill (a plain state dict)."""


def save_model(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s effective weights (masks multiplied in) to a safetensors file, atomically."""
    check_finite_model("save_model", model)
    state = {k: v.contiguous() for k, v in effective_state_dict(model).items()}
    info = {"netsurgeon": json.dumps({"arch": arch_of(model), "meta": meta or {}})}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata=info))


def model_for_file(model: nn.Module | None, arch: Any, shapes: dict[str, tuple[int, ...]], *,
                   trust_code: bool = False, source: str = "file") -> nn.Module:
    """The module a file's tensors go into, checked against the file's tensor ``shapes`` before any data is read:
    ``model`` if given, else the file's architecture record, validated and matched on the meta device first
    (so a record for a huge or different model allocates nothing).

    Raises:
        MissingArchitectureError: no record and no ``model``.
        NszError: a malformed record, or tensors that do not match.
        UntrustedCodeError: the record names a user's factory and ``trust_code`` is False.
    """
    arch = check_arch(source, arch)
    if model is not None and arch:  # a model the user passes: the file's structural changes first
        try:
            apply_changes(model, arch, source)
        except ValueError as e:
            raise NszError(str(e)) from e
    if model is None:
        if not arch or ("name" not in arch and "factory" not in arch):
            raise MissingArchitectureError(f"{source}: the file records no architecture; name the model it holds "
                                           "(CLI: --model NAME or --model pkg.module:factory; Python: pass the model).")
        try:
            model = rebuild_matching(arch, shapes, trust_code=trust_code, source=source)
        except UntrustedCodeError:
            raise
        except ValueError as e:
            raise NszError(str(e)) from e
    check_state_shapes(model, shapes, source)
    return model


def load_model(path: str | os.PathLike[str], model: nn.Module | None = None, *,
               trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Read a dense model file; returns ``(model, meta)``.

    The file is one written by :func:`save_model` (it records the architecture), or any safetensors state
    dict (e.g. ``safetensors.torch.save_file(model.state_dict(), path)``) together with ``model`` to fill.

    Raises:
        NszError: missing/corrupt file, no recorded architecture (and no ``model`` given), or tensors
            that do not match the model.
        UntrustedCodeError: the architecture is a user's factory and ``trust_code`` is False.
    """
    p = Path(path)
    if not p.is_file():
        raise NszError(f"{p}: no such file.")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("netsurgeon", "{}"))
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no data read)
    except (SafetensorError, OSError, ValueError) as e:
        raise NszError(f"{p}: not a readable safetensors file ({e}).") from e
    if not isinstance(header, dict):
        raise NszError(f"{p}: the netsurgeon metadata is not a mapping.")
    model = model_for_file(model, header.get("arch"), shapes, trust_code=trust_code, source=str(p))
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise NszError(f"{p}: not a readable safetensors file ({e}).") from e
    load_state_checked(model, state, str(p))
    meta = header.get("meta", {})
    return model, meta if isinstance(meta, dict) else {}


def _attach_stored_forms(model: nn.Module, info: CompressedFile) -> None:
    """Put each tensor's stored form back on the model (codebooks, int8 codes, ... as parametrizations); tensors
    in a plain form get masks on their zeros so they stay zero."""
    assert info.blobs is not None
    known, held = forms(), set()
    for rec in info.records:
        mod_name, _, attr = rec.name.rpartition(".")
        if known[rec.codec].attach(model.get_submodule(mod_name), attr, info.where(rec), rec, info.blobs):
            held.add(rec.name)
    rest = [n for n in prunable_tensors(model, owner="load_compressed") if n not in held]
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
        runtime: return the fast runtime form (``runtime.compile_runtime``): each run of Linear layers gets the
            kernel that measures fastest at ``batch`` samples with ``threads`` threads; stored forms (k-means,
            int8, ...) then run from their codes where a kernel for them is fastest. The runtime form is for
            inference: tracing it (``torch.onnx.export``) is refused, use ``netsurgeon export``.
        max_elements: the most elements the file may declare (default: bounded by its size, see
            ``coding.schema.max_elements_for``); the header is validated in full before anything is decoded.
        keep_codecs: rebuild every tensor in its stored form (k-means codebook + indices, int8 + scales, ... as
            parametrizations) instead of dense floats, so a later stage (centroid fine-tuning, saving again)
            keeps them; zero weights of other tensors get masks so they stay zero.

    Raises:
        NszError: corrupt/truncated file, or tensors that do not match the model's names or shapes.
        UntrustedCodeError: the file names a user's model factory and ``trust_code`` is False.
    """
    info = read_header(path, max_elements=max_elements)
    # before decoding: a file for another (or a huge) model allocates nothing
    model = model_for_file(model, info.header.get("arch"), tensor_shapes(info), trust_code=trust_code,
                           source=str(path))
    load_state_checked(model, decode_state(info), str(path))
    if keep_codecs or runtime:
        _attach_stored_forms(model, info)
    model.eval()
    if runtime:
        from .runtime import compile_runtime

        return compile_runtime(model, batch, threads=threads)[0]
    return model


def load_any(path: str | os.PathLike[str], model: nn.Module | None = None, *,
             trust_code: bool = False) -> nn.Module:
    """Load a ``.nsz`` or a ``.safetensors`` model file by its extension (dense kernels)."""
    if str(path).endswith(".nsz"):
        return load_compressed(path, model, trust_code=trust_code)
    return load_model(path, model, trust_code=trust_code)[0]
