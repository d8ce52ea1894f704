"""The benchmarks run their methods through ``ns.Pipeline`` (issue 35, item 6): for every stage list a benchmark
builds, the pipeline leaves exactly the weights (and the same .nsz bytes) that the direct calls the benchmark made
before left, from the same model and seed. So a committed number stays valid where only the code path changed
(docs/bench_pipeline.md)."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import netsurgeon as ns

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
common = pytest.importorskip("_common")


def _data(n_train: int = 192, seed: int = 0) -> ns.data.Dataset:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return ns.data.Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    return ns.data.Dataset("tiny", split(n_train), split(64), split(64), 10)


def _model(name: str):
    torch.manual_seed(0)
    return ns.build_model(name)


def _same(a, b, tmp_path: Path) -> None:
    """Same weights, buffers and parametrizations (state dicts), and the same file bytes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    fa, fb = tmp_path / "a.nsz", tmp_path / "b.nsz"
    ns.save_compressed(a, fa, value_dtype="float16")
    ns.save_compressed(b, fb, value_dtype="float16")
    assert fa.read_bytes() == fb.read_bytes()


CFG = ns.TrainConfig(epochs=20, lr=0.05, weight_decay=1e-4, schedule="cosine", batch_size=64, seed=3)


@pytest.mark.parametrize("final", [0, 1])
def test_magnitude_stages_are_prune_and_retrain(tmp_path, final):
    from netsurgeon.pruning.magnitude import prune_and_retrain

    data, sparsity = _data(), {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}
    old, new = _model("lenet300"), _model("lenet300")
    prune_and_retrain(old, data, sparsity=sparsity, rounds=3, epochs_per_round=1, scope="layer", config=CFG,
                      lr_factor=0.5)
    if final:
        ns.train(old, data, replace(CFG, lr=CFG.lr * 0.5, epochs=final, seed=CFG.seed + 100))
    common.run_stages(new, common.magnitude_stages(CFG, sparsity=sparsity, rounds=3, epochs=1, lr_factor=0.5,
                                                   final=final), data, progress=False)
    _same(old, new, tmp_path)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_stage_is_quantize_model_int8(tmp_path, per_channel):
    from netsurgeon.quantization.uniform import quantize_model_int8

    old, new = _model("lenet5"), _model("lenet5")
    quantize_model_int8(old, per_channel=per_channel)
    common.run_stages(new, [{"int8": {"per_channel": per_channel}}], progress=False)
    _same(old, new, tmp_path)


def test_qat_stage_is_the_callback_then_int8(tmp_path):
    from netsurgeon.quantization.uniform import QuantizationAwareTraining, quantize_model_int8

    data, cfg = _data(), ns.TrainConfig(epochs=1, lr=0.001, schedule="cosine", seed=1)
    old, new = _model("lenet300"), _model("lenet300")
    ns.train(old, data, cfg, callbacks=[QuantizationAwareTraining()])
    quantize_model_int8(old)
    common.run_stages(new, [{"qat": common.train_options(cfg)}], data, progress=False)
    _same(old, new, tmp_path)


def _pruned(name: str = "lenet5"):
    from netsurgeon.pruning.magnitude import prune_magnitude

    m = _model(name)
    prune_magnitude(m, sparsity=0.8)
    return m


def test_kmeans_then_finetune_stages_are_share_weights_then_train(tmp_path):
    from netsurgeon.quantization.kmeans import share_weights

    data, bits = _data(), {"conv": 8, "fc": 5}
    centroid = ns.TrainConfig(epochs=1, lr=0.001, momentum=0.9, weight_decay=0.0, schedule="cosine", seed=2)
    old, new = _pruned(), _pruned()
    rep = share_weights(old, bits, init="linear")
    ns.train(old, data, centroid)
    rec = common.run_stages(new, [{"kmeans": {"bits": bits, "init": "linear"}}], progress=False)
    assert {r.name: r.rms_error for r in rep} == {n: r["rms_error"] for n, r in rec[0]["report"]["layers"].items()}
    common.run_stages(new, [{"finetune": common.train_options(centroid)}], data, progress=False)
    _same(old, new, tmp_path)


@pytest.mark.parametrize("init", ["density", "random"])
def test_kmeans_stage_inits(tmp_path, init):
    from netsurgeon.quantization.kmeans import share_weights

    old, new = _pruned(), _pruned()
    share_weights(old, {"conv": 8, "fc": 3}, init=init)
    common.run_stages(new, [{"kmeans": {"bits": {"conv": 8, "fc": 3}, "init": init}}], progress=False)
    _same(old, new, tmp_path)


@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_kmeans_stage_is_collect_gradients_then_share_weights_global(tmp_path, weighted):
    from netsurgeon.masks import prunable_tensors
    from netsurgeon.quantization.kmeans import share_weights_global
    from netsurgeon.stats import collect_gradients

    data = _data()
    old, new = _pruned(), _pruned()
    imp = None
    if weighted:  # bench/deep_compression_mnist.py before: the Fisher diagonal computed by hand
        names = prunable_tensors(old)
        diag = collect_gradients(old, data.train, names, 40, 4, seed=0).pow(2).mean(0)
        sizes = [old.get_submodule(n.rsplit(".", 1)[0]).weight.numel() for n in names]
        imp = {n: d.view_as(old.get_submodule(n.rsplit(".", 1)[0]).weight)
               for n, d in zip(names, diag.split(sizes), strict=True)}
    share_weights_global(old, 3, imp)
    common.run_stages(new, [{"hessian_kmeans": {"bits": 3, "weighted": weighted, "num_grads": 40, "grad_batch": 4,
                                                "seed": 0}}], data, progress=False)
    _same(old, new, tmp_path)
