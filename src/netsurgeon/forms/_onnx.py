"""ONNX node builders shared by the storage forms' ``onnx`` hooks (onnx is imported only when a graph is built).

Each compact weight becomes a few constant nodes that rebuild it; onnxruntime folds them once when the session
starts, so inference runs on ordinary dense weights while the file stays small.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OnnxGraph", "scatter", "sparse_values"]


class OnnxGraph:
    """Appends constant-building nodes for one weight and names them uniquely; the last node's output is the
    weight's own name."""

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


def _positions(g: OnnxGraph, flat_idx: np.ndarray) -> str:
    """int64 positions from gaps stored in the narrowest unsigned type that holds them."""
    from onnx import TensorProto

    gaps = np.diff(flat_idx, prepend=0)
    dtype = np.uint16 if gaps.size == 0 or gaps.max() < 2**16 else np.uint32
    cast = g.node("Cast", [g.const(gaps.astype(dtype))], to=TensorProto.INT64)
    return g.node("CumSum", [cast, g.const(np.array(0, np.int64))])


def scatter(g: OnnxGraph, flat_idx: np.ndarray, values: str, shape: tuple[int, ...]) -> None:
    """Nodes writing ``values`` (a graph value) at the flat positions ``flat_idx`` of a zero tensor of ``shape``."""
    from onnx import TensorProto, helper

    zeros = g.node("ConstantOfShape", [g.const(np.array([int(np.prod(shape))], np.int64))],
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    flat = g.node("ScatterElements", [zeros, _positions(g, flat_idx), values], axis=0)
    g.node("Reshape", [flat, g.const(np.array(shape, np.int64))], output=g.name)


def sparse_values(g: OnnxGraph, weight: np.ndarray, value_dtype: str) -> str | None:
    """Below ~30% nonzeros, positions (gaps) + values beat a dense float32 initializer: build them, or None."""
    from onnx import TensorProto

    flat = weight.reshape(-1)
    nz = np.flatnonzero(flat)
    if nz.size >= 0.3 * flat.size:
        return None
    half = value_dtype == "float16"
    vals = g.const(flat[nz].astype(np.float16 if half else np.float32))
    if half:
        vals = g.node("Cast", [vals], to=TensorProto.FLOAT)
    scatter(g, nz, vals, tuple(weight.shape))
    return f"positions (gaps) + {'float16' if half else 'float32'} values -> ScatterElements"
