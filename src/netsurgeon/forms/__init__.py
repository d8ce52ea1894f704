"""Storage forms: each way a weight can be held, declared once, in one module of this package.

A form says how a weight reports it in memory (its parametrization class, e.g. k-means' ``SharedWeights``), how
the ``.nsz`` file writes, checks and reads it (its codec: writer, schema bounds, reader), what the runtime runs it
with (candidate modules for a run of Linear layers) and how ONNX export rebuilds it from a compact form. The file
writer and reader (``nsz.py``), the loader (``modelfile.py``), the pipeline's form checks, the runtime, export and
report all dispatch through :data:`FORMS`; none of them names a form.

| codec      | weights | in memory           | in the file                          | runtime    | ONNX             |
| ---------- | ------- | ------------------- | ------------------------------------ | ---------- | ---------------- |
| dense      | float   | plain tensor        | raw values                           | dense      | initializer      |
| sparse     | float   | (mask)              | gaps + values (Deep Compression)     | fused, csr | ScatterElements  |
| nm         | float   | (mask)              | N of M values + positions            | nm         | initializer      |
| shared     | shared  | SharedWeights       | gaps + book indices (Huffman) + book | fused      | Gather           |
| int8       | int8    | Int8Weights         | int8 + scales                        | int8 chain | DequantizeLinear |
| binary     | binary  | BinaryWeights       | 1 bit per weight + scales            | lut (xnor) | DequantizeLinear |
| hashed     | hashed  | HashedWeights       | K real weights + hash seed           | dense      | initializer      |
| pq         | pq      | ProductQuantized    | codebooks + codes                    | dense      | initializer      |
| grouped    | grouped | GroupQuantWeights   | codes + group scales (+ zeros)       | quant      | initializer      |
| grouped_nm | grouped | GroupQuantNMWeights | kept codes + N:M pattern + scales    | quant_nm   | ScatterElements  |

A form may also write another form's weights (``alternative_to``): ``grouped_nm`` takes a ``grouped`` weight whose
codes leave an N:M pattern, and the writer keeps whichever record is smaller.

Adding a form is one module here (a :class:`Form` subclass decorated with :func:`register_form`) and its tests;
modules are found by walking this package, so nothing else lists them. docs/design.md shows an example.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..coding.schema import TensorRecord

__all__ = ["Form", "EncodeOptions", "register_form", "forms", "get_form", "weight_forms", "form_of",
           "stored_parametrization", "layer_form", "weight_form", "chain", "as_numpy", "value_array",
           "read_values", "linear_candidates", "conv_candidates"]

_VALUE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class EncodeOptions:
    """How the writer stores values: the float dtype, the relative-index width (or "auto"), Huffman coding."""

    value_dtype: str = "float32"
    index_bits: int | str = "auto"
    huffman: bool = True


Blobs = dict[str, bytes]


class Form:
    """One storage form. Subclasses set the class attributes and override what applies to them.

    Attributes:
        codec: the record's ``codec`` field in a ``.nsz`` file (unique).
        weight_form: the pipeline's name for what a model holds after a method leaves this form ("float" for plain
            tensors); methods declare the weight forms they accept and give with these names.
        text: what the pipeline form holds, for messages ("k-means-shared weights (codebook + indices)").
        parametrization: the parametrization class that marks a weight as held in this form (None: a plain
            tensor, possibly masked, for which the writer picks the smallest of the forms without one).
        value_dtypes: the record's allowed ``value_dtype`` values.
        fields: the record's extra integer fields: name -> (low, high, default; None if required).
        preference: among plain-tensor forms of equal size, the lowest wins.
        rank: among the forms in one model, the highest names the model's weight form.
        runtime_names: the names of the runtime candidates :meth:`linear_candidates` offers.
        alternative_to: codecs of other forms whose weights this form may also write: the writer hands it their
            parametrization too (its ``encode`` returns None where it does not apply) and keeps the smallest
            record (ties: the owner's). ``attach`` then puts back this form's own parametrization.
    """

    codec: ClassVar[str]
    weight_form: ClassVar[str]
    text: ClassVar[str]
    parametrization: ClassVar[type[nn.Module] | None] = None
    value_dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    fields: ClassVar[Mapping[str, tuple[int, int, int | None]]] = {}
    preference: ClassVar[int] = 50
    rank: ClassVar[int] = 0
    runtime_names: ClassVar[tuple[str, ...]] = ()
    alternative_to: ClassVar[tuple[str, ...]] = ()

    # -- the file ------------------------------------------------------------------------------------------
    def encode(self, name: str, value: Tensor, par: nn.Module | None, opts: EncodeOptions,
               original: Tensor | None = None) -> tuple[TensorRecord, Blobs] | None:
        """The record and blobs of tensor ``name`` (``value``: its effective dense value; ``par``: the
        parametrization of this form holding it, or None for a plain tensor; ``original``: the tensor the
        parametrization list stores, e.g. a hashed layer's K real weights). None: this form does not apply (or is
        not smaller, for plain-tensor forms)."""
        raise NotImplementedError

    def check(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> list[str]:
        """Check ``rec``'s fields against this codec and its blobs' lengths; return the blob names it owns.
        Raises NszError naming the field (coding.schema helpers: ``need_blob``, ``stream_blobs``)."""
        raise NotImplementedError

    def decode(self, where: str, rec: TensorRecord, blobs: Mapping[str, bytes]) -> Tensor:
        """The tensor as dense values (float32 for float tensors) of ``rec.shape``."""
        raise NotImplementedError

    def attach(self, module: nn.Module, attr: str, where: str, rec: TensorRecord,
               blobs: Mapping[str, bytes]) -> bool:
        """Put the stored form back on ``module.attr`` (a parametrization holding codes, not dense floats), after
        the dense values were loaded. Returns False for a plain-tensor form (the loader masks its zeros)."""
        return False

    def describe(self, rec: TensorRecord) -> str:
        """The codec column of ``netsurgeon info``."""
        return rec.codec

    # -- run time and export ------------------------------------------------------------------------------
    def parts(self, par: nn.Module | None, weight: Tensor) -> dict[str, Tensor]:
        """The stored arrays of a weight in this form (``weight``: its dense value), for the runtime and export."""
        return {"weight": weight}

    def linear_candidates(self, layers: list[nn.Linear], relus: list[bool], names: list[str],
                          density: float) -> dict[str, nn.Module]:
        """Runtime modules (by candidate name) that compute a run of Linear layers (each followed by a ReLU where
        ``relus`` says) from this form; the runtime times them against the dense run and keeps the fastest."""
        return {}

    def conv_candidates(self, conv: nn.Conv2d, density: float) -> dict[str, nn.Module]:
        """Runtime modules (by candidate name) that compute ``conv`` from this form; timed against it."""
        return {}

    def onnx(self, graph: Any, rec: TensorRecord, weight: np.ndarray, parts: dict[str, Tensor]) -> str | None:
        """Append nodes to ``graph`` (export's ``OnnxGraph``) that rebuild the weight (output name ``rec.name``)
        from a compact form, and return a description; None keeps the dense initializer."""
        return None


FORMS: dict[str, Form] = {}
_DISCOVERED = False


def register_form(cls: type[Form]) -> type[Form]:
    """Class decorator: register a :class:`Form`. Raises RuntimeError on a duplicate codec or parametrization."""
    for attr in ("codec", "weight_form", "text"):
        if not isinstance(getattr(cls, attr, None), str):
            raise RuntimeError(f"register_form({cls.__name__}): {attr} must be a string.")
    old = FORMS.get(cls.codec)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise RuntimeError(f"storage form {cls.codec!r} is registered twice ({type(old).__name__}, {cls.__name__}).")
    if cls.parametrization is not None and any(
            f.parametrization is cls.parametrization and f.codec != cls.codec for f in FORMS.values()):
        raise RuntimeError(f"register_form({cls.__name__}): {cls.parametrization.__name__} already marks a form.")
    FORMS[cls.codec] = cls()
    return cls


def forms() -> dict[str, Form]:
    """Every registered form by codec (imports this package's modules on first use)."""
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__, f"{__name__}."):
            if not info.name.rpartition(".")[2].startswith("_"):
                importlib.import_module(info.name)
        _DISCOVERED = True
    return FORMS


def get_form(codec: str) -> Form:
    known = forms()
    if codec not in known:
        raise ValueError(f"unknown storage form {codec!r}; known: {', '.join(sorted(known))}.")
    return known[codec]


def weight_forms() -> dict[str, str]:
    """The pipeline's weight forms and what each holds: ``{"float": "float weights", "shared": ..., ...}``."""
    out = {"float": "float weights"}
    for f in sorted(forms().values(), key=lambda f: f.rank):
        out.setdefault(f.weight_form, f.text)
    return out


def form_of(par: nn.Module | None) -> Form | None:
    """The form whose parametrization ``par`` is (None for masks, gates and anything no form owns)."""
    if par is None:
        return None
    for f in forms().values():
        if f.parametrization is not None and isinstance(par, f.parametrization):
            return f
    return None


def stored_parametrization(module: nn.Module, attr: str) -> tuple[Form | None, nn.Module | None]:
    """The form holding ``module.attr`` and its parametrization, or (None, None) for a plain (or masked) tensor."""
    if parametrize.is_parametrized(module, attr):
        for p in module.parametrizations[attr]:
            f = form_of(p)
            if f is not None:
                return f, p
    return None, None


def layer_form(module: nn.Module, attr: str = "weight") -> tuple[str, Form | None, dict[str, Tensor]]:
    """How ``module.attr`` is held: its pipeline weight form, the form (None: plain float) and its stored arrays
    (``{"weight": dense}`` for plain tensors, masks applied)."""
    f, p = stored_parametrization(module, attr)
    w = getattr(module, attr).detach()
    if f is None:
        return "float", None, {"weight": w}
    return f.weight_form, f, f.parts(p, w)


def weight_form(model: nn.Module) -> str:
    """The weight form of ``model``: the highest-ranked form any of its tensors is held in, else "float"."""
    found = [f for m in model.modules() if parametrize.is_parametrized(m)
             for attr in m.parametrizations for f in [stored_parametrization(m, attr)[0]] if f is not None]
    return max(found, key=lambda f: f.rank).weight_form if found else "float"


def linear_candidates(form: Form | None, layers: list[nn.Linear], relus: list[bool], names: list[str],
                      density: float) -> dict[str, nn.Module]:
    """Runtime candidates for a run of Linear layers held in ``form``; for plain float weights (None) every
    plain form proposes its own (sparse kernels, N:M kernels, ...)."""
    owners = [form] if form is not None else [f for f in forms().values() if f.parametrization is None]
    out: dict[str, nn.Module] = {}
    for f in owners:
        out.update(f.linear_candidates(layers, relus, names, density))
    return out


def conv_candidates(form: Form | None, conv: nn.Conv2d, density: float) -> dict[str, nn.Module]:
    """Runtime candidates for a convolution held in ``form`` (None: plain float, every plain form's)."""
    owners = [form] if form is not None else [f for f in forms().values() if f.parametrization is None]
    out: dict[str, nn.Module] = {}
    for f in owners:
        out.update(f.conv_candidates(conv, density))
    return out


# -- helpers shared by the form modules ---------------------------------------------------------------------
def chain(layers: list[nn.Module], relus: list[bool]) -> nn.Sequential:
    """``layers`` in order, each followed by a ReLU where ``relus`` says: a run of per-layer runtime modules."""
    out: list[nn.Module] = []
    for layer, r in zip(layers, relus, strict=True):
        out += [layer] + ([nn.ReLU()] if r else [])
    return nn.Sequential(*out).eval()


def as_numpy(t: Tensor) -> np.ndarray:
    """A tensor's values as a flat numpy array (on the CPU, detached)."""
    return t.detach().cpu().contiguous().numpy().ravel()


def value_array(name: str, t: Tensor | np.ndarray, value_dtype: str) -> np.ndarray:
    """Float values cast to the stored ``value_dtype``; NaN/inf (or overflow) is a ValueError naming the tensor."""
    arr = as_numpy(t) if isinstance(t, torch.Tensor) else np.asarray(t).ravel()
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        vals = arr.astype(_VALUE_DTYPES[value_dtype])
    if not np.isfinite(vals).all():
        raise ValueError(f"save_compressed: tensor {name!r} does not fit in {value_dtype} (overflow or NaN).")
    return vals


def read_values(where: str, data: bytes | None, count: int, value_dtype: str, what: str = "value",
                finite: bool = True) -> np.ndarray:
    """``count`` stored floats of ``value_dtype`` as float32; a wrong length (or NaN/inf, with ``finite``) is an
    NszError. Weights are checked for NaN by the loader, which names how many; codebooks and scales here."""
    from ..coding.container import NszError

    dt = np.dtype(_VALUE_DTYPES.get(value_dtype, np.float32))
    if data is None or len(data) != count * dt.itemsize:
        raise NszError(f"{where}: {what} stream has the wrong length.")
    vals = np.frombuffer(data, dtype=dt).astype(np.float32)
    if finite and not np.isfinite(vals).all():
        raise NszError(f"{where}: the {what} stream holds NaN/inf values.")
    return vals
