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
# about 30 s of small trainings on the benchmarks' code path: run by .ci/run with the slow cases
pytestmark = pytest.mark.slow


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


def _same_file(a, b, tmp_path: Path, data) -> None:
    """Training-time methods: the stage also runs the method's ``finalize`` (plain masks instead of its own
    parametrization), which the benchmarks did not call; what they measure must not move: the effective weights,
    the file bytes, the outputs."""
    fa, fb = tmp_path / "a.nsz", tmp_path / "b.nsz"
    ns.save_compressed(a, fa, value_dtype="float16")
    ns.save_compressed(b, fb, value_dtype="float16")
    assert fa.read_bytes() == fb.read_bytes()
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(data.test.x), b(data.test.x))
    assert ns.evaluate(a, data.test) == ns.evaluate(b, data.test)
    from netsurgeon.masks import sparsity_report

    assert ns.stats.count_nonzero(a) == ns.stats.count_nonzero(b)
    kept = [[(r.name, r.kept) for r in sparsity_report(m, False)] for m in (a, b)]
    assert kept[0] == kept[1]
    assert ns.stats.total_flops(a, data.input_shape) == ns.stats.total_flops(b, data.input_shape)


AP_CFG = ns.TrainConfig(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine")


def test_dns_stage_is_the_dns_callback(tmp_path):
    from netsurgeon.pruning.dns import DNS

    data, c = _data(), {"fc1": 2.5, "fc2": 2.0, "fc3": 1.5}
    old, new = _model("lenet300"), _model("lenet300")
    ns.train(old, data, AP_CFG, callbacks=[DNS(c_rate=c, gamma=1e-3, iter_stop=2)])
    common.run_stages(new, [{"dns": common.train_options(AP_CFG, c_rate=c, gamma=1e-3, iter_stop=2)}], data,
                      progress=False)
    _same_file(old, new, tmp_path, data)


def test_l1_stage_is_the_proximal_callback(tmp_path):
    from netsurgeon.pruning.l1 import L1Proximal

    data = _data()
    old, new = _model("lenet300"), _model("lenet300")
    ns.train(old, data, AP_CFG, callbacks=[L1Proximal(0.05)])
    common.run_stages(new, [{"l1": common.train_options(AP_CFG, lam=0.05)}], data, progress=False)
    # the stage's finalize masks the exact zeros (mask_zeros): a masked weight comes after its bias in the state
    # dict, so the file lists the same records in another order; the header's offsets then take a few more or
    # fewer digits. Same tensors, same nonzeros, same outputs: only file_bytes moves, by a few bytes.
    fa, fb = tmp_path / "a.nsz", tmp_path / "b.nsz"
    ia, ib = ns.save_compressed(old, fa, value_dtype="float16"), ns.save_compressed(new, fb, value_dtype="float16")
    ra = {r.name: (r.nonzero, r.bytes, r.codec) for r in ns.nsz.read_header(fa).records}
    assert ra == {r.name: (r.nonzero, r.bytes, r.codec) for r in ns.nsz.read_header(fb).records}
    assert abs(ia.file_bytes - ib.file_bytes) < 32
    old.eval(), new.eval()
    with torch.no_grad():
        assert torch.equal(old(data.test.x), new(data.test.x))
    assert torch.equal(ns.load_compressed(fa)(data.test.x), ns.load_compressed(fb)(data.test.x))


def test_autoprune_stage_is_the_callback(tmp_path):
    from netsurgeon.pruning.autoprune import AutoPrune

    data = _data()
    old, new = _model("lenet300"), _model("lenet300")
    ns.train(old, data, AP_CFG, callbacks=[AutoPrune(mu=50.0, m_lr=0.01, stop=2)])
    common.run_stages(new, [{"autoprune": common.train_options(AP_CFG, mu=50.0, m_lr=0.01, stop=2)}], data,
                      progress=False)
    _same_file(old, new, tmp_path, data)


@pytest.mark.parametrize("method,over", [("woodfisher", {"block_size": 100}), ("kfac", {}),
                                         ("woodtaylor", {"block_size": 100, "damp": 0.1})])
def test_second_order_stage_is_fit_then_prune(tmp_path, method, over):
    """bench/_common.py choose_damp: the registered stage instead of OneShotPruner(...).fit(...).prune(...)."""
    from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

    data = _data()
    old, new = _model("mlpnet"), _model("mlpnet")
    cfg = FisherConfig(**{"num_grads": 16, "seed": 0, **over, "damp": 1e-3})
    OneShotPruner(method, cfg).fit(old, data.train).prune(old, 0.9)
    common.run_stages(new, [{method: {"num_grads": 16, "seed": 0, **over, "damp": 1e-3, "sparsity": 0.9}}], data,
                      progress=False)
    _same(old, new, tmp_path)


def test_global_magnitude_stage_is_the_second_order_pruners_magnitude(tmp_path):
    """bench/survey_mnist.py's K-FAC part: its global-magnitude row."""
    from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

    data = _data()
    old, new = _model("mlpnet"), _model("mlpnet")
    OneShotPruner("magnitude", FisherConfig(num_grads=16, seed=0)).fit(old, data.train).prune(old, 0.95)
    common.run_stages(new, [{"magnitude": {"sparsity": 0.95, "scope": "global", "epochs": 0}}], progress=False)
    _same(old, new, tmp_path)


@pytest.mark.parametrize("kind", ["datafree", "zero partner", "no surgery", "l1 neurons"])
def test_neuron_removal_stages(tmp_path, kind):
    """bench/survey_mnist.py's data-free part: merge_neurons / l1_filter_prune called directly before."""
    from netsurgeon.pruning.datafree import merge_neurons, mergeable_layers
    from netsurgeon.pruning.structured import l1_filter_prune

    shape = (1, 28, 28)
    old, new = _model("lenet300"), _model("lenet300")
    fraction = {n: 0.5 for n in mergeable_layers(old, shape)}
    if kind == "l1 neurons":
        l1_filter_prune(old, fraction, shape)
        stage = {"l1_filters": {"fraction": fraction}}
    else:
        merge_neurons(old, fraction, shape, zero_partner=kind == "zero partner", surgery=kind != "no surgery")
        stage = {"datafree": {"fraction": fraction, "zero_partner": kind == "zero partner",
                              "surgery": kind != "no surgery"}}
    common.run_stages(new, [stage], progress=False)
    _same(old, new, tmp_path)


@pytest.mark.parametrize("scorer", ["magnitude", "woodfisher"])
def test_gradual_stage_is_the_gradual_callback(tmp_path, scorer):
    """bench/woodfisher_mnist.py's gradual part; the last pruning step is recovered from the report's count."""
    from netsurgeon.pruning.schedules import GradualPruning
    from netsurgeon.pruning.woodfisher import FisherConfig

    data, cfg = _data(), ns.TrainConfig(epochs=1, lr=0.01, schedule="cosine", max_steps=3)
    old, new = _model("mlpnet"), _model("mlpnet")
    cb = GradualPruning(0.95, start=0, end=2, every=1, method=scorer,
                        fisher=FisherConfig(num_grads=8, damp=1e-5, block_size=100))
    ns.train(old, data, cfg, callbacks=[cb])
    rep = common.run_stages(new, [{"gradual": common.train_options(
        cfg, target=0.95, start=0, end=2, every=1, scorer=scorer, num_grads=8, damp=1e-5, block_size=100)}], data,
        progress=False)[0]["report"]
    assert (rep["pruning_steps"] - 1) * 1 == cb.steps_done_[-1]["step"]
    assert rep["sparsity"] == cb.steps_done_[-1]["sparsity"]
    _same(old, new, tmp_path)


# -- the training benchmarks that keep the epoch best on validation (select=best_val) --------------------------
class _OldBest(ns.Callback):
    """The model selection these benchmarks ran beside the method before (bench/_common.py's former
    BestOnValidation): the weights of the epoch with the best validation accuracy, restored after training."""

    def __init__(self) -> None:
        self.best_acc, self.best_epoch, self.best = -1.0, 0, None

    def on_epoch_end(self, trainer=None) -> None:
        h = trainer.history[-1]
        if h["val_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = h["val_acc"], h["epoch"]
            self.best = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def restore(self, model) -> None:
        model.load_state_dict(self.best)


_OLD_BINARIZE = {  # bench/binary_mnist.py's Binarize (or HWGQ) arguments before it ran through the pipeline
    "float_mlp": None, "bc_det": {"weights": "sign"}, "bc_stoch": {"weights": "stochastic"},
    "bwn_mlp": {"weights": "alpha", "lr_scale": False}, "lab_mlp": {"weights": "loss_aware", "lr_scale": False},
    "bnn": {"weights": "sign", "inputs": "sign"}, "bnn_wide": {"weights": "sign", "inputs": "sign"},
    "float_lenet5": None, "bwn_lenet5": {"weights": "alpha", "keep_first": True, "keep_last": True, "lr_scale": False},
    "xnor_lenet5": {"weights": "alpha", "inputs": "scaled", "keep_first": True, "keep_last": True, "lr_scale": False},
    "hwgq_lenet5": {"hwgq": {"bits": 2, "backward": "clipped"}},
}


@pytest.mark.parametrize("key", list(_OLD_BINARIZE))
def test_binary_stages_are_the_callbacks_with_best_epoch(tmp_path, key):
    """bench/binary_mnist.py: each setup's stage (select=best_val, checkpointed) against the callback trained
    directly beside the old model selection; stochastic BinaryConnect's real-weight error too."""
    from netsurgeon.quantization.binary import Binarize
    from netsurgeon.quantization.hwgq import HWGQ
    from netsurgeon.train import recalibrate_batchnorm

    bm = pytest.importorskip("binary_mnist")
    name, kwargs, _ = bm.SETUPS[key]
    kwargs = {**kwargs, "widths": [32] * 3} if "widths" in kwargs else kwargs
    data, epochs, args = _data(), 4, _OLD_BINARIZE[key]

    def build():
        torch.manual_seed(0)
        return ns.build_model(name, **kwargs)

    old, new = build(), build()
    best = _OldBest()
    cbs = [HWGQ(**args["hwgq"])] if args and "hwgq" in args else [Binarize(**args)] if args else []
    ns.train(old, data, bm._config(key, epochs), callbacks=[*cbs, best])
    best.restore(old)
    stochastic = bool(args and args.get("weights") == "stochastic")
    if stochastic:
        recalibrate_batchnorm(old, data.train)
        real_old = bm._err(old, data.test)
    if cbs:
        cbs[0].finalize(old)
    real = bm.RealWeights(data) if stochastic else None
    run = ns.Pipeline.from_spec(bm.stages(key, epochs)).run(new, data, callbacks=[real] if real else [],
                                                            checkpoint_dir=tmp_path / "ck", resume=True)[0]
    assert run["report"]["selected_epoch"] == best.best_epoch
    if stochastic:
        assert real.test_error_pct == real_old
    _same(old, new, tmp_path)


@pytest.mark.parametrize("fmt,rounding,activations", [(None, None, True), ((6, 10), "stochastic", True),
                                                      ((2, 12), "nearest", False)])
def test_fixed_point_stages_are_the_callback(tmp_path, fmt, rounding, activations):
    """bench/fixed_point_mnist.py: the stage's history is the direct run's, epoch by epoch."""
    from netsurgeon.quantization.fixed_point import FixedPointTraining

    fp = pytest.importorskip("fixed_point_mnist")
    data, seed = _data(), 1
    old, new = _model("lenet300"), _model("lenet300")
    cbs = [] if fmt is None else [FixedPointTraining(fmt[0], fmt[1], rounding, seed=seed, activations=activations)]
    hist = ns.train(old, data, replace(fp.CFG, seed=seed), callbacks=cbs).history
    rep = common.run_stages(new, fp.stages(fmt, rounding, activations, seed), data, progress=False)[0]["report"]
    assert [h["val_acc"] for h in rep["history"]] == [h["val_acc"] for h in hist]
    _same(old, new, tmp_path)


@pytest.mark.parametrize("label,kind", [("1/8", "hashednets"), ("1/8", "plain"), ("1/1", "hashednets")])
def test_hashednets_stages_are_hash_layers_then_train_with_best_epoch(tmp_path, label, kind):
    from netsurgeon.sharing.hashed import hash_layers

    sm = pytest.importorskip("sharing_mnist")
    data = _data()
    widths = {"widths": [40]} if kind == "plain" else {}
    old, new = (_model_with("mlp_dropout", widths) for _ in range(2))
    if label != "1/1" and kind == "hashednets":
        hash_layers(old, sm.FACTORS[label], seed=0, init="random", generator=torch.Generator().manual_seed(0))
    best = _OldBest()
    ns.train(old, data, sm._hash_cfg(3), callbacks=[best])
    best.restore(old)
    rep = common.run_stages(new, sm.hash_stages(label, kind, 3), data, progress=False)[0]["report"]
    assert rep["selected_epoch"] == best.best_epoch
    _same(old, new, tmp_path)


def _model_with(name: str, kwargs: dict):
    torch.manual_seed(0)
    return ns.build_model(name, **kwargs)


def test_soft_sharing_stage_selects_the_best_quantized_epoch(tmp_path):
    """bench/sharing_mnist.py's soft weight sharing: the old selection evaluated the network quantized to the
    callback's mixture and restored weights and mixture together; the stage's select=best_val does the same
    through SoftWeightSharing.stored()."""
    import copy

    from netsurgeon.sharing.soft import SoftWeightSharing

    sm = pytest.importorskip("sharing_mnist")
    data, epochs, tau = _data(), 4, 0.005
    start = _model("lenet300")
    ns.train(start, data, ns.TrainConfig(epochs=2, lr=0.05))
    with torch.no_grad():  # weights as wide as a trained MNIST net's (not all inside the zero component)
        for p in start.parameters():
            p.mul_(5)
    old, new = copy.deepcopy(start), copy.deepcopy(start)

    class OldBestQuantized(ns.Callback):
        def __init__(self, sws) -> None:
            self.sws, self.best_acc, self.best_epoch, self.best, self.by_epoch = sws, -1.0, 0, None, []

        def on_epoch_end(self, trainer=None) -> None:
            with self.sws.quantized():
                acc = ns.evaluate(trainer.model, data.val)[1]
            self.by_epoch.append(acc)
            if acc > self.best_acc:
                self.best_acc, self.best_epoch = acc, trainer.history[-1]["epoch"]
                self.best = ({k: v.clone() for k, v in trainer.model.state_dict().items()},
                             copy.deepcopy(self.sws.state_dict()))

    cb = SoftWeightSharing(components=17, pi0=0.999, tau=tau)
    best = OldBestQuantized(cb)
    ns.train(old, data, ns.TrainConfig(epochs=epochs, **sm.SWS_TRAIN), callbacks=[cb, best])
    old.load_state_dict(best.best[0])
    cb.load_state_dict(best.best[1])
    retrained_old = sm._err(old, data.test)
    cb.finalize(old)
    retrained = sm.Retrained(data.test)
    rep = ns.Pipeline.from_spec(sm.sws_stages(epochs, tau)).run(new, data, callbacks=[retrained])[0]["report"]
    assert [h["stored_val_acc"] for h in rep["history"]] == best.by_epoch
    assert rep["selected_epoch"] == best.best_epoch and retrained.error_pct == retrained_old
    _same(old, new, tmp_path)


@pytest.mark.parametrize("distill", [False, True])
def test_hinton_stages_are_the_callbacks_with_best_epoch(tmp_path, distill):
    """bench/lowrank_distill_mnist.py's Hinton part: the teacher and students trained from scratch (jittered
    inputs for the teacher), plain or distilled, keeping the epoch best on validation."""
    from netsurgeon.distill import Distillation

    lrd = pytest.importorskip("lowrank_distill_mnist")
    data, arch = _data(), {"widths": [48, 48]}
    teacher = _model_with("mlp_dropout", {"widths": [64, 64]})
    ns.train(teacher, data, ns.TrainConfig(epochs=1, lr=0.05))
    teacher.eval()
    cfg = replace(lrd.hinton_cfg(4, 1, teacher=not distill), batch_size=32)
    torch.manual_seed(cfg.seed)
    old = ns.build_model("mlp_dropout", **arch)
    torch.manual_seed(cfg.seed)
    new = ns.build_model("mlp_dropout", **arch)
    best = _OldBest()
    ns.train(old, data, cfg, callbacks=[Distillation(teacher, lrd.TEMPERATURE, lrd.ALPHA), best] if distill
             else [best])
    best.restore(old)
    rep = ns.Pipeline.from_spec(lrd.hinton_stages(cfg, distill)).run(
        new, data, teacher=teacher, checkpoint_dir=tmp_path / "ck", resume=True)[0]["report"]
    assert rep["selected_epoch"] == best.best_epoch
    _same(old, new, tmp_path)


@pytest.mark.parametrize("iter_stop", [None, 5])
def test_dns_surgery_stage_is_the_callback_with_its_history(tmp_path, iter_stop):
    """bench/_common.py's dns_surgery (dns_mnist, missed_targets): its stage, checkpointed, gives the direct
    callback's weights and per-step history."""
    from netsurgeon.pruning.dns import DNS

    data, c, iterations = _data(), {"fc1": 2.5, "fc2": 2.0, "fc3": 1.5}, 9
    old, new = _model("lenet300"), _model("lenet300")
    stage = common.dns_surgery_stage("lenet300", c, iterations, 3, iter_stop)
    cfg = ns.TrainConfig(epochs=3, max_steps=iterations, lr=common.DNS_SURGERY["lenet300"]["lr"], momentum=0.9,
                         weight_decay=5e-4, schedule="inv", lr_gamma=1e-4, lr_power=0.75)
    dns = DNS(c_rate=c, gamma=common.DNS_SURGERY["lenet300"]["gamma"], iter_stop=iter_stop, log_every=2)
    stage["dns"]["log_every"] = 2
    ns.train(old, data, cfg, callbacks=[dns])
    run = ns.Pipeline.from_spec([stage]).run(new, data, checkpoint_dir=tmp_path / "ck", resume=True)[0]
    assert run["report"]["surgery_history"] == dns.history_ and len(dns.history_) > 3
    assert run["report"]["surgery"] == dns.summary()
    _same_file(old, new, tmp_path, data)


def test_autoprune_run_stage_is_the_callback_with_its_history(tmp_path):
    from netsurgeon.pruning.autoprune import AutoPrune

    data = _data()
    old, new = _model("lenet300"), _model("lenet300")
    ap = AutoPrune(mu=2000.0, m_lr=0.1, stop=int(0.8 * 9), log_every=1)
    ns.train(old, data, replace(AP_CFG, epochs=3), callbacks=[ap])
    rep = common.run_stages(new, [common.autoprune_stage(2000.0, 9, 3, log_every=1, m_lr=0.1)], data,
                            progress=False)[0]["report"]
    assert rep["pruning_history"] == ap.history_ and len(ap.history_) == 10
    assert min(ap.history_[-1]["kept"].values()) < 1.0  # it pruned
    _same_file(old, new, tmp_path, data)
