"""The model's own device without a GPU (issue 36 item 5): every registered method, run on a small CPU model under
:class:`default_device.DefaultDeviceSpy`, creates no tensor on the default device. On CUDA such a tensor lands on
the CPU beside cuda weights and the first op that mixes them fails; the spy lists each one by file, line and
function, so a failure names the method and the site (docs/device.md)."""

from __future__ import annotations

import json

import pytest
import torch

import netsurgeon as ns
from default_device import DefaultDeviceSpy
from netsurgeon.pipeline import Pipeline, get_method, methods
from test_heads import _data as _token_data
from test_heads import _model as _tiny_lm
from test_pipeline import UserNet, _random_data


def _planted(w: torch.Tensor) -> torch.Tensor:
    return w + torch.zeros(w.shape)  # the bug: a CPU tensor beside cuda weights on a GPU


def _correct(w: torch.Tensor) -> torch.Tensor:
    return w + torch.zeros(w.shape, device=w.device) + torch.zeros_like(w) + w.new_zeros(w.shape)


def test_the_spy_finds_a_planted_default_device_tensor_and_passes_correct_code():
    w = torch.randn(3, 4)
    with DefaultDeviceSpy(roots=(__file__,)) as spy:
        _planted(w)
    assert [(site.split(":")[0], how) for site, how in spy.sites] == [("test_default_device.py", "direct")]
    assert "(_planted)" in spy.report()
    with DefaultDeviceSpy(roots=(__file__,)) as spy:
        _correct(w)
        torch.zeros(3, device="cpu")  # the CPU named: host-side on purpose
    assert not spy.sites, spy.report()


def test_the_spy_finds_a_module_built_without_a_device_and_ignores_other_libraries():
    with DefaultDeviceSpy(roots=(__file__,)) as spy:
        torch.nn.Linear(2, 3)                    # on CUDA: a CPU layer in a cuda model
        torch.nn.Linear(2, 3, device="cpu")
    assert len(spy.sites) == 1
    (site, how), = spy.sites
    assert how == "via torch/nn/modules/linear.py:__init__", how
    with DefaultDeviceSpy() as spy:              # default roots: src/netsurgeon only, not this file
        _planted(torch.randn(2))
    assert not spy.sites


def test_the_meta_default_device_misses_what_the_spy_sees():
    """Why a spy and not ``torch.set_default_device("meta")``: meta kernels check no device, so a buffer made on
    the default device and filled in place (``torch.zeros(n).add_(w)``, which fails on CUDA) passes under meta, and
    a CPU 0-dim tensor or an ``.item()`` of a host tensor (both fine on CUDA) raise under it."""
    w = torch.randn(3, 4)
    with torch.device("meta"):
        with pytest.raises(RuntimeError, match="meta"):
            _planted(w)                                          # caught
        torch.zeros(3, 4).add_(w)                                # missed: raises on CUDA
        with pytest.raises(RuntimeError):
            w + torch.zeros(())                                  # false alarm: a 0-dim CPU tensor is fine on CUDA
    with DefaultDeviceSpy(roots=(__file__,)) as spy:
        torch.zeros(3, 4).add_(w)
    assert len(spy.sites) == 1


def _tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    return model, _random_data((1, 4, 4), n=48)


def _user_net():
    torch.manual_seed(0)
    return UserNet(), _random_data((1, 8, 8), n=48)


def _lenet5():
    torch.manual_seed(0)
    return ns.build_model("lenet5", (1, 28, 28)), _random_data((1, 28, 28), n=48)


def _resnet():
    torch.manual_seed(0)
    return ns.build_model("resnet_small", (1, 8, 8), width=4, blocks=[1, 1]), _random_data((1, 8, 8), n=48)


def _lm():
    return _tiny_lm().train(), _token_data()


# the model each method runs on (a small one it applies to); every other method runs on UserNet (8x8 inputs:
# Conv2d incl. depthwise/grouped, Conv1d, BatchNorm, a residual add, a Linear head)
MODEL = {"ffn_neurons": _tiny_mlp, "datafree": _tiny_mlp, "bnn": _lenet5, "xnor": _lenet5, "slimming": _resnet,
         "heads": _lm, "obs": _tiny_mlp}
# settings beyond `quick` that reach other code: N:M selection, the low-memory Woodbury, Q-CNN refinement,
# residual quantization, the noise distortions, random hashed and k-means init, stochastic binarization
EXTRA = [("woodfisher", {"pattern": "2:4"}), ("woodfisher", {"low_memory": True, "block_size": 64}),
         ("woodtaylor", {"low_memory": True, "block_size": 64}), ("obc", {"pattern": "2:4"}),
         ("kfac", {"pattern": "2:4"}), ("sparsegpt", {"pattern": "2:4"}), ("gptq", {"act_order": True}),
         ("pq", {"response_iters": 1, "response_samples": 16}), ("pq", {"kind": "rq"}),
         ("distort", {"distortion": "noise"}), ("distort", {"distortion": "multiplicative"}),
         ("hashednets", {"init": "random"}), ("kmeans", {"init": "random"}),
         ("fewmult", {"weights": "binary"}), ("binaryconnect", {"stochastic": True}),
         ("datafree", {"zero_partner": True}), ("finetune", {"jitter": 1})]


# in the quick suite: one method per code path (masks and retraining, DNS's surgery, Woodbury and K-FAC curvature,
# the calibrated sweep, group quantization, k-means, int8, structured removal with its records, low rank); every
# other method and setting runs with the slow cases (.ci/run runs both), keeping `pytest -q` under 2 minutes
QUICK = {"magnitude", "dns", "woodfisher", "kfac", "sparsegpt", "gptq", "kmeans", "int8", "heads", "ffn_neurons",
         "l1_filters", "lowrank"}


def _cases():
    """Each method with its quick options; the settings beyond them run with the slow cases."""
    for name in sorted(methods()):
        yield pytest.param(name, {}, id=name, marks=() if name in QUICK else pytest.mark.slow)
    for name, extra in EXTRA:
        tag = ",".join(f"{k}={v}" for k, v in extra.items())
        yield pytest.param(name, extra, id=f"{name}[{tag}]", marks=pytest.mark.slow)


@pytest.mark.parametrize("method,extra", list(_cases()))
def test_no_method_creates_a_tensor_on_the_default_device(method, extra):
    m = get_method(method)
    model, data = MODEL.get(method, _user_net)()             # built outside the spy: only the method is watched
    options = {**m.quick, **extra}
    pipe = Pipeline.from_spec([method] if m.kind != "codec" else ["encode"],
                              [f"{k}={json.dumps(v)}" for k, v in options.items()])
    with DefaultDeviceSpy() as spy:
        pipe.run(model, data)
    assert not spy.sites, (f"{method} {extra or ''} creates tensors on the default device (a GPU run puts them on "
                           f"the CPU beside cuda weights); give them device=:\n{spy.report()}")
