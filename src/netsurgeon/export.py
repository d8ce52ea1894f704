"""ONNX export of a ``.nsz`` file that stays small where ONNX allows (``netsurgeon export``).

``torch.onnx.export`` writes every weight dense. Here the dense graph is exported first, then each compressed
weight initializer is replaced by a few constant nodes that rebuild it from its compact form; onnxruntime folds
them once when the session starts, so inference runs on ordinary dense weights:

- int8 (``int8`` records): the int8 tensor and its scales -> ``DequantizeLinear`` (QDQ, per output channel);
- binary (``binary`` records): the ±1 signs as int8 and the scales -> ``DequantizeLinear`` (ONNX has no 1-bit
  type; binarized inputs export as the ops the sign hooks run);
- k-means (``shared``): uint8 codes -> ``Cast`` -> ``Gather`` from the codebook (index 0 = a pruned zero);
- pruned (``sparse``, or ``shared`` with few nonzeros): positions as gaps (uint16 when they fit) -> ``CumSum``
  -> ``ScatterElements`` of the nonzero values (or gathered codes) into zeros -> ``Reshape``.

onnx and onnxruntime are an optional extra: ``pip install 'netsurgeon[onnx]'``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._validation import atomic_save

__all__ = ["export_onnx", "ExportInfo", "require_onnx"]


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    file_bytes: int
    dense_onnx_bytes: int  # what torch.onnx.export alone writes
    compact: dict[str, str]  # tensor name -> the ONNX form it was written in
    max_abs_logit_diff: float | None  # onnxruntime vs PyTorch on a random batch (None: not checked)


def require_onnx(what: str = "ONNX export") -> None:
    """Raise a one-line ImportError naming the extra to install if onnx/onnxruntime are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs onnx and onnxruntime: pip install 'netsurgeon[onnx]' "
                          f"(missing: {e.name}).") from None


def dense_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> None:
    import warnings

    x = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():  # the TorchScript exporter: 0.03 s, no onnxscript (docs/runtime.md)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=False)


class _Graph:
    """Appends constant-building nodes for one weight and names them uniquely."""

    def __init__(self, name: str) -> None:
        self.name, self.inits, self.nodes, self.k = name, [], [], 0

    def const(self, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.k += 1
        n = f"{self.name}__ns{self.k}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        self.k += 1
        out = output or f"{self.name}__ns{self.k}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.name}__{op}{self.k}", **attrs))
        return out


def _positions(g: _Graph, flat_idx: np.ndarray) -> str:
    """int64 positions from gaps stored in the narrowest unsigned type that holds them."""
    from onnx import TensorProto

    gaps = np.diff(flat_idx, prepend=0)
    dtype = np.uint16 if gaps.size == 0 or gaps.max() < 2**16 else np.uint32
    cast = g.node("Cast", [g.const(gaps.astype(dtype))], to=TensorProto.INT64)
    return g.node("CumSum", [cast, g.const(np.array(0, np.int64))])


