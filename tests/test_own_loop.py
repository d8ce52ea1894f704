"""Training-time methods in a user's own PyTorch loop, and DataLoaders everywhere data is taken."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import netsurgeon as ns
from netsurgeon.data import from_loaders
from netsurgeon.masks import get_masks, original
from netsurgeon.pipeline import Pipeline
from netsurgeon.pruning import DNS, AutoPrune, OneShotPruner
from netsurgeon.pruning.l1 import L1Proximal
from netsurgeon.pruning.structured import GroupLassoProximal
from netsurgeon.stats import collect_gradients


def _loader(split, batch_size=64):
    return DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=False)


def _trained(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=3, lr=0.05))
    return m


def _own_loop(model, loader, method, epochs, lr=0.01, **prepare):
    method.prepare(model, **prepare)
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if isinstance(method, (L1Proximal, GroupLassoProximal)):  # methods whose step size is lr·λ
        method.prepare(model, optimizer=opt)
    for _ in range(epochs):
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            extra = method.loss(out, (x, y))
            loss = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward()
            opt.step()
            method.after_step()
    return method.finalize(model)


def test_dns_in_own_loop_equals_ns_train_on_the_same_loader(digits):
    a, b = _trained(digits), _trained(digits)
    loader = _loader(digits.train)
    kw = {"c_rate": 1.0, "gamma": 1e-2, "iter_stop": 30}
    _own_loop(a, loader, DNS(**kw), epochs=2)
    cfg = ns.TrainConfig(epochs=2, lr=0.01, seed=0)
    surgery = DNS(**kw)
    ns.train(b, from_loaders(loader, _loader(digits.val)), cfg, callbacks=[surgery])
    surgery.finalize(b)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    kept = sum(float(m.mask.sum()) for m in get_masks(a).values()) / sum(m.mask.numel() for m in get_masks(a).values())
    assert kept < 0.6 and ns.evaluate(a, digits.test)[1] > 0.85
    # finalize froze the masks: more training keeps every pruned weight at exactly zero
    ns.train(a, digits, ns.TrainConfig(epochs=1, lr=0.01))
    for fqn, m in get_masks(a).items():
        assert (original(a, fqn)[m.mask == 0] == 0).all()


def test_autoprune_and_l1_in_own_loop_with_loaders(digits):
    m = _trained(digits)
    ap = AutoPrune(mu=20.0, val_batch=32)
    _own_loop(m, _loader(digits.train), ap, epochs=2, val_data=_loader(digits.val, 32))
    assert ap.kept() == {}  # the gates became plain masks at finalize
    assert set(get_masks(m)) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    nz, total = ns.stats.count_nonzero(m)
    assert nz < 0.9 * total and ns.evaluate(m, digits.test)[1] > 0.8
    with pytest.raises(ValueError, match="AutoPrune: needs a validation split"):
        AutoPrune().prepare(_trained(digits))

    m = _trained(digits)
    _own_loop(m, _loader(digits.train), L1Proximal(0.05), epochs=2)
    nz, total = ns.stats.count_nonzero(m)
    assert nz < 0.8 * total and get_masks(m)  # exact zeros, kept by masks from finalize


def test_loader_gradients_are_the_loaders_batches(digits):
    m = _trained(digits)
    names = ["fc1.weight", "fc3.weight"]
    loader = _loader(digits.train, batch_size=10)
    g = collect_gradients(m, loader, names, num_grads=3, batch_size=4)
    m.eval()
    x, y = digits.train.x[4:8], digits.train.y[4:8]   # the second mini-batch: samples 4..7 of the first batch
    grads = torch.autograd.grad(F.cross_entropy(m(x), y), [m.fc1.weight, m.fc3.weight])
    torch.testing.assert_close(g[1], torch.cat([gr.flatten() for gr in grads]))
    tiny = DataLoader(TensorDataset(digits.train.x[:6], digits.train.y[:6]), batch_size=3)
    assert collect_gradients(m, tiny, names, num_grads=5, batch_size=4).shape == (5, 300 * 64 + 100 * 10)


def test_one_shot_pruner_evaluate_and_pipelines_take_loaders(digits):
    m = _trained(digits)
    pruner = OneShotPruner("woodfisher", ns.pruning.FisherConfig(num_grads=64, block_size=256))
    pruner.fit(m, _loader(digits.train, 16)).prune(m, 0.8)
    assert abs(1 - ns.stats.count_nonzero(m)[0] / ns.stats.count_nonzero(m)[1] - 0.8) < 0.02
    assert ns.evaluate(m, _loader(digits.test, 100)) == pytest.approx(ns.evaluate(m, digits.test))

    m = _trained(digits)
    data = from_loaders(_loader(digits.train), _loader(digits.val), _loader(digits.test))
    assert data.input_shape == digits.input_shape
    Pipeline.from_spec(["woodfisher", "finetune"], ["sparsity=0.9", "num_grads=32", "block_size=512",
                                                    "epochs=1"]).run(m, data)
    assert ns.evaluate(m, digits.test)[1] > 0.85


def test_resume_with_a_loader_gives_the_same_weights(digits, tmp_path):
    from netsurgeon.train import Callback

    class Stop(Callback):
        def after_step(self, trainer=None):
            if trainer.step == 13:
                raise KeyboardInterrupt

    data = from_loaders(_loader(digits.train), _loader(digits.val))
    cfg = ns.TrainConfig(epochs=2, lr=0.05)
    ref = _trained(digits)
    ns.train(ref, data, cfg, callbacks=[DNS(c_rate=1.0)])
    m, ck = _trained(digits), tmp_path / "c.ckpt"
    with pytest.raises(KeyboardInterrupt):
        ns.train(m, data, cfg, callbacks=[DNS(c_rate=1.0), Stop()], checkpoint=ck)
    m2 = _trained(digits)
    ns.train(m2, data, cfg, callbacks=[DNS(c_rate=1.0), Callback()], checkpoint=ck, resume=True)
    for pa, pb in zip(ref.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_a_bare_dataloader_trains_and_runs_pipelines(digits):
    m = _trained(digits)
    loader = _loader(digits.train)
    r = ns.train(m, loader, ns.TrainConfig(epochs=1, lr=0.01))
    assert r.steps == len(loader)
    Pipeline.from_spec(["magnitude", "finetune"], ["sparsity=0.5", "1.epochs=1", "2.epochs=1"]).run(m, loader)
    assert ns.evaluate(m, digits.test)[1] > 0.85
    with pytest.raises(ns.DataError, match="expected a netsurgeon Dataset"):
        ns.train(m, 42)


def test_ssl_in_own_loop_takes_the_learning_rate_from_the_optimizer(digits):
    """The group-Lasso proximal step is lr·λ: in the user's own loop lr comes from the optimizer given to prepare
    (before the fix it was 0 without a trainer: λ = 10 zeroed 0 of fc1's 300 rows)."""
    m = _trained(digits)
    _own_loop(m, _loader(digits.train), GroupLassoProximal(10.0, 0.0, digits.input_shape), epochs=1)
    zero_rows = int((m.fc1.weight.detach().abs().sum(1) == 0).sum())
    assert zero_rows == 300

    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]]))
    prox = GroupLassoProximal(2.0, 0.0, (4,))
    opt = torch.optim.SGD([{"params": [lin[0].weight], "lr": 0.1}, {"params": [lin[2].weight], "lr": 1.0}])
    prox.prepare(lin, optimizer=opt)
    prox.after_step()                                 # one step: each row of layer 0 shrinks by lr·λ = 0.2
    torch.testing.assert_close(lin[0].weight.detach().norm(dim=1), torch.tensor([4.8, 0.3, 0.8]))
    bare = GroupLassoProximal(2.0, 0.0, (4,))
    bare.prepare(lin)                                 # no optimizer: refused at the first step, not silently inert
    with pytest.raises(ValueError, match=r"ssl: the proximal step is lr·λ and no optimizer was given"):
        bare.after_step()
