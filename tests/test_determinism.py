"""The same seed gives the same weights on several threads: the shared-weight forms' gradients are sums over
many weights into few entries, which advanced indexing's backward computes with atomic adds (an order that
changes from run to run); the forms gather with index_select, whose backward sums in order."""

import pytest
import torch

from netsurgeon.forms.hashed import HashedWeights
from netsurgeon.forms.shared import SharedWeights


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _grads(make, runs: int = 6):
    out = []
    for _ in range(runs):
        param, w = make()
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
        (w * g).sum().backward()
        out.append(param.grad.clone())
    return out


def test_shared_codebook_gradient_is_the_same_every_run(two_threads):
    index = torch.randint(0, 33, (1000, 784), generator=torch.Generator().manual_seed(0))

    def make():
        p = SharedWeights(torch.randn(32, generator=torch.Generator().manual_seed(1)), index)
        return p.codebook, p(torch.empty(0))

    grads = _grads(make)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    table = torch.cat([torch.zeros(1), torch.ones(32)])  # the gather is the same values as plain indexing
    assert torch.equal(SharedWeights(torch.ones(32), index)(torch.empty(0)).detach(), table[index])


def test_hashed_bucket_gradient_is_the_same_every_run(two_threads):
    hw = HashedWeights((1000, 784), 98_000, seed=0)
    w0 = torch.randn(98_000, generator=torch.Generator().manual_seed(1))

    def make():
        w = w0.clone().requires_grad_()
        return w, hw(w)

    grads = _grads(make)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    assert torch.equal(hw(w0), w0[hw.idx] * hw.sign.to(w0.dtype))
