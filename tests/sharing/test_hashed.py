"""HashedNets (issue 15): the hashes, the gradient of a bucket, the projection, and a file that stores only the
real weights and the seed."""

import math

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.coding.container import NszError, read_container, write_container
from netsurgeon.coding.hashing import hash_maps
from netsurgeon.sharing.hashed import HashedWeights, hash_layers


def test_hash_maps_are_fixed_in_range_and_balanced():
    idx, sign = hash_maps((300, 784), 29_400, seed=5)
    again, sign2 = hash_maps((300, 784), 29_400, seed=5)
    assert torch.equal(idx, again) and torch.equal(sign, sign2)
    assert int(idx.min()) >= 0 and int(idx.max()) < 29_400
    counts = torch.bincount(idx.flatten(), minlength=29_400).float()
    assert abs(float(counts.mean()) - 8.0) < 1e-6 and float(counts.std()) < 4   # ~Poisson(8): no hot bucket
    assert abs(float(sign.mean())) < 0.01
    other, _ = hash_maps((300, 784), 29_400, seed=6)
    assert float((other == idx).float().mean()) < 0.01                           # another seed, another map


def test_bucket_gradient_is_the_signed_sum_and_projection_is_exact():
    par = HashedWeights((6, 5), 7, seed=1)
    w = torch.randn(7, requires_grad=True)
    v = par(w)
    g = torch.randn(6, 5)
    (v * g).sum().backward()
    expected = torch.zeros(7).index_add_(0, par.idx.flatten(), (g * par.sign).flatten())
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(par.right_inverse(v.detach()), w.detach())       # V built from w projects back to w
    with pytest.raises(ValueError, match=r"expected a tensor of shape \[6, 5\] or \(7,\)"):
        par.right_inverse(torch.zeros(3))


def test_hashed_model_stores_only_its_buckets_and_reloads(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    sizes = hash_layers(model, 1 / 8, seed=3)
    assert sizes["fc1"] == {"weight": math.ceil(64 * 300 / 8), "bias": math.ceil(300 / 8)}
    state = model.state_dict()
    assert state["fc1.parametrizations.weight.original"].shape == (2400,)
    assert not any(k.endswith(("idx", "sign")) for k in state)                 # no index tensors stored
    ns.train(model, digits, ns.TrainConfig(epochs=1, lr=0.05))
    model.eval()
    path = tmp_path / "h.nsz"
    info = ns.save_compressed(model, path)
    recs = {r.name: r for r in info.records}
    assert recs["fc1.weight"].codec == "hashed" and recs["fc1.weight"].bytes == 2400 * 4
    assert info.file_bytes < 0.16 * info.dense_bytes
    x = digits.test.x[:8]
    with torch.no_grad():
        expected = model(x)
        for keep in (False, True):
            torch.testing.assert_close(ns.load_compressed(path, keep_codecs=keep)(x), expected)
    again = ns.load_compressed(path, keep_codecs=True)
    assert ns.forms.weight_form(again) == "hashed"
    assert again.fc1.parametrizations.weight.original.shape == (2400,)
    header, blobs = read_container(path)
    next(t for t in header["tensors"] if t["name"] == "fc1.weight")["codebook_size"] = 10 ** 9
    write_container(tmp_path / "bad.nsz", header, blobs)
    with pytest.raises(NszError, match="a hashed record needs 1 <= codebook_size"):
        ns.load_compressed(tmp_path / "bad.nsz")


def test_refusals():
    with pytest.raises(ValueError, match=r"compression must be in \(0, 1\]; got 0"):
        hash_layers(nn.Sequential(nn.Linear(3, 2)), 0)
    with pytest.raises(ValueError, match="no Linear layer to hash"):
        hash_layers(nn.Sequential(nn.Conv2d(1, 2, 3)), 0.5)
    with pytest.raises(ValueError, match="hashednets: compression must be a number in \\(0, 1\\]; got 2"):
        ns.pipeline.get_method("hashednets").make_config({"compression": 2})


def test_runtime_without_the_virtual_matrix_equals_the_hashed_layer():
    from netsurgeon.kernels.hashed import HashedLinearRuntime

    torch.manual_seed(0)
    lin = nn.Linear(37, 11)
    hash_layers(nn.Sequential(lin), 0.25, seed=4, hash_bias=False)
    par = lin.parametrizations.weight[0]
    fast = HashedLinearRuntime(lin.parametrizations.weight.original, par.seed, 37, 11, lin.bias)
    for b in (1, 5):
        x = torch.randn(b, 37)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
    assert fast.resident_bytes() == (math.ceil(0.25 * 37 * 11) + 11) * 4
