"""The ``grouped_nm`` storage form (forms/grouped_nm.py): 2:4 pruning then group quantization is written as the kept
codes + one pattern index per group + the grouped scales; the file is ~0.71x int4 alone, loads bit-identical,
runs on QuantNMLinear from the compact arrays within 1.5x the file's bytes, exports to ONNX, and a corrupted file
is a one-line NszError."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import netsurgeon as ns
from netsurgeon.coding.container import NszError
from netsurgeon.forms import EncodeOptions, get_form, stored_parametrization
from netsurgeon.forms.grouped import GroupQuantWeights
from netsurgeon.forms.grouped_nm import GroupQuantNMWeights, from_grouped, pattern_rank, pattern_table
from netsurgeon.fuzz import _pack, check_file, mutate, split_file
from netsurgeon.kernels import simd
from netsurgeon.kernels.modules import resident_bytes
from netsurgeon.nsz import read_header
from netsurgeon.pipeline import Pipeline
from netsurgeon.runtime import compile_runtime
from netsurgeon.stats import num_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _compress(model, pattern="2:4", bits=4, group=128, symmetric=False):
    torch.manual_seed(0)
    pipe = Pipeline.from_spec([{"magnitude": {"pattern": pattern, "epochs": 0}},
                               {"rtn": {"bits": bits, "group_size": group, "symmetric": symmetric}}])
    pipe.run(model)
    return pipe


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))


def test_pattern_index_is_a_bijection_onto_the_combinations():
    for n, m in ((1, 4), (2, 4), (2, 8), (4, 8), (8, 16)):
        table = pattern_table(n, m)
        assert len(table) == math.comb(m, n) and len({tuple(r) for r in table}) == len(table)
        assert (np.diff(table.astype(int), axis=1) > 0).all()
        assert np.array_equal(pattern_rank(table, m), np.arange(len(table)))


@pytest.mark.parametrize("pattern,bits,group,symmetric", [("2:4", 4, 128, False), ("2:4", 3, None, True),
                                                          ("4:8", 4, 64, True)])
def test_sparse_then_quantized_is_written_compact_and_loads_bit_identical(tmp_path, pattern, bits, group,
                                                                         symmetric):
    model = _mlp()
    pipe = _compress(model, pattern, bits, group, symmetric)
    path = tmp_path / "m.nsz"
    pipe.save(model, path)
    info = read_header(path)
    n, m = map(int, pattern.split(":"))
    weights = [r for r in info.records if r.name.endswith("weight")]
    assert {(r.codec, r.extra["n"], r.extra["m"], r.code_bits) for r in weights} == {("grouped_nm", n, m, bits)}
    # against the same codes written by grouped (every code held): codes·N/M + a pattern per M inputs
    grouped = get_form("grouped")
    for r in weights:
        mod = model.get_submodule(r.name.removesuffix(".weight"))
        par = stored_parametrization(mod, "weight")[1]
        full = grouped.encode(r.name, mod.weight, par, EncodeOptions())[0].bytes
        rows, cols = par.q.shape
        groups = math.ceil(cols / (group or cols))
        side = rows * groups * (4 + (0 if symmetric else bits / 8))     # scales (float32) + packed zero points
        expect = (rows * cols * (bits * n / m + math.ceil(math.log2(math.comb(m, n))) / m) / 8 + side) / \
            (rows * cols * bits / 8 + side)
        assert r.bytes / full == pytest.approx(expect, abs=0.002)
        if pattern == "2:4" and bits == 4:
            assert r.bytes < 0.72 * full  # (2 + 0.75 + 0.25 + 0.03) / (4 + 0.25 + 0.03) = 0.708 bits per weight
    loaded = ns.load_compressed(path, _mlp())
    stored = ns.load_compressed(path, _mlp(), keep_codecs=True)
    for i in (0, 2):
        assert torch.equal(loaded[i].weight, model[i].weight)              # bit-identical dequantized weights
        assert torch.equal(stored[i].weight, model[i].weight)
        assert isinstance(stored_parametrization(stored[i], "weight")[1], GroupQuantNMWeights)
    again = tmp_path / "again.nsz"
    ns.save_compressed(stored, again)
    first, second = read_header(path), read_header(again)                   # the stored form saves as it came
    assert second.blobs == first.blobs and second.records == first.records


def test_a_grouped_weight_that_is_not_nm_stays_grouped(tmp_path):
    model = _mlp()
    Pipeline.from_spec([{"magnitude": {"sparsity": 0.5, "epochs": 0}}, {"rtn": {"group_size": 128}}]).run(model)
    path = tmp_path / "m.nsz"
    ns.save_compressed(model, path)
    assert {r.codec for r in read_header(path).records if r.name.endswith("weight")} == {"grouped"}
    par = stored_parametrization(model[0], "weight")[1]
    assert from_grouped(GroupQuantWeights(par.q, par.scales, par.zeros, 4, 128, perm=torch.arange(256))) is None


@pytest.mark.skipif(not simd.available(), reason="needs numba and an AVX-512 host")
def test_runtime_reads_the_compact_arrays_within_one_and_a_half_file_bytes(tmp_path):
    model = _mlp()
    pipe = _compress(model)
    path = tmp_path / "m.nsz"
    pipe.save(model, path)
    records = {r.name: r for r in read_header(path).records}
    stored = ns.load_compressed(path, _mlp(), keep_codecs=True)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    form = get_form("grouped_nm")
    for i, xi in ((0, x), (2, torch.relu(model[0](x)))):
        cands = form.linear_candidates([stored[i]], [False], [str(i)], 0.5)
        assert set(cands) == {"quant_nm", "quant"}
        file_bytes = records[f"{i}.weight"].bytes
        with torch.no_grad():
            ref = model[i](xi)
            for name, mod in cands.items():
                torch.testing.assert_close(mod(xi), ref, rtol=1e-4, atol=1e-4)
                held = resident_bytes(mod) - 4 * model[i].out_features            # bias: not in the weight record
                assert held <= 1.5 * file_bytes, (name, held, file_bytes)
    rt = ns.load_compressed(path, _mlp(), runtime=True)
    with torch.no_grad():
        torch.testing.assert_close(rt(x), model(x), rtol=1e-4, atol=1e-4)
    # a run of Linear + ReLU layers mixing grouped_nm and grouped weights still gets the int4 kernels
    par = stored_parametrization(stored[2], "weight")[1]
    parametrize.remove_parametrizations(stored[2], "weight", leave_parametrized=True)
    parametrize.register_parametrization(stored[2], "weight", par.to_grouped(), unsafe=True)
    rt, plan = compile_runtime(stored, 1, repeats=3)
    assert {"quant", "quant_nm"} <= set(plan.runs[0].latency_ms), plan.runs[0]
    with torch.no_grad():
        torch.testing.assert_close(rt(x), model(x), rtol=1e-4, atol=1e-4)


def test_onnx_export_rebuilds_the_weights_in_the_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from netsurgeon.export import export_onnx

    torch.manual_seed(0)
    model = ns.build_model("lenet300", (1, 8, 8))    # 64 -> 300 -> 100 -> 10: groups of 128 end short (300, 100)
    pipe = _compress(model)
    path = tmp_path / "m.nsz"
    pipe.save(model, path)
    assert {r.codec for r in read_header(path).records if r.name.endswith("weight")} == {"grouped_nm"}
    info = export_onnx(path, tmp_path / "m.onnx")
    assert set(info.compact) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert "ScatterElements" in info.compact["fc1.weight"]
    assert info.max_abs_logit_diff < 1e-5


def _file(tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", (1, 8, 8))
    _compress(model, group=16).save(model, tmp_path / "good.nsz")
    return (tmp_path / "good.nsz").read_bytes()


def _edited(tmp_path, raw, edit):
    header, blobs = split_file(raw)
    edit(next(r for r in header["tensors"] if r["name"] == "fc1.weight"), blobs)
    path = tmp_path / "bad.nsz"
    path.write_bytes(_pack(header, blobs))
    return path


@pytest.mark.parametrize("edit,msg", [
    (lambda r, b: b.update({"fc1.weight/patterns": b"\xff" * len(b["fc1.weight/patterns"])}),
     r"a pattern index is 7, past the 6 ways to keep 2 of 4\.$"),
    (lambda r, b: r.update(n=3), r"a grouped_nm record needs .* n 3, m 4, .*entries 9600"),
    (lambda r, b: r.update(m=3), r"inputs and group_size multiples of m.* m 3,"),
    (lambda r, b: r.update(index_bits=2), r"index_bits = ceil\(log2 C\(m, n\)\).* index_bits 2,"),
    (lambda r, b: b.update({"fc1.weight/codes": b["fc1.weight/codes"][:-1]}),
     r"codes stream is 4799 bytes; the record needs 4800 bytes\.$"),
    (lambda r, b: b.update({"fc1.weight/scales": b"\x00\x00\xc0\x7f" * (len(b["fc1.weight/scales"]) // 4)}),
     r"the scale stream holds NaN/inf values\.$"),
])
def test_a_corrupted_file_is_a_one_line_nsz_error(tmp_path, edit, msg):
    path = _edited(tmp_path, _file(tmp_path), edit)
    with pytest.raises(NszError, match=msg) as e:
        ns.load_compressed(path, keep_codecs=True)
    assert "\n" not in str(e.value)


def test_crafted_variants_load_or_raise_nsz_error(tmp_path):
    raw = _file(tmp_path)
    rng = random.Random(0)
    seen = set()
    for i in range(60):
        path = tmp_path / f"x{i}.nsz"
        path.write_bytes(mutate(raw, rng))
        seen.add(check_file(path))
    assert seen <= {"ok", "NszError"}, seen


def test_a_transposed_weight_round_trips_and_its_onnx_nodes_rebuild_it_exactly():
    """A Hugging Face Conv1D weight is stored (in, out); its codes are the (out, in) matrix the N:M groups run
    along. float16 scales: the file's values, exactly."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from netsurgeon.forms._onnx import OnnxGraph
    from netsurgeon.quantization.groupwise import rtn_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g).reshape(24, 16, 4)
    w.scatter_(2, w.abs().argsort(2)[:, :, :2], 0.0)                  # 2:4 along the inputs
    codes, scales, zeros, _ = rtn_quantize(w.reshape(24, 64), 4, 32, symmetric=False)
    par = GroupQuantWeights(codes, scales.half().float(), zeros, 4, 32, shape=(64, 24), transposed=True)
    form = get_form("grouped_nm")
    rec, blobs = form.encode("w", par(torch.empty(0)), par, EncodeOptions("float16"))
    assert (rec.extra["n"], rec.extra["m"], rec.extra["transposed"]) == (2, 4, 1)
    form.check("w", rec, blobs)
    dense = form.decode("w", rec, blobs)
    assert dense.shape == (64, 24) and torch.equal(dense, par(torch.empty(0)))
    graph = OnnxGraph("w")
    form.onnx(graph, rec, dense.numpy(), form.parts(form._parts("w", rec, blobs), dense))
    model = helper.make_model(helper.make_graph(graph.nodes, "g", [], [helper.make_tensor_value_info(
        "w", TensorProto.FLOAT, [64, 24])], initializer=graph.inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(got, dense.numpy())
