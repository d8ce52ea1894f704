"""SparseGPT, OBC and Wanda against the definitions: exact OBS where SparseGPT is exact, brute-force greedy OBS,
per-row top-k scores, N:M patterns, earlier masks kept."""

import pytest
import torch
from torch import nn

from netsurgeon.data import Dataset, Split
from netsurgeon.linalg import damp_layer_hessian, inverse_cholesky_upper, obs_update_joint
from netsurgeon.masks import get_masks, nm_mask, parse_nm
from netsurgeon.pipeline import Pipeline, get_method
from netsurgeon.pruning.obc import obc_prune
from netsurgeon.pruning.sparsegpt import obs_sweep, sparsegpt_prune
from netsurgeon.pruning.wanda import wanda_mask
from netsurgeon.stats import num_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second torch thread only adds contention on a shared machine (measured: 8x slower)."""
    with num_threads(1):
        yield



def _layer(rows=6, d=12, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return W, 2 * X.T @ X / n


def _exact_obs(W, Hd, keep):
    """Each row's optimum of (w - ŵ)ᵀ Hd (w - ŵ) with ŵ = 0 off ``keep``: the joint OBS update."""
    hinv = torch.linalg.inv(Hd)
    out = W.clone()
    for r in range(W.shape[0]):
        out[r] += obs_update_joint(W[r], hinv, ~keep[r])
        out[r, ~keep[r]] = 0
    return out


def _quad_loss(W, Wq, Hd):
    delta = W - Wq
    return 0.5 * ((delta @ Hd) * delta).sum(1)


def test_nm_mask_keeps_the_n_largest_of_each_group():
    s = torch.tensor([[4.0, 1, 3, 2, 0, 0, 5, 5]])
    assert nm_mask(s, 2, 4).tolist() == [[1, 0, 1, 0, 0, 0, 1, 1]]
    assert parse_nm("x", "2:4") == (2, 4) and parse_nm("x", "unstructured") is None
    for bad in ("4:2", "2:2", "0:4", "2-4", "a:b"):
        with pytest.raises(ValueError, match=r"x: pattern must be 'unstructured' or 'N:M'"):
            parse_nm("x", bad)
    with pytest.raises(ValueError, match="input dimension 6 is not a multiple of M=4"):
        nm_mask(torch.zeros(2, 6), 2, 4)


def test_sparsegpt_equals_exact_obs_when_pruned_weights_lie_left_of_kept_ones():
    """SparseGPT updates only the weights right of a pruned one (Sec. 3.1): exact OBS for the row whenever every
    pruned weight of a row precedes every kept one; the blocks (B=5 < d) do not change that."""
    W, H = _layer()
    Hd, _ = damp_layer_hessian(H, 0.01)
    keep = torch.ones_like(W, dtype=torch.bool)
    for r in range(6):
        keep[r, : r + 2] = False                                # row r prunes its first r + 2 inputs
    res = obs_sweep(W, inverse_cholesky_upper(Hd), block_size=5, keep=keep)
    exact = _exact_obs(W, Hd, keep)
    torch.testing.assert_close(res.weight, exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(obc_prune(W, H, sparsity=0.0, keep=keep).weight, exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.loss, _quad_loss(W, exact, Hd), rtol=1e-9, atol=1e-12)


def test_sparsegpt_with_another_mask_loses_at_least_the_exact_obs_loss():
    W, H = _layer()
    Hd, _ = damp_layer_hessian(H, 0.01)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, 1::2] = False                                       # kept weights left of pruned ones
    res = obs_sweep(W, inverse_cholesky_upper(Hd), block_size=128, keep=keep)
    exact = _quad_loss(W, _exact_obs(W, Hd, keep), Hd)
    assert (res.loss >= exact * (1 - 1e-12)).all() and (res.loss > 1.01 * exact).any()
    assert (res.weight[~keep] == 0).all()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reported_loss_is_half_the_damped_quadratic_form(nm):
    W, H = _layer(rows=5, d=16)
    res = sparsegpt_prune(W, H, sparsity=0.5, nm=nm, block_size=8)
    Hd, _ = damp_layer_hessian(H, 0.01)
    torch.testing.assert_close(res.loss, _quad_loss(W, res.weight, Hd), rtol=1e-9, atol=1e-12)
    assert (res.weight[~res.keep] == 0).all() and int(res.keep.sum()) == 40
    if nm is None:  # one threshold per block of 8 columns: each block keeps half, rows may differ
        assert [int(res.keep[:, a:a + 8].sum()) for a in (0, 8)] == [20, 20]
    else:
        assert (res.keep.view(5, 4, 4).sum(-1) == 2).all()