def _scatter(g: _Graph, flat_idx: np.ndarray, values: str, shape: tuple[int, ...]) -> None:
    from onnx import TensorProto, helper

    zeros = g.node("ConstantOfShape", [g.const(np.array([int(np.prod(shape))], np.int64))],
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    flat = g.node("ScatterElements", [zeros, _positions(g, flat_idx), values], axis=0)
    g.node("Reshape", [flat, g.const(np.array(shape, np.int64))], output=g.name)


def _compact(rec, weight: np.ndarray, parts: dict | None) -> tuple[_Graph, str] | None:
    """Nodes rebuilding ``rec``'s tensor (``weight``: its dense float32 value) in a compact form, or None."""
    from onnx import TensorProto

    g = _Graph(rec.name)
    shape = tuple(weight.shape)
    flat = weight.reshape(-1)
    nz = np.flatnonzero(flat)
    if rec.codec in ("int8", "binary") and parts is not None and weight.ndim >= 2:
        # binary: ONNX has no 1-bit tensor type; the ±1 signs travel as int8 (4x smaller than float32)
        q, scale = parts["q"].numpy(), parts["scale"].numpy().astype(np.float32)
        g.node("DequantizeLinear", [g.const(q), g.const(scale), g.const(np.zeros(scale.shape, np.int8))],
               output=rec.name, **({"axis": 0} if scale.ndim == 1 else {}))
        return g, f"{'±1 as ' if rec.codec == 'binary' else ''}int8 + DequantizeLinear (QDQ)"
    if rec.codec == "shared" and parts is not None:
        index = parts["index"].numpy().reshape(-1)
        table = g.const(np.concatenate([[0.0], parts["book"].numpy()]).astype(np.float32))
        if nz.size < 0.5 * flat.size:
            codes = g.node("Cast", [g.const(index[nz].astype(np.uint8))], to=TensorProto.INT32)
            _scatter(g, nz, g.node("Gather", [table, codes], axis=0), shape)
            return g, "positions (gaps) + uint8 codes -> Gather + ScatterElements"
        codes = g.node("Cast", [g.const(index.astype(np.uint8))], to=TensorProto.INT32)
        flat_w = g.node("Gather", [table, codes], axis=0)
        g.node("Reshape", [flat_w, g.const(np.array(shape, np.int64))], output=rec.name)
        return g, "uint8 codes -> Gather"
    if nz.size < 0.3 * flat.size:  # below ~30% nonzero, positions + values beat dense float32
        half = rec.value_dtype == "float16"
        vals = g.const(flat[nz].astype(np.float16 if half else np.float32))
        if half:
            vals = g.node("Cast", [vals], to=TensorProto.FLOAT)
        _scatter(g, nz, vals, shape)
        return g, f"positions (gaps) + {'float16' if half else 'float32'} values -> ScatterElements"
    return None


def export_onnx(path: str | os.PathLike[str], output: str | os.PathLike[str], *, trust_code: bool = False,
                opset: int = 17, compact: bool = True, check: bool = True) -> ExportInfo:
    """Write the model of the ``.nsz`` file ``path`` as ONNX to ``output`` (compact where possible, see the
    module doc); with ``check``, onnxruntime runs it on a random batch and the largest |logit difference| from
    PyTorch is returned."""
    require_onnx()
    import onnx

    from .coding.nsz import read_header
    from .models import arch_of
    from .runtime import linear_form, load_compressed

    path, output = Path(path), Path(output)
    if output.resolve() == path.resolve():
        raise ValueError(f"export_onnx: the output {str(output)!r} would overwrite the input file.")
    info = read_header(path)
    model = load_compressed(path, trust_code=trust_code, keep_codecs=True)
    shape = tuple((arch_of(model) or {}).get("input_shape") or ())
    if not shape:
        raise ValueError(f"export_onnx: {str(path)!r} records no input shape (its arch has none).")
    dense_model = load_compressed(path, trust_code=trust_code)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        dense_onnx(dense_model, shape, dense_path, opset)
        dense_bytes = dense_path.stat().st_size
        proto = onnx.load(str(dense_path))
    forms: dict[str, str] = {}
    if compact:
        inits = {t.name: t for t in proto.graph.initializer}
        state = dense_model.state_dict()
        new_nodes, new_inits = [], []
        for rec in info.records:
            if rec.name not in inits or rec.name not in state:
                continue
            mod_name, _, attr = rec.name.rpartition(".")
            parts = None
            if rec.codec in ("shared", "int8", "binary") and attr == "weight":
                form, p = linear_form(model.get_submodule(mod_name))  # any layer kind: reads the parametrization
                parts = p if form == rec.codec else None
            built = _compact(rec, state[rec.name].detach().float().numpy(), parts)
            if built is None:
                continue
            g, forms[rec.name] = built
            proto.graph.initializer.remove(inits[rec.name])
            new_inits += g.inits
            new_nodes += g.nodes
        proto.graph.initializer.extend(new_inits)
        old = list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(new_nodes + old)  # constants first: the graph stays topologically sorted
    onnx.checker.check_model(proto)
    atomic_save(output, lambda tmp: onnx.save(proto, str(tmp)))
    diff = None
    if check:
        import onnxruntime as ort

        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
        sess = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = dense_model(x).numpy()
        diff = float(np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max())
    return ExportInfo(output, output.stat().st_size, dense_bytes, forms, diff)

