"""The compressed-format kernels (runtime/sparse_linear.py, quant_linear.py, sparse_conv.py) against the dense
computation on the same (masked / dequantized) weight."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netsurgeon.kernels import simd
from netsurgeon.kernels.quant_linear import QuantLinear, QuantNMLinear, pack_nibbles, quantize_groups, unpack_nibbles
from netsurgeon.kernels.sparse_conv import SparseConv2d
from netsurgeon.kernels.sparse_linear import NMLinear, SparseLinear

needs_simd = pytest.mark.skipif(not simd.available(), reason="needs numba and an AVX-512 host")


def _close(y, ref, rel=1e-5):
    """Float32 sums in another order: within ``rel`` of the output's largest magnitude."""
    assert y.shape == ref.shape
    err = (y - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-6), err


def _nm_weight(out, n_in, n, m, g):
    w = torch.randn(out, n_in // m, m, generator=g)
    keep = torch.rand(out, n_in // m, m, generator=g).argsort(2)[:, :, :n]
    return (w * torch.zeros_like(w).scatter_(2, keep, 1.0)).reshape(out, n_in)


@needs_simd
@pytest.mark.parametrize("layout", ["window", "hybrid", "gather"])
@pytest.mark.parametrize("n_in,n_out", [(70, 37), (200, 33), (64, 16)])
def test_sparse_linear_equals_masked_dense(layout, n_in, n_out):
    g = torch.Generator().manual_seed(n_in + n_out)
    w = torch.randn(n_out, n_in, generator=g)
    w[torch.rand(n_out, n_in, generator=g) < 0.85] = 0
    b = torch.randn(n_out, generator=g)
    m = SparseLinear.from_dense(w, b, activation="relu", layout=layout)
    assert torch.equal(m.to_dense(), w)
    assert m.nnz == int((w != 0).sum())
    for batch in (1, 5):
        x = torch.randn(batch, n_in, generator=g)
        _close(m(x), F.relu(F.linear(x, w, b)))
    plain = SparseLinear.from_dense(w, None, layout=layout)
    x = torch.randn(3, 4, n_in, generator=g)  # leading dimensions are kept
    _close(plain(x), F.linear(x, w))


@needs_simd
def test_sparse_linear_from_csr_and_memory_bound():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=g)
    w[torch.rand(256, 512, generator=g) < 0.9] = 0
    rows, cols = torch.nonzero(w, as_tuple=True)
    rowptr = np.concatenate([[0], np.cumsum(np.bincount(rows.numpy(), minlength=256))]).astype(np.int32)
    m = SparseLinear.from_csr(rowptr, cols.numpy().astype(np.uint16), w[rows, cols].numpy(), 512, activation="gelu")
    x = torch.randn(2, 512, generator=g)
    _close(m(x), F.gelu(F.linear(x, w)))
    # against the .nsz sparse codec's 4.7 bytes per nonzero the full windows (8.5) are over 1.5x: capped windows
    # plus spilled slots (the hybrid layout) stay inside the bound
    assert "layout=hybrid" in repr(m) and m.layout.spilled
    assert m.resident_bytes() <= 1.5 * m.file_bytes()
    assert SparseLinear.from_dense(w, layout="window").resident_bytes() > 1.5 * m.file_bytes()
    very_sparse = SparseLinear.from_dense(w * (torch.rand(256, 512, generator=g) < 0.05))
    # 99.5% sparse: 2.5 nonzeros a row, so the gather layout's row table (2 bytes a row) is 0.8 bytes per nonzero
    # on top of its 6 (value + uint16 column) against the file's 5.3: within 1.6x, not 1.5x (the bias, a record of
    # its own in the file, not counted)
    held = very_sparse.resident_bytes() - very_sparse.layout.bias.nbytes
    assert "layout=gather" in repr(very_sparse) and held <= 1.6 * very_sparse.file_bytes()
    with pytest.raises(ValueError, match="column indices must lie in"):
        SparseLinear.from_csr([0, 1], [9], [1.0], 4)


def test_unstructured_90_holds_at_most_one_and_a_half_times_its_file_bytes(tmp_path):
    """Issue 38 ("resident weight bytes <= 1.5x the file bytes"): GPT-2's 768 -> 3072 FFN layer, 90% unstructured,
    saved with the default codec (relative gaps + float32 values, 4.7 bytes per nonzero): the full windows would
    hold 8.5 (1.8x); the hybrid layout (windows capped, the rest spilled to gather slots) stays within 1.5x."""
    import netsurgeon as ns
    from netsurgeon.nsz import read_header

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072))
    with torch.no_grad():  # magnitude pruning, 90% of each layer
        w = model[0].weight
        w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.9 * w.numel())).values)
    ns.save_compressed(model, tmp_path / "m.nsz")
    rec = next(r for r in read_header(tmp_path / "m.nsz").records if r.name == "0.weight")
    assert rec.codec == "sparse"
    layer = SparseLinear.from_dense(model[0].weight, model[0].bias)
    assert layer.file_bytes() == rec.bytes                       # the file's own count, not a CSR estimate
    held = layer.resident_bytes() - layer.layout.bias.nbytes     # the bias is a record of its own
    assert held <= 1.5 * rec.bytes, (held, rec.bytes)
    x = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    _close(layer(x), model[0](x).detach())


