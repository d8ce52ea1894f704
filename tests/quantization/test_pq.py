import pytest
import torch

import netsurgeon as ns
from netsurgeon.coding.container import NszError
from netsurgeon.pipeline import Pipeline
from netsurgeon.quantization.pq import ProductQuantized, kmeans_vectors, product_quantize, residual_quantize


def test_kmeans_with_as_many_centroids_as_distinct_rows_is_exact():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, generator=g)
    x = base[torch.randint(5, (40,), generator=g)]
    c, codes = kmeans_vectors(x, 5)
    torch.testing.assert_close(c[codes], x)


@pytest.mark.parametrize("shape", [(12, 10), (6, 9, 3, 3)])
def test_pq_layout_rebuilds_the_weight_and_residual_stages_lower_the_error(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    rows = 12 if len(shape) == 2 else 6 * 9
    exact = product_quantize(w, 4, k=rows)  # as many centroids as rows: every segment is its own centroid
    torch.testing.assert_close(exact(w).detach(), w)
    one, two = residual_quantize(w, 4, 1), residual_quantize(w, 4, 2)
    with torch.no_grad():
        assert float((two(w) - w).norm()) < float((one(w) - w).norm())
    coarse = product_quantize(w, 4, k=3)
    assert coarse.codes.shape == (1, rows, 3) and int(coarse.codes.max()) < 3  # ceil(cols / 4) segments
    with pytest.raises(ValueError, match="do not describe a weight"):
        ProductQuantized(coarse.codebooks.detach(), coarse.codes[:, :-1], w.shape)


def test_pq_file_holds_codebooks_and_codes_and_reloads_the_same_module(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    records = Pipeline.from_spec([{"pq": {"k": 16, "sub_dim": 8}}, {"finetune": {"epochs": 1, "max_steps": 5}}]
                                 ).run(model, digits)
    layers = records[0]["report"]["layers"]
    assert layers["fc1"]["bits_per_weight"] < 2.5 and "skipped" in layers["fc3"]  # 10 rows: codebooks dominate
    book_before = model.fc1.parametrizations["weight"][0].codebooks.detach().clone()
    assert not torch.equal(book_before, product_quantize(model.fc1.parametrizations["weight"].original, 8, 16)
                           .codebooks)  # fine-tuning moved the centroids
    x = digits.test.x[:8]
    with torch.no_grad():
        ref = model(x)
    info = ns.save_compressed(model, tmp_path / "m.nsz")
    rec = next(r for r in info.records if r.name == "fc1.weight")
    assert rec.codec == "pq" and rec.code_bits == 4 and rec.extra["subspaces"] == 8  # digits: 64 inputs, 8 segments
    assert rec.bytes == 16 * 8 * 8 * 4 + 300 * 8 * 4 // 8  # the codebooks + 4-bit codes
    for keep in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(ns.load_compressed(tmp_path / "m.nsz", keep_codecs=keep)(x), ref)
    kept = ns.load_compressed(tmp_path / "m.nsz", keep_codecs=True)
    assert isinstance(kept.fc1.parametrizations["weight"][0], ProductQuantized)


def test_a_pq_code_past_the_codebook_is_refused(tmp_path):
    from netsurgeon.coding.container import read_container, write_container

    torch.manual_seed(0)
    model = ns.build_model("lenet300")
    Pipeline.from_spec([{"pq": {"k": 3, "sub_dim": 8, "layers": "fc"}}]).run(model)
    ns.save_compressed(model, tmp_path / "m.nsz")
    header, blobs = read_container(tmp_path / "m.nsz")
    blobs["fc1.weight/codes"] = b"\xff" * len(blobs["fc1.weight/codes"])  # code 3 with k = 3
    write_container(tmp_path / "bad.nsz", header, blobs)
    with pytest.raises(NszError, match="past the codebook's 3 entries"):
        ns.load_compressed(tmp_path / "bad.nsz")


def test_qcnn_response_refinement_lowers_the_layers_response_error():
    """Q-CNN Sec. 3.1: on correlated inputs, codebooks and codes chosen for the response beat Gong's weight-error
    k-means on the response, and each pass of exact block coordinate descent does not increase it."""
    from netsurgeon.quantization.pq import refine_response

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 24, generator=g)
    mix = torch.randn(24, 24, generator=g) * torch.logspace(0, -2, 24)[None, :]  # inputs on a few directions
    x = torch.randn(3000, 24, generator=g) @ mix.T
    par = product_quantize(w, sub_dim=6, k=8)
    target = x @ w.T
    with torch.no_grad():
        before = float((target - x @ par(w).T).norm() / target.norm())
    errors = refine_response(par, x, target, iters=3)
    assert errors[0] == pytest.approx(before, rel=1e-5)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.8 * errors[0]
    with torch.no_grad():  # the parametrization rebuilds the weight whose response was refined
        after = float((target - x @ par(w).T).norm() / target.norm())
    assert after == pytest.approx(errors[-1], rel=1e-4)
    assert int(par.codes.min()) >= 0 and int(par.codes.max()) < 8


def test_pq_response_refinement_as_a_stage_needs_data_and_reports_each_layer(digits):
    from netsurgeon.pipeline import Pipeline

    with pytest.raises(ValueError, match="needs data"):
        Pipeline.from_spec([{"pq": {"response_iters": 1}}]).check(has_data=False)
    with pytest.raises(ValueError, match="set kind=pq"):
        Pipeline.from_spec([{"pq": {"kind": "rq", "response_iters": 1}}])
    _, errs = _refined_stage(digits, "lenet300", sub_dim=8, samples=500)
    assert set(errs) <= {"fc1", "fc2", "fc3"} and errs and all(e[-1] <= e[0] for e in errs.values())


def _refined_stage(digits, name: str, sub_dim: int, samples: int):
    """A briefly trained ``name`` through a pq stage with 2 passes of response refinement: (model, errors)."""
    from netsurgeon.pipeline import Pipeline

    torch.manual_seed(0)
    model = ns.build_model(name, digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.05))
    rec = Pipeline.from_spec([{"pq": {"k": 16, "sub_dim": sub_dim, "response_iters": 2,
                                      "response_samples": samples}}]).run(model, digits)
    return model, rec[0]["report"]["response_error"]