def _greedy_by_hand(w, Hd, steps, nm=None):
    """Greedy OBS from the definition: at each step remove the weight whose removal (with the remaining ones
    re-optimised by least squares) costs least."""
    d = w.numel()
    removed: list[int] = []
    for _ in range(steps):
        best = None
        for p in range(d):
            if p in removed or (nm and sum(q // nm[1] == p // nm[1] for q in removed) >= nm[1] - nm[0]):
                continue
            Q = torch.tensor(removed + [p])
            K = torch.tensor([j for j in range(d) if j not in removed + [p]], dtype=torch.long)
            new = torch.zeros_like(w)
            if K.numel():
                new[K] = w[K] + torch.linalg.solve(Hd[K][:, K], Hd[K][:, Q] @ w[Q])
            cost = 0.5 * (w - new) @ Hd @ (w - new)
            if best is None or cost < best[0] - 1e-12:
                best = (cost, p, new)
        removed.append(best[1])
    return removed, best[2]


def test_obc_follows_the_greedy_obs_path_of_the_definition():
    W, H = _layer(rows=3, d=8, seed=1)
    Hd, _ = damp_layer_hessian(H, 0.01)
    res = obc_prune(W, H, nm=(2, 4))
    for r in range(3):
        removed, w = _greedy_by_hand(W[r], Hd, 4, nm=(2, 4))
        assert sorted(removed) == (~res.keep[r]).nonzero().flatten().tolist()
        torch.testing.assert_close(res.weight[r], w, rtol=1e-9, atol=1e-10)
    res = obc_prune(W, H, sparsity=0.5)  # unstructured: 12 removals spread over rows by their step losses
    assert int((~res.keep).sum()) == 12
    for r in range(3):
        k = int((~res.keep[r]).sum())
        removed, w = _greedy_by_hand(W[r], Hd, k)
        assert sorted(removed) == (~res.keep[r]).nonzero().flatten().tolist()
        torch.testing.assert_close(res.weight[r], w, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.loss, _quad_loss(W, res.weight, Hd), rtol=1e-9, atol=1e-12)


def test_sparsegpt_and_obc_agree_when_inputs_are_uncorrelated():
    """With a diagonal H there is nothing to compensate: both keep the 2 largest w²·H_jj of each group of 4."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 8, generator=g, dtype=torch.float64)
    H = torch.diag(torch.rand(8, generator=g, dtype=torch.float64) + 0.5)
    a, b = sparsegpt_prune(W, H, nm=(2, 4)), obc_prune(W, H, nm=(2, 4))
    assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(a.weight, W * a.keep, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.weight, W * b.keep, rtol=0, atol=1e-12)
    expect = nm_mask(W.square() * H.diagonal(), 2, 4).bool()
    assert torch.equal(a.keep, expect)


def test_wanda_mask_is_the_per_row_top_k_of_weight_times_input_norm():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(5, 10, generator=g), torch.randn(30, 10, generator=g) * torch.arange(1, 11)
    norm = X.norm(dim=0)
    keep = wanda_mask(W, norm, sparsity=0.3)
    top = torch.topk(W.abs() * norm, 7, dim=1).indices
    assert torch.equal(keep, torch.zeros_like(keep).scatter_(1, top, True))
    nm = wanda_mask(W, norm, nm=(2, 5))
    assert torch.equal(nm, nm_mask(W.abs() * norm, 2, 5).bool())
    prior = torch.ones_like(keep)
    prior[:, 0] = False
    assert not wanda_mask(W, norm, sparsity=0.0, keep=prior)[:, 0].any()
    layer = wanda_mask(W, norm, sparsity=0.3, group="layer")  # one ranking over the layer: the 15 lowest go
    S = (W.abs() * norm).flatten()
    assert torch.equal(layer.flatten(), S >= S.sort().values[15]) and not layer.all(dim=1).all()


def _mlp_data(n=48, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(k):
        return Split(torch.randn(k, d, generator=g), torch.randint(0, 4, (k,), generator=g))
    return Dataset("random", split(n), split(8), split(8), num_classes=4)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def test_wanda_through_the_pipeline_uses_the_training_inputs():
    model, data = _mlp(), _mlp_data()
    w0 = model[0].weight.detach().clone()
    rec = Pipeline.from_spec([{"wanda": {"sparsity": 0.25, "samples": 48}}]).run(model, data)
    norm = data.train.x.norm(dim=0)                     # all 48 training samples are drawn
    top = torch.topk(w0.abs() * norm, 12, dim=1).indices
    assert torch.equal(get_masks(model)["0.weight"].mask.bool(), torch.zeros_like(w0, dtype=torch.bool).scatter_(
        1, top, True))
    assert rec[0]["report"]["kept"] == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "obc"])
def test_two_four_keeps_exactly_two_of_every_four_inputs(method):
    model, data = _mlp(), _mlp_data()
    opts = {"pattern": "2:4", **({"epochs": 0} if method == "magnitude" else {"samples": 16})}
    rec = Pipeline.from_spec([{method: opts}]).run(model, data)
    for name in ("0", "2", "4"):
        w = getattr(model, name).weight.detach()
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert torch.equal(get_masks(model)[f"{name}.weight"].mask, (w != 0).float())
    assert rec[0]["report"]["kept"] == 0.5


def test_layers_n_m_cannot_apply_to_are_skipped_and_listed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    data = Dataset("r", Split(torch.randn(16, 6), torch.zeros(16, dtype=torch.long)), *[Split(torch.randn(4, 6),
                                                                                              torch.zeros(4))] * 2, 4)
    rep = Pipeline.from_spec([{"sparsegpt": {"pattern": "2:4", "samples": 8}}]).run(model, data)[0]["report"]
    assert rep["skipped"] == {"0": "6 inputs per row is not a multiple of M=4"}
    assert list(get_masks(model)) == ["2.weight"]
    rep = Pipeline.from_spec([{"magnitude": {"pattern": "2:4", "epochs": 0}}]).run(model, data)[0]["report"]
    assert rep["skipped"] == {"0": "inputs per row not a multiple of M=4"}


def test_magnitude_n_m_leaves_embeddings_dense_as_the_calibrated_methods_do():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 4), nn.Flatten(), nn.Linear(8, 4))
    data = Dataset("r", *[Split(torch.randint(0, 8, (8, 2)), torch.zeros(8, dtype=torch.long))] * 3, 4)
    rep = Pipeline.from_spec([{"magnitude": {"pattern": "2:4", "epochs": 0}}]).run(model, data)[0]["report"]
    assert "table lookup" in rep["skipped"]["0"]
    assert (model[0].weight != 0).all()
    assert ((model[2].weight != 0).reshape(4, -1, 4).sum(-1) == 2).all()


def test_obc_skips_layers_above_its_size_limit():
    model, data = _mlp(), _mlp_data()
    rep = Pipeline.from_spec([{"obc": {"max_columns": 12, "samples": 8}}]).run(model, data)[0]["report"]
    assert rep["skipped"] == {"0": "16 inputs per row is above max_columns=12 (exact OBS)"}
    assert set(rep["kept_per_layer"]) == {"2", "4"}


def test_sparsegpt_keeps_an_earlier_mask_and_prunes_more():
    model, data = _mlp(), _mlp_data()
    Pipeline.from_spec([{"magnitude": {"sparsity": 0.3, "epochs": 0}}]).run(model, data)
    before = {n: m.mask.clone() for n, m in get_masks(model).items()}
    rep = Pipeline.from_spec([{"sparsegpt": {"sparsity": 0.6, "samples": 16}}]).run(model, data)[0]["report"]
    for n, m in get_masks(model).items():
        assert (m.mask <= before[n]).all()                      # nothing pruned comes back
        assert (model.get_submodule(n.removesuffix(".weight")).weight[m.mask == 0] == 0).all()
    assert rep["kept"] == pytest.approx(0.4, abs=0.02)


def test_config_errors_name_the_method_and_value():
    with pytest.raises(ValueError, match=r"sparsegpt: pattern must be 'unstructured' or 'N:M'.*got '4:2'"):
        get_method("sparsegpt").make_config({"pattern": "4:2"})
    with pytest.raises(ValueError, match=r"magnitude: an N:M pattern is per row; scope must be 'layer'"):
        get_method("magnitude").make_config({"pattern": "2:4", "scope": "global"})
    with pytest.raises(ValueError, match=r"stage 1 'wanda' needs data"):
        Pipeline.from_spec(["wanda"]).run(_mlp())


def test_an_n_m_pattern_survives_yaml_in_set_and_recipes(tmp_path):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 number 124; --set values and recipes keep it a string."""
    assert Pipeline.from_spec(["sparsegpt"], ["pattern=2:4"]).stages[0].config.pattern == "2:4"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - wanda: {pattern: 4:8, samples: 8}\n  - gptq: {bits: 4, damp: 0.01}\n")
    pipe = Pipeline.from_yaml(recipe)
    assert pipe.stages[0].config.pattern == "4:8" and pipe.stages[1].config.damp == 0.01
