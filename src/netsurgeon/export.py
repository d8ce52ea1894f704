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

    from .stats import example_input

    x = example_input(model, input_shape, 1, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the TorchScript exporter: 0.03 s, no onnxscript (docs/runtime.md)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # attention code branches on shapes: fixed per file
        # advanced indexing (Hugging Face's last-token pick) exports as Gather: the warning concerns negative
        # indices; export_onnx's check runs the graph and compares its logits with PyTorch's
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=False)


def export_onnx(path: str | os.PathLike[str], output: str | os.PathLike[str], *, trust_code: bool = False,
                opset: int = 17, compact: bool = True, check: bool = True) -> ExportInfo:
    """Write the model of the ``.nsz`` file ``path`` as ONNX to ``output`` (compact where possible, see the
    module doc); with ``check``, onnxruntime runs it on a random batch and the largest |logit difference| from
    PyTorch is returned."""
    require_onnx()
    import onnx

    from .changes import arch_of
    from .forms import forms, stored_parametrization
    from .forms._onnx import OnnxGraph
    from .modelfile import load_compressed
    from .nsz import read_header

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
    forms_used: dict[str, str] = {}
    if compact:
        inits = {t.name: t for t in proto.graph.initializer}
        state = dense_model.state_dict()
        new_nodes, new_inits = [], []
        known = forms()
        for rec in info.records:
            if rec.name not in inits or rec.name not in state:
                continue
            mod_name, _, attr = rec.name.rpartition(".")
            weight = state[rec.name].detach().float()
            form, par = stored_parametrization(model.get_submodule(mod_name), attr)
            parts = form.parts(par, weight) if form is not None else {"weight": weight}
            g = OnnxGraph(rec.name)
            text = (form or known[rec.codec]).onnx(g, rec, weight.numpy(), parts)
            if text is None:
                continue
            forms_used[rec.name] = text
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

        from .stats import example_input

        x = example_input(dense_model, shape, 4, torch.Generator().manual_seed(0))
        sess = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = dense_model(x).numpy()
        diff = float(np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max())
    return ExportInfo(output, output.stat().st_size, dense_bytes, forms_used, diff)