@needs_simd
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 3), (3, 7)])
def test_nm_linear_equals_masked_dense(n, m):
    g = torch.Generator().manual_seed(10 * n + m)
    n_in = m * 29  # 29 groups: several windows and a partial last one
    w = _nm_weight(35, n_in, n, m, g)
    b = torch.randn(35, generator=g)
    lin = NMLinear.from_dense(w, b, n, m)
    assert torch.equal(lin.to_dense(), w)
    for batch in (1, 5):
        x = torch.randn(batch, n_in, generator=g)
        _close(lin(x), F.linear(x, w, b))
    # the file layout: values and positions in row-major group order
    groups = w.reshape(35, -1, m)
    pos = torch.sort(torch.argsort(-(groups != 0).float(), dim=2, stable=True)[:, :, :n], dim=2).values
    vals = torch.gather(groups, 2, pos).reshape(35, -1)
    again = NMLinear.from_layout(vals.numpy(), pos.reshape(35, -1).numpy().astype(np.uint8), n, m, b.numpy())
    x = torch.randn(2, n_in, generator=g)
    _close(again(x), F.linear(x, w, b))
    full = NMLinear.from_dense(_nm_weight(64, m * 32, n, m, g), None, n, m)  # whole chunks of 16 rows
    assert full.resident_bytes() <= 1.5 * full.file_bytes()


def test_nm_linear_rejects_a_weight_that_is_not_nm():
    w = torch.ones(4, 8)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        NMLinear.from_dense(w, None, 2, 4)
    with pytest.raises(ValueError, match="distinct positions"):
        NMLinear.from_layout(np.ones((1, 2), np.float32), np.zeros((1, 2), np.uint8), 2, 4)


def test_nibbles_round_trip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (5, 13)).astype(np.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 7)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # the even column in the low nibble
    assert packed[0, 6] == codes[0, 12]  # an odd count leaves the last high nibble 0
    np.testing.assert_array_equal(unpack_nibbles(packed, 13), codes)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_nibbles(np.array([[16]]))


def test_quantize_groups_reconstructs_within_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 70)).astype(np.float32)
    for symmetric in (True, False):
        codes, scales, zeros = quantize_groups(w, 4, 32, symmetric)
        assert scales.shape == (6, 3) and codes.max() <= 15
        z = 8 if symmetric else zeros[:, np.arange(70) // 32]
        deq = (codes.astype(np.float32) - z) * scales[:, np.arange(70) // 32]
        assert np.all(np.abs(deq - w) <= 0.5 * scales[:, np.arange(70) // 32] + 1e-6)


@needs_simd
@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("group,symmetric,act_order", [(32, True, False), (64, False, True), (128, True, True)])
def test_quant_linear_equals_exact_dequant(bits, group, symmetric, act_order):
    g = torch.Generator().manual_seed(bits * 1000 + group)
    n_in, n_out = 201, 37  # in not a multiple of the group, odd (a last half byte), rows not a multiple of 16
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g)
    perm = torch.randperm(n_in, generator=g).numpy() if act_order else None
    m = QuantLinear.from_dense(w, b, bits, group, symmetric, perm, activation="relu")
    wq = m.dequantized()
    # the reference dequantizes the file arrays independently of the module's layout
    ws = w.numpy()[:, perm] if act_order else w.numpy()
    codes, scales, zeros = quantize_groups(ws, bits, group, symmetric)
    cols = np.arange(n_in) // group
    z = 2 ** (bits - 1) if symmetric else zeros[:, cols].astype(np.float32)
    ref_w = (codes.astype(np.float32) - z) * scales.astype(np.float16).astype(np.float32)[:, cols]
    if act_order:
        unperm = np.empty_like(ref_w)
        unperm[:, perm] = ref_w
        ref_w = unperm
    np.testing.assert_array_equal(wq.numpy(), ref_w)
    for batch in (1, 5):
        x = torch.randn(batch, n_in, generator=g)
        _close(m(x), F.relu(F.linear(x, wq, b)))


@needs_simd
@pytest.mark.parametrize("n,m,group,symmetric", [(2, 4, 128, True), (2, 4, 20, False), (2, 3, 16, True)])
def test_int4_nm_linear_equals_exact_dequant(n, m, group, symmetric):
    g = torch.Generator().manual_seed(n * 100 + m + group)
    n_in = m * 45
    w = _nm_weight(19, n_in, n, m, g)
    b = torch.randn(19, generator=g)
    lin = QuantNMLinear.from_dense(w, b, n, m, group, symmetric)
    wq = lin.dequantized()
    assert torch.equal(wq != 0, (w != 0) & (wq != 0))  # only kept positions carry weight
    assert (wq - w).abs().max() <= (w.abs().max() / 7) * 0.5 + 1e-6 if symmetric else True
    for batch in (1, 5):
        x = torch.randn(batch, n_in, generator=g)
        _close(lin(x), F.linear(x, wq, b))


@needs_simd
@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 2, 2, 2),
                                                       (1, 1, 0, 1), (1, 2, 0, 1), (2, 2, 1, 1)])
