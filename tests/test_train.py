import os

import pytest
import torch

import netsurgeon as ns
from netsurgeon.train import Callback, TrainConfig, Trainer, lr_at


class Interrupt(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer):
        if trainer.step == self.at:
            raise KeyboardInterrupt


class Counter(Callback):
    """A callback with state and its own RNG, to check both survive a resume."""

    def __init__(self) -> None:
        self.calls, self.g = [], torch.Generator().manual_seed(1)
        self.draws = 0.0

    def loss(self, outputs, batch, trainer):
        self.calls.append("loss")
        return 1e-4 * outputs.pow(2).mean()

    def after_backward(self, trainer):
        self.calls.append("after_backward")

    def after_step(self, trainer):
        self.calls.append("after_step")
        self.draws += float(torch.rand(1, generator=self.g))

    def state_dict(self):
        return {"draws": self.draws, "g": self.g.get_state()}

    def load_state_dict(self, s):
        self.draws = s["draws"]
        self.g.set_state(s["g"])


CFG = TrainConfig(epochs=2, lr=0.05, batch_size=64, schedule="cosine", seed=3)


def _model():
    torch.manual_seed(0)
    return ns.build_model("digits_cnn", (1, 8, 8))


def test_training_learns_digits(digits):
    m = _model()
    r = ns.train(m, digits, TrainConfig(epochs=5, lr=0.05))
    assert len(r.history) == 5 and r.steps == 5 * 20
    assert ns.evaluate(m, digits.test)[1] > 0.9


