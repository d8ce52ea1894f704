"""A new storage form and a new method are each one module: here both are declared in this test module (registered
at run time, removed after), and a model goes through a pipeline, save, load (stored form kept), the runtime and
ONNX export with nothing else in the package told about them."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import netsurgeon as ns
from netsurgeon import forms, registry
from netsurgeon.coding.bits import pack_bits, packed_size, unpack_bits
from netsurgeon.coding.container import NszError
from netsurgeon.coding.schema import TensorRecord, need_blob
from netsurgeon.forms import EncodeOptions, Form, chain, read_values, register_form
from netsurgeon.registry import MethodConfig, StageContext, option, register


class TernaryWeights(nn.Module):
    """Toy parametrization: w = scale * code, code in {-1, 0, +1}."""

    def __init__(self, codes: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(()))

    def forward(self, w: Tensor) -> Tensor:
        return self.codes.float() * self.scale


class TernaryLinear(nn.Module):
    """Toy runtime module: adds and subtracts inputs where the codes say, then scales."""

    def __init__(self, layer: nn.Linear, par: TernaryWeights) -> None:
        super().__init__()
        self.pos, self.neg = (par.codes == 1).float(), (par.codes == -1).float()
        self.scale, self.bias = float(par.scale), layer.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.pos.T - x @ self.neg.T) * self.scale + self.bias


class Ternary(Form):
    codec = "toy_ternary"
    weight_form = "toy_ternary"
    runtime_names = ("ternary",)
    text = "ternary weights (2 bits each, one scale)"
    parametrization = TernaryWeights

    def encode(self, name, value, par, opts: EncodeOptions, original=None):
        codes = (par.codes.numpy().ravel().astype(np.int64) + 1)  # 0, 1, 2
        data = pack_bits(codes, 2)
        scale = np.array([float(par.scale)], np.float32)
        rec = TensorRecord(name, tuple(value.shape), self.codec, "float32", 0, value.numel(),
                           int((par.codes != 0).sum()), value.numel(), len(data) + 4, code_bits=2, codebook_size=1)
        return rec, {f"{name}/codes": data, f"{name}/scale": scale.tobytes()}

    def check(self, where, rec, blobs: Mapping[str, bytes]):
        if rec.code_bits != 2 or rec.entries != rec.numel:
            raise NszError(f"{where}: a toy_ternary record needs code_bits 2 and entries = numel.")
        return [need_blob(where, rec, blobs, "codes", packed_size(rec.numel, 2)),
                need_blob(where, rec, blobs, "scale", 4)]

    def _parts(self, where, rec, blobs):
        codes = unpack_bits(blobs[f"{rec.name}/codes"], rec.numel, 2).astype(np.int64) - 1
        if codes.max(initial=-1) > 1:
            raise NszError(f"{where}: a ternary code is out of range.")
        scale = read_values(where, blobs.get(f"{rec.name}/scale"), 1, "float32", "scale")
        return torch.from_numpy(codes).reshape(rec.shape), torch.tensor(float(scale[0]))

    def decode(self, where, rec, blobs):
        codes, scale = self._parts(where, rec, blobs)
        return codes.float() * scale

    def attach(self, module, attr, where, rec, blobs):
        par = TernaryWeights(*self._parts(where, rec, blobs))
        torch.nn.utils.parametrize.register_parametrization(module, attr, par, unsafe=True)
        return True

    def parts(self, par, weight):
        return {"q": par.codes, "scale": par.scale}

    def linear_candidates(self, layers, relus, names, density):
        held = [forms.stored_parametrization(m, "weight")[1] for m in layers]
        return {"ternary": chain([TernaryLinear(m, p) for m, p in zip(layers, held, strict=True)], relus)}

    def onnx(self, graph, rec, weight, parts):
        q, scale = parts["q"].numpy(), parts["scale"].numpy().astype(np.float32)
        graph.node("DequantizeLinear", [graph.const(q), graph.const(scale), graph.const(np.zeros((), np.int8))],
                   output=rec.name)
        return "ternary int8 + DequantizeLinear"


@dataclass(frozen=True)
class TernarizeConfig(MethodConfig):
    owner: ClassVar[str] = "toy_ternarize"
    threshold: float = option(0.7, "codes are 0 where |w| < threshold x mean |w|", low=0)


def _ternarize(model: nn.Module, cfg: TernarizeConfig, ctx: StageContext) -> dict[str, Any]:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            codes = torch.where(w.abs() < cfg.threshold * w.abs().mean(), 0, torch.sign(w))
            scale = (w.abs() * (codes != 0)).sum() / (codes != 0).sum().clamp_min(1)
            torch.nn.utils.parametrize.register_parametrization(m, "weight", TernaryWeights(codes, scale),
                                                                unsafe=True)
    return {}


@pytest.fixture
def toy_plugins():
    """Register the toy form and method from this test module; remove them afterwards."""
    ns.pipeline.methods()  # discovery first: the registry is complete before the toys join it
    register_form(Ternary)
    register("toy_ternarize", kind="quantizer", config=TernarizeConfig, gives="toy_ternary",
             citation="a toy for the plugin test (Li & Liu 2016, Ternary Weight Networks, is the real one)",
             summary="ternary weights with one scale per layer", not_compared="a test toy")(_ternarize)
    try:
        yield
    finally:
        forms.FORMS.pop("toy_ternary", None)
        registry.REGISTRY.pop("toy_ternarize", None)


def test_a_form_and_a_method_from_outside_the_package_round_trip(toy_plugins, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", (1, 8, 8))
    pipe = ns.Pipeline.from_spec(["toy_ternarize"])
    pipe.check(has_data=False)
    with pytest.raises(ValueError, match="stage 2 'magnitude' needs float weights, but stage 1 'toy_ternarize' "
                                         "leaves ternary weights"):
        ns.Pipeline.from_spec(["toy_ternarize", "magnitude"]).check(has_data=False)
    pipe.run(model)
    assert forms.weight_form(model) == "toy_ternary"
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "t.nsz"
    info = pipe.save(model, path)
    codecs = {r.name: r.codec for r in info.records}
    assert codecs["fc1.weight"] == "toy_ternary" and codecs["fc1.bias"] == "dense"
    assert {r.name: r.codec for r in ns.nsz.read_header(path).records}["fc1.weight"] == "toy_ternary"  # checked
    kept = ns.load_compressed(path, keep_codecs=True)
    assert isinstance(forms.stored_parametrization(kept.fc1, "weight")[1], TernaryWeights)
    torch.testing.assert_close(kept(x), ref)
    fast, plan = ns.compile_runtime(kept, 5)
    assert {r.weights for r in plan.runs if not r.layers[0].startswith("(whole model)")} == {"toy_ternary"}
    assert {r.form for r in plan.runs if r.weights == "toy_ternary"} <= {"ternary", "dense"}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)
    onnx_info = ns.export_onnx(path, tmp_path / "t.onnx")
    assert onnx_info.compact["fc1.weight"] == "ternary int8 + DequantizeLinear"
    assert onnx_info.max_abs_logit_diff < 1e-4
    out = ns.report.file_table(ns.nsz.read_header(path))
    assert out.row_count == len(info.records)


def test_a_bad_record_of_the_new_form_is_refused_by_its_own_schema(toy_plugins, tmp_path):
    from netsurgeon.coding.container import read_container, write_container

    torch.manual_seed(0)
    model = ns.build_model("lenet300", (1, 8, 8))
    pipe = ns.Pipeline.from_spec(["toy_ternarize"])
    pipe.run(model)
    pipe.save(model, tmp_path / "t.nsz")
    header, blobs = read_container(tmp_path / "t.nsz")
    header.pop("blobs")
    next(t for t in header["tensors"] if t["name"] == "fc1.weight")["code_bits"] = 3
    write_container(tmp_path / "bad.nsz", header, blobs)
    with pytest.raises(NszError, match="a toy_ternary record needs code_bits 2"):
        ns.nsz.read_header(tmp_path / "bad.nsz")


def test_removing_the_toys_leaves_the_registries_as_they_were():
    assert "toy_ternary" not in forms.forms() and "toy_ternarize" not in ns.pipeline.methods()
    with pytest.raises(ValueError, match="unknown method 'toy_ternarize'"):
        ns.pipeline.get_method("toy_ternarize")
