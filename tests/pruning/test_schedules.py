import pytest
import torch

import netsurgeon as ns
from netsurgeon.pruning.schedules import GradualPruning, polynomial_sparsity
from netsurgeon.pruning.woodfisher import FisherConfig


def test_cubic_schedule_values():
    assert polynomial_sparsity(0, 0.05, 0.9, 0, 100) == 0.05
    assert polynomial_sparsity(50, 0.05, 0.9, 0, 100) == pytest.approx(0.9 - 0.85 * 0.125)
    assert polynomial_sparsity(100, 0.05, 0.9, 0, 100) == 0.9
    assert polynomial_sparsity(5, 0.05, 0.9, 10, 100) == 0.0


@pytest.mark.parametrize("method", ["magnitude", "woodfisher"])
def test_gradual_pruning_reaches_target_and_fine_tunes(digits, method):
    torch.manual_seed(0)
    m = ns.build_model("mlpnet", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=8, lr=0.05))
    cb = GradualPruning(0.8, start=0, end=60, every=20, method=method,
                        fisher=FisherConfig(num_grads=100, block_size=500, damp=1e-4))
    ns.train(m, digits, ns.TrainConfig(epochs=5, lr=0.01), callbacks=[cb])
    assert [d["step"] for d in cb.steps_done_] == [0, 20, 40, 60]
    assert cb.steps_done_[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    nz, total = ns.stats.count_nonzero(m)
    assert nz / total == pytest.approx(0.2, abs=2e-3)
    assert ns.evaluate(m, digits.test)[1] > 0.85


def test_gradual_errors():
    with pytest.raises(ValueError, match="need 0 <= start < end"):
        GradualPruning(0.5, start=10, end=5, every=1)
    with pytest.raises(ValueError, match=r"target must be a number in \[0, 1\)"):
        GradualPruning(1.2, start=0, end=5, every=1)
