"""Regression: the second-order pruners give the masks and weights they gave before the refactor (issue 35 item 5).

The expected values were produced once by the code before the curvature estimators were split out (commit ee2e541):
kept weights per layer (exact) and the sum of |w| per layer (1e-6 relative), after one-shot pruning a seeded random
MLP (20-16-8-4, 480 weights) on seeded synthetic data. No training: only seeded draws, so the numbers do not depend
on an optimizer's path.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from netsurgeon.data import Split
from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner
from netsurgeon.registry import REGISTRY, StageContext

LAYERS = ("1", "3", "5")


def _model() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(20, 16, bias=False), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                      nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m


def _data(n: int = 256) -> Split:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 20, generator=g)
    y = (x[:, 0, :5].sum(1) > 0).long() + 2 * (x[:, 0, 5:9].sum(1) > 0.5).long()
    return Split(x, y)


def _check(m: nn.Module, expected: dict) -> None:
    for name in LAYERS:
        w = m.get_submodule(name).weight.detach().double()
        kept, abs_sum = expected[name]
        assert int((w != 0).sum()) == kept, name
        assert float(w.abs().sum()) == pytest.approx(abs_sum, rel=1e-6), name


CASES = {  # name: (method, FisherConfig options, update, {layer: (kept, sum |w|)}) at 60% sparsity
    "magnitude": ("magnitude", dict(), "single",
        {"1": (120, 63.572525918483734), "3": (59, 35.15271407365799), "5": (13, 7.787333846092224)}),
    "diag_fisher": ("diag_fisher", dict(num_grads=64, damp=0.001), "single",
        {"1": (107, 53.36018933355808), "3": (60, 33.87082186341286), "5": (25, 9.980240635573864)}),
    "obd": ("obd", dict(num_grads=64, damp=0.001, grad_batch=2), "single",
        {"1": (103, 52.7219457924366), "3": (66, 35.78216750919819), "5": (23, 9.56477515399456)}),
    "obs": ("obs", dict(num_grads=32, damp=0.01), "single",
        {"1": (114, 60.29253275692463), "3": (65, 37.02416332066059), "5": (13, 8.216324985027313)}),
    "obs_joint": ("obs", dict(num_grads=32, damp=0.01), "joint",
        {"1": (114, 62.487805103417486), "3": (65, 38.19972204789519), "5": (13, 8.004038572311401)}),
    "woodfisher_b150": ("woodfisher", dict(num_grads=64, damp=0.001, block_size=150), "single",
        {"1": (115, 60.579008504748344), "3": (58, 34.54595120251179), "5": (19, 9.392674595117569)}),
    "woodfisher_full_joint": ("woodfisher", dict(num_grads=64, damp=0.001, block_size=None), "joint",
        {"1": (120, 61.33740798570216), "3": (59, 35.49502006173134), "5": (13, 8.913933381438255)}),
    "woodfisher_b100_joint": ("woodfisher", dict(num_grads=64, damp=0.001, block_size=100), "joint",
        {"1": (113, 60.77846415992826), "3": (65, 35.74619087949395), "5": (14, 9.777591988444328)}),
    "woodfisher_b40_none": ("woodfisher", dict(num_grads=64, damp=0.001, block_size=40), "none",
        {"1": (110, 57.662365674972534), "3": (71, 36.635349951684475), "5": (11, 7.068572372198105)}),
    "woodfisher_m300_b200": ("woodfisher", dict(num_grads=300, damp=0.0001, block_size=200, seed=3), "single",
        {"1": (131, 61.94787569111213), "3": (57, 32.21310269087553), "5": (4, 3.7728034257888794)}),
    "woodfisher_reldamp": ("woodfisher", dict(num_grads=200, damp=0.1, block_size=None, relative_damp=True), "single",
        {"1": (123, 62.26269996166229), "3": (56, 34.154080241918564), "5": (13, 8.341104328632355)}),
    "woodtaylor_b150": ("woodtaylor", dict(num_grads=64, damp=0.1, block_size=150), "single",
        {"1": (119, 61.01516658067703), "3": (57, 33.00374935567379), "5": (16, 8.832240909337997)}),
    "kfac": ("kfac", dict(num_grads=64, damp=0.01), "single",
        {"1": (130, 63.6867441162467), "3": (49, 30.68762705475092), "5": (13, 7.4618750512599945)}),
    "kfac_joint": ("kfac", dict(num_grads=64, damp=0.01, grad_batch=3), "joint",
        {"1": (133, 64.96271885931492), "3": (46, 29.648891121149063), "5": (13, 8.452706605196)}),
    "kfac_reldamp": ("kfac", dict(num_grads=64, damp=0.5, relative_damp=True), "single",
        {"1": (106, 57.47759933769703), "3": (62, 36.01046723127365), "5": (24, 10.076065242290497)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_prunes_as_before(case):
    method, cfg, update, expected = CASES[case]
    m = _model()
    rep = OneShotPruner(method, FisherConfig(**cfg), update).fit(m, _data()).prune(m, 0.6)
    _check(m, expected)
    assert rep["sparsity"] == pytest.approx(288 / 480)
    if method == "woodtaylor":
        assert rep["step_scale"] == 1.0


OTHER = {
    "refit_0.3": {"1": (216, 85.34340535849333), "3": (94, 44.041398607194424), "5": (26, 10.300570838153362)},
    "refit_0.8": {"1": (55, 36.184772461652756), "3": (28, 20.05320629477501), "5": (13, 8.222284406423569)},
    "loader": {"1": (147, 72.94555082917213), "3": (73, 38.4782183021307), "5": (20, 9.958720311522484)},
    "registry_obd": {"1": (141, 64.10149794071913), "3": (74, 36.96848590672016), "5": (25, 9.607507690787315)},
    "registry_diag_fisher": {"1": (136, 61.377675265073776),
                             "3": (77, 38.3647952452302), "5": (27, 10.329641424119473)},
    "registry_obs": {"1": (150, 73.42106450349092), "3": (76, 40.27893714606762), "5": (14, 8.28542098402977)},
    "registry_woodfisher": {"1": (139, 68.6400345414877), "3": (81, 39.814617201685905), "5": (20, 9.933518275618553)},
    "registry_woodtaylor": {"1": (148, 71.75320306420326), "3": (72, 38.8996122777462), "5": (20, 9.475226998329163)},
    "registry_kfac": {"1": (166, 70.16965673863888), "3": (64, 35.10281597590074), "5": (10, 7.58478119969368)},
}


def test_one_fit_prunes_copies_to_several_sparsities_and_loaders_work_as_before():
    p = OneShotPruner("woodfisher", FisherConfig(num_grads=64, damp=1e-3, block_size=150)).fit(_model(), _data())
    for s in (0.3, 0.8):
        m = _model()
        p.prune(m, s)
        _check(m, OTHER[f"refit_{s}"])
    m, s = _model(), _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(s.x, s.y), batch_size=16)
    cfg = FisherConfig(num_grads=40, grad_batch=4, damp=1e-3, block_size=100)
    OneShotPruner("woodfisher", cfg).fit(m, loader).prune(m, 0.5)
    _check(m, OTHER["loader"])


OPTIONS = {  # key: (type and range, default), as `netsurgeon methods` lists them
    "sparsity": ["a number in [0, 1)", 0.9], "num_grads": ["an integer >= 1", 1000],
    "grad_batch": ["an integer >= 1", 1], "damp": ["a number > 0", 1e-05],
    "block_size": ["an integer >= 1 or null", 2000], "relative_damp": ["true/false", False],
    "update": ["one of ['single', 'joint', 'none']", "single"], "seed": ["an integer >= 0", 0],
}


@pytest.mark.parametrize("name", ["obd", "diag_fisher", "obs", "woodfisher", "woodtaylor", "kfac"])
def test_registered_methods_keep_their_options_and_results(name):
    method = REGISTRY[name]
    rows = {r["key"]: [r["type"], r["default"]] for r in method.config.describe()}
    for key, (typ, default) in OPTIONS.items():  # every option as before (new ones may be added)
        assert rows[key] == [typ, 0.1 if (name, key) == ("woodtaylor", "damp") else default], key
    cfg = method.make_config({"sparsity": 0.5, "num_grads": 32, "block_size": 100})
    m = _model()
    method.run(m, cfg, StageContext(data=SimpleNamespace(train=_data())))
    _check(m, OTHER[f"registry_{name}"])
