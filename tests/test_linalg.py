import pytest
import torch

from netsurgeon.linalg import (
    fisher_inverse,
    fisher_inverse_recursive,
    obs_scores,
    obs_update_joint,
    obs_update_single_sum,
    woodbury_rank1_update,
    woodtaylor_scores,
    woodtaylor_update,
)

D = torch.float64


def _grads(m=7, d=6, seed=0):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_woodbury_rank1_update_matches_dense_inverse():
    a = 0.5 * torch.eye(6, dtype=D)
    v = _grads(1)[0]
    got = woodbury_rank1_update(torch.linalg.inv(a), v, n=4)
    torch.testing.assert_close(got, torch.linalg.inv(a + torch.outer(v, v) / 4))


def test_recursion_and_batched_woodbury_equal_the_dense_inverse():
    for m, d, damp in ((7, 6, 1e-2), (3, 10, 1e-5), (40, 5, 1e-3)):
        g = _grads(m, d)
        dense = torch.linalg.inv(damp * torch.eye(d, dtype=D) + g.T @ g / m)
        torch.testing.assert_close(fisher_inverse_recursive(g, damp), dense, rtol=1e-7, atol=1e-7 / damp)
        torch.testing.assert_close(fisher_inverse(g, damp), dense, rtol=1e-7, atol=1e-7 / damp)


def _quadratic(d=5, seed=1):
    a = _grads(d, d, seed)
    h = a @ a.T + 0.5 * torch.eye(d, dtype=D)
    return h, torch.linalg.inv(h)


def test_single_obs_update_zeroes_the_weight_and_matches_the_lagrangian():
    h, hinv = _quadratic()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    q = torch.tensor([False, False, True, False, False])
    dw = obs_update_single_sum(w, hinv, q)
    assert abs(float(w[2] + dw[2])) < 1e-12
    # the increase of the quadratic 0.5 dw'H dw equals the OBS saliency
    torch.testing.assert_close(0.5 * dw @ h @ dw, obs_scores(w, hinv.diagonal())[2])


def test_joint_update_is_exact_and_beats_the_summed_updates():
    h, hinv = _quadratic(seed=3)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    q = torch.tensor([True, False, True, False, True])
    dj = obs_update_joint(w, hinv, q)
    assert torch.allclose((w + dj)[q], torch.zeros(3, dtype=D), atol=1e-12)
    ds = obs_update_single_sum(w, hinv, q)
    ds[q] = -w[q]  # the summed rule then zeroes Q by masking
    assert 0.5 * dj @ h @ dj <= 0.5 * ds @ h @ ds + 1e-12
    # brute force: the joint solution minimizes the quadratic over all dw with (w+dw)_Q = 0
    free = ~q
    best = -torch.linalg.solve(h[free][:, free], h[free][:, q] @ (-w[q]))
    brute = torch.zeros_like(w)
    brute[q], brute[free] = -w[q], best
    torch.testing.assert_close(dj, brute)
    single = torch.tensor([False, True, False, False, False])
    torch.testing.assert_close(obs_update_joint(w, hinv, single), obs_update_single_sum(w, hinv, single))


def test_woodtaylor_reduces_to_obs_at_zero_gradient_and_is_optimal_otherwise():
    h, hinv = _quadratic(seed=4)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    zero = torch.zeros(5, dtype=D)
    torch.testing.assert_close(woodtaylor_scores(w, hinv, zero), obs_scores(w, hinv.diagonal()))
    g = torch.tensor([0.3, -0.1, 0.2, 0.0, 0.5], dtype=D)
    q = torch.tensor([False, False, False, True, False])
    dw = woodtaylor_update(w, hinv, g, q)
    assert abs(float(w[3] + dw[3])) < 1e-12
    change = g @ dw + 0.5 * dw @ h @ dw
    # the score is the predicted change up to -1/2 g'H^-1 g, a constant shared by every weight
    torch.testing.assert_close(change, woodtaylor_scores(w, hinv, g)[3] - 0.5 * (g @ hinv @ g))


def test_implicit_inverse_matches_the_explicit_one():
    from netsurgeon.linalg import ImplicitFisherInverse

    g = _grads(5, 12, seed=7)
    dense = fisher_inverse(g, 1e-3)
    imp = ImplicitFisherInverse(g, 1e-3)
    torch.testing.assert_close(imp.diagonal(), dense.diagonal())
    v = _grads(1, 12, seed=8)[0]
    torch.testing.assert_close(imp @ v, dense @ v)
    idx = torch.tensor([1, 4, 9])
    torch.testing.assert_close(imp.columns(idx), dense[:, idx])
    w = _grads(1, 12, seed=9)[0]
    q = torch.zeros(12, dtype=torch.bool)
    q[[0, 3, 4]] = True
    torch.testing.assert_close(obs_update_joint(w, imp, q), obs_update_joint(w, dense, q))
    torch.testing.assert_close(obs_update_single_sum(w, imp, q), obs_update_single_sum(w, dense, q))


def test_woodtaylor_scores_rank_the_same_block_wise_as_on_the_whole_block_diagonal_matrix():
    """Regression (issue 13): a per-block constant made blocks shift against each other in a global ranking."""
    from netsurgeon.linalg import woodtaylor_scores

    g = torch.Generator().manual_seed(0)
    blocks = []
    for n in (5, 7):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        blocks.append(torch.linalg.inv(a @ a.T + n * torch.eye(n, dtype=torch.float64)))
    w = torch.randn(12, generator=g, dtype=torch.float64)
    grad = torch.randn(12, generator=g, dtype=torch.float64)
    whole = woodtaylor_scores(w, torch.block_diag(*blocks), grad)
    parts = torch.cat([woodtaylor_scores(w[:5], blocks[0], grad[:5]), woodtaylor_scores(w[5:], blocks[1], grad[5:])])
    torch.testing.assert_close(parts, whole)
    assert torch.equal(torch.argsort(parts), torch.argsort(whole))


def test_nearest_psd_clips_negative_eigenvalues_and_keeps_psd_matrices():
    from netsurgeon.linalg import nearest_psd

    v = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=D))[0]
    h = (v * torch.tensor([3.0, 1.0, -2.0, -0.5], dtype=D)) @ v.T
    torch.testing.assert_close(nearest_psd(h), (v * torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=D)) @ v.T)
    a = (v * torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=D)) @ v.T
    torch.testing.assert_close(nearest_psd(a), a)


def test_inverse_cholesky_upper_and_layer_damping():
    from netsurgeon.linalg import damp_layer_hessian, inverse_cholesky_upper

    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5, generator=g, dtype=torch.float64)
    X[:, 3] = 0                                            # an input that never fires
    H = 2 * X.T @ X / 20
    Hd, dead = damp_layer_hessian(H, 0.01)
    assert dead.tolist() == [False, False, False, True, False] and H[3, 3] == 0   # H itself untouched
    expect = H.clone()
    expect[3, 3] = 1.0
    expect += 0.01 * expect.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(Hd, expect)
    U = inverse_cholesky_upper(Hd)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd))
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky_upper(-torch.eye(3))