def test_runs_are_deterministic(digits):
    a, b = _model(), _model()
    ns.train(a, digits, CFG)
    ns.train(b, digits, CFG)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_interrupt_and_resume_gives_identical_weights(digits, tmp_path):
    ref, cb_ref = _model(), Counter()
    ns.train(ref, digits, CFG, callbacks=[cb_ref])
    ck = tmp_path / "run.ckpt"
    m, cb = _model(), Counter()
    with pytest.raises(KeyboardInterrupt):
        ns.train(m, digits, CFG, callbacks=[cb, Interrupt(27)], checkpoint=ck, checkpoint_every=10)
    assert ck.is_file()
    m2, cb2 = _model(), Counter()  # a fresh process would start from scratch like this
    r = ns.train(m2, digits, CFG, callbacks=[cb2, Interrupt(-1)], checkpoint=ck, resume=True)
    assert r.steps == 40
    for pa, pb in zip(ref.parameters(), m2.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert cb2.draws == cb_ref.draws
    assert [h["val_acc"] for h in r.history] == pytest.approx([h["val_acc"] for h in ns.train(
        _model(), digits, CFG).history])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_callback_hook_order(digits):
    cb = Counter()
    ns.train(_model(), digits, TrainConfig(epochs=1, max_steps=2))
    ns.train(_model(), digits, TrainConfig(epochs=1, max_steps=2), callbacks=[cb])
    assert cb.calls == ["loss", "after_backward", "after_step"] * 2


def test_resume_refuses_other_config_and_garbage(digits, tmp_path):
    ck = tmp_path / "c.ckpt"
    ns.train(_model(), digits, TrainConfig(epochs=1, max_steps=3), checkpoint=ck)
    with pytest.raises(ValueError, match="another training config"):
        ns.train(_model(), digits, TrainConfig(epochs=1, lr=0.5), checkpoint=ck, resume=True)
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        ns.train(_model(), digits, TrainConfig(epochs=1, max_steps=3), checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="no checkpoint file"):
        ns.train(_model(), digits, TrainConfig(epochs=1), checkpoint=tmp_path / "none", resume=True)


def test_lr_schedules():
    c = TrainConfig(lr=0.1, schedule="step", lr_step_epochs=2, lr_gamma=0.5)
    assert [lr_at(c, s, 10, 100) for s in (0, 19, 20, 45)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    c = TrainConfig(lr=0.1, schedule="cosine")
    assert [lr_at(c, s, 10, 100) for s in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0])
    c = TrainConfig(lr=0.01, schedule="inv", lr_gamma=1e-4, lr_power=0.75)
    assert lr_at(c, 10_000, 10, 100) == pytest.approx(0.01 * 2 ** -0.75)


@pytest.mark.parametrize("kw,msg", [({"epochs": 0}, r"TrainConfig: epochs must be an integer >= 1; got 0\."),
                                     ({"lr": -1.0}, r"TrainConfig: lr must be a number > 0; got -1\.0\."),
                                     ({"epochs": 2.5}, r"epochs must be an integer >= 1; got 2\.5"),
                                     ({"max_steps": 0}, r"max_steps must be an integer >= 1 or null; got 0"),
                                     ({"momentum": True}, r"momentum must be a number in \[0, 1\); got True"),
                                     ({"optimizer": "rmsprop"}, "optimizer must be one of"),
                                     ({"schedule": "warm"}, "schedule must be one of")])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_nan_weights_refused(digits):
    m = _model()
    with torch.no_grad():
        m.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc1.weight' holds 1 NaN/inf"):
        ns.train(m, digits, TrainConfig(epochs=1))


def test_trainer_exposes_splits_to_callbacks(digits):
    seen = {}

    class Peek(Callback):
        def on_train_start(self, trainer: Trainer):
            seen["val"] = len(trainer.data.val)

    ns.train(_model(), digits, TrainConfig(epochs=1, max_steps=1), callbacks=[Peek()])
    assert seen["val"] == 180


def test_batchnorm_recalibration_averages_the_data_with_the_current_weights():
    from torch import nn

    from netsurgeon.data import Split
    from netsurgeon.train import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    x = torch.randn(300, 3)
    model.eval()
    recalibrate_batchnorm(model, Split(x, torch.zeros(300, dtype=torch.long)), max_batches=3, batch_size=100)
    h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    per_batch = torch.stack([h[i:i + 100].var(0) for i in (0, 100, 200)]).mean(0)   # unbiased, averaged
    torch.testing.assert_close(model[1].running_var, per_batch, rtol=1e-4, atol=1e-5)
    assert not model.training and not model[1].training and model[1].momentum == 0.1   # modes and momentum restored


def test_jitter_shifts_each_image_by_at_most_n_pixels_with_zero_fill():
    from netsurgeon.train import jitter_images

    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one lit pixel in the centre
    out = jitter_images(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.sum(dim=(1, 2, 3)).eq(1).all()  # moved, never lost (|shift| <= 2 < 4)
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 9 - 4, pos % 9 - 4
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 10  # each image its own shift
    edge = torch.ones(8, 1, 5, 5)
    shifted = jitter_images(edge, 1, torch.Generator().manual_seed(1))
    assert (shifted == 0).any()  # what moves in from outside the image is zero
    assert torch.equal(jitter_images(x, 2, torch.Generator().manual_seed(0)), out)  # same generator, same shifts


def test_jitter_training_is_deterministic_and_resumable(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.05, jitter=1)
    torch.manual_seed(0)
    a = ns.build_model("digits_cnn")
    b = ns.build_model("digits_cnn")
    b.load_state_dict(a.state_dict())
    ns.train(a, digits, cfg)
    ck = tmp_path / "c.ckpt"
    with pytest.raises(KeyboardInterrupt):
        Trainer(b, digits, cfg, [Interrupt(5)]).fit(checkpoint=ck)
    Trainer(b, digits, cfg, [Interrupt(-1)]).fit(checkpoint=ck, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    torch.manual_seed(0)
    plain = ns.build_model("digits_cnn")
    ns.train(plain, digits, TrainConfig(epochs=2, batch_size=128, lr=0.05))
    assert not torch.equal(plain.state_dict()["conv1.weight"], a.state_dict()["conv1.weight"])  # jitter acted


def test_jitter_on_flat_inputs_is_refused_before_training(digits):
    from dataclasses import replace

    flat = replace(digits, train=ns.data.Split(digits.train.x.flatten(1), digits.train.y))
    with pytest.raises(ValueError, match=r"jitter=2 .*shape \(\d+, 64\)"):
        Trainer(ns.build_model("mlpnet", (64,)), flat, TrainConfig(jitter=2))