def test_sparse_conv_equals_masked_conv2d(k, stride, padding, dilation):
    g = torch.Generator().manual_seed(k * 100 + stride * 10 + padding + dilation)
    w = torch.randn(6, 5, k, k, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.7] = 0
    b = torch.randn(6, generator=g)
    conv = SparseConv2d.from_dense(w, b, stride, padding, dilation, activation="relu")
    assert torch.equal(conv.to_dense(), w)
    for batch in (1, 3):
        x = torch.randn(batch, 5, 13, 12, generator=g)
        _close(conv(x), F.relu(F.conv2d(x, w, b, stride, padding, dilation)))
    x = torch.randn(2, 5, 13, 12, generator=g).contiguous(memory_format=torch.channels_last)
    _close(conv(x), F.relu(F.conv2d(x, w, b, stride, padding, dilation)))


@needs_simd
def test_resident_bytes_within_one_and_a_half_file_bytes():
    """Layers of whole 16-row chunks (the bias is held by every form and not counted)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g)
    sparse = w * (torch.rand(64, 256, generator=g) >= 0.9)
    nm = _nm_weight(64, 256, 2, 4, g)
    conv = torch.randn(32, 16, 3, 3, generator=g) * (torch.rand(32, 16, 3, 3, generator=g) >= 0.9)
    mods = [SparseLinear.from_dense(sparse), NMLinear.from_dense(nm), QuantLinear.from_dense(w, None, 4, 128),
            QuantLinear.from_dense(w, None, 4, 64, symmetric=False), QuantLinear.from_dense(w, None, 8, 128),
            QuantNMLinear.from_dense(nm, None, group=128), SparseConv2d.from_dense(conv, None, 1, 1)]
    conv_mod = mods[-1]
    conv_mod(torch.randn(1, 16, 14, 14, generator=g))  # builds its per-shape offset table
    for mod in mods:
        held = mod.resident_bytes() - mod.bias.nbytes if not hasattr(mod, "layout") else \
            mod.resident_bytes() - mod.layout.bias.nbytes
        assert held <= 1.5 * mod.file_bytes(), (repr(mod), held, mod.file_bytes())


def test_portable_path_computes_the_same():
    """Without AVX-512 every module falls back to torch on its own reconstruction; both paths agree."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(20, 48, generator=g)
    w[torch.rand(20, 48, generator=g) < 0.8] = 0
    x = torch.randn(3, 48, generator=g)
    mods = [SparseLinear.from_dense(w), NMLinear.from_dense(_nm_weight(20, 48, 2, 4, g), None),
            QuantLinear.from_dense(w, None, 4, 16), QuantNMLinear.from_dense(_nm_weight(20, 48, 2, 4, g), None,
                                                                              group=16)]
    for mod in mods:
        fast = mod(x)
        mod.native = False
        _close(mod(x), fast)
    conv = SparseConv2d.from_dense(torch.randn(3, 2, 3, 3, generator=g), None, 1, 1)
    xc = torch.randn(1, 2, 7, 7, generator=g)
    fast = conv(xc)
    conv.native = False
    _close(conv(xc), fast)


@needs_simd
@pytest.mark.slow  # seconds (a subprocess, a large model or tensor): run by .ci/run
def test_first_kernel_call_keeps_torch_thread_count():
    """Starting numba's threading layer resets OpenMP's thread count (shared with torch); the modules put it back.
    A fresh process: in this one numba's threads may be started already."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from netsurgeon.kernels.sparse_linear import SparseLinear\n"
            "m = SparseLinear.from_dense(torch.eye(16))\n"
            "m(torch.randn(1, 16)); m(torch.randn(1, 16))\n"
            "import numba; print(torch.get_num_threads(), numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]