def test_qcnn_conv_response_refinement_matches_the_convolution_and_lowers_its_error():
    """Q-CNN Sec. 3.2: the patch formulation reproduces conv2d exactly, each pass does not increase the response
    error, the refined codebooks beat Gong's on correlated inputs, and the parametrization rebuilds that weight."""
    import torch.nn.functional as F

    from netsurgeon.quantization.pq import _patches, refine_conv_response

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(12, 10, 3, padding=1, stride=2, bias=False)
    w = conv.weight.detach().clone()
    mix = torch.randn(12, 12, generator=g) * torch.logspace(0, -2, 12)[None, :]
    x = torch.einsum("nchw,dc->ndhw", torch.randn(40, 12, 9, 9, generator=g), mix)
    u = _patches(x, conv)
    target = torch.einsum("mpc,opc->mo", u, w.movedim(1, -1).reshape(10, -1, 12))
    assert torch.allclose(target, F.conv2d(x, w, stride=2, padding=1).permute(0, 2, 3, 1).reshape(-1, 10), atol=1e-5)
    par = product_quantize(w, sub_dim=4, k=8)
    with torch.no_grad():
        def err() -> float:
            y = F.conv2d(x, par(w), stride=2, padding=1).permute(0, 2, 3, 1).reshape(-1, 10)
            return float((target - y).norm() / target.norm())
        before = err()
    errors = refine_conv_response(par, u, target, iters=3)
    assert errors[0] == pytest.approx(before, rel=1e-4)
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.8 * errors[0]
    with torch.no_grad():
        assert err() == pytest.approx(errors[-1], rel=1e-3)
    assert int(par.codes.min()) >= 0 and int(par.codes.max()) < 8


def test_pq_response_refinement_reaches_convolutions_in_a_stage(digits):
    model, errs = _refined_stage(digits, "digits_cnn", sub_dim=4, samples=200)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c in errs for c in convs), errs.keys()
    assert all(e[-1] <= e[0] + 1e-9 for e in errs.values())
