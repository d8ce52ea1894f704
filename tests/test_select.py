"""Model selection on the validation split (``select="best_val"``), the per-epoch history of a training stage,
the pipeline's own callbacks, and resumable training stages (``Pipeline.run(checkpoint_dir=..., resume=...)``,
``netsurgeon compress --checkpoint-dir/--resume``)."""

import contextlib
import dataclasses

import pytest
import torch
from click.testing import CliRunner

import netsurgeon as ns
from netsurgeon.cli import cli
from netsurgeon.train import Callback, TrainConfig
from test_train import Interrupt  # raises KeyboardInterrupt at a step

CFG = TrainConfig(epochs=3, lr=0.05, batch_size=64, seed=3)


def _model():
    torch.manual_seed(0)
    return ns.build_model("digits_cnn", (1, 8, 8))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Sabotage(Callback):
    """Zeroes the weights after every step of the last epoch: the last epoch is at chance on validation."""

    def __init__(self, from_step: int) -> None:
        self.from_step, self.epochs_seen = from_step, 0

    def after_step(self, trainer):
        if trainer.step > self.from_step:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.zero_()

    def on_epoch_end(self, trainer=None):
        self.epochs_seen += 1

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = state["epochs_seen"]


def test_best_val_keeps_the_best_epoch_and_the_callbacks_state(digits):
    steps = -(-len(digits.train) // CFG.batch_size)
    m, cb = _model(), Sabotage(2 * steps)
    r = ns.train(m, digits, TrainConfig(**{**CFG.to_dict(), "select": "best_val"}), callbacks=[cb])
    accs = [h["val_acc"] for h in r.history]
    assert accs[2] < 0.2 < accs[1]  # the last epoch is ruined
    assert r.selected_epoch == 1 + max(range(2), key=lambda i: accs[i])
    assert cb.epochs_seen == r.selected_epoch  # the callback's state came back with the weights
    ref = _model()  # the same run stopped after the chosen epoch: the same weights, bit for bit
    ns.train(ref, digits, TrainConfig(**{**CFG.to_dict(), "max_steps": r.selected_epoch * steps}))
    assert _same(m, ref)


def test_last_is_the_default_and_keeps_the_last_epoch(digits):
    m = _model()
    r = ns.train(m, digits, CFG, callbacks=[Sabotage(40)])
    assert r.selected_epoch == 3 and ns.evaluate(m, digits.val)[1] < 0.2


class StoredDiffers(Callback):
    """Its ``stored()`` network is ruined at every epoch but the second: selection must read the stored form."""

    def __init__(self) -> None:
        self.epoch = 0

    def on_epoch_end(self, trainer=None):
        self.epoch = trainer.history[-1]["epoch"]

    @contextlib.contextmanager
    def stored(self):
        saved = {k: v.clone() for k, v in self._model.state_dict().items()}
        if self.epoch != 2:
            with torch.no_grad():
                for p in self._model.parameters():
                    p.zero_()
        try:
            yield
        finally:
            self._model.load_state_dict(saved)

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]


def test_selection_compares_epochs_as_stored(digits):
    m = _model()
    r = ns.train(m, digits, TrainConfig(**{**CFG.to_dict(), "select": "best_val"}), callbacks=[StoredDiffers()])
    assert r.selected_epoch == 2
    assert all("stored_val_acc" in h for h in r.history)
    assert r.history[0]["stored_val_acc"] < 0.2 < r.history[1]["stored_val_acc"]


def test_best_val_without_a_validation_split_is_refused_before_training(digits):
    data = dataclasses.replace(digits, val=ns.data.Split(digits.val.x[:0], digits.val.y[:0]))
    with pytest.raises(ValueError, match="select='best_val' chooses an epoch on the validation split"):
        ns.train(_model(), data, TrainConfig(select="best_val"))
    with pytest.raises(ValueError, match=r"select must be one of \['last', 'best_val'\]; got 'best'"):
        TrainConfig(select="best")


def test_stage_report_holds_history_and_selected_epoch(digits):
    m = _model()
    runs = ns.Pipeline.from_spec([{"finetune": {"epochs": 3, "lr": 0.05, "select": "best_val"}}]).run(m, digits)
    rep = runs[0]["report"]
    assert [h["epoch"] for h in rep["history"]] == [1, 2, 3]
    best = max(rep["history"], key=lambda h: h["val_acc"])
    assert rep["selected_epoch"] == best["epoch"] and rep["val_acc"] == best["val_acc"]


class Probe(Callback):
    """Sees the model at the end of training, before the method's finalize."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def finalize(self, model=None):
        self.kinds = sorted({type(p).__name__ for mod in model.modules()
                             if hasattr(mod, "parametrizations") for p in mod.parametrizations["weight"]})
        return model


def test_pipeline_callbacks_run_inside_training_stages_before_the_methods_finalize(digits):
    probe = Probe()
    m = ns.build_model("lenet300", (1, 8, 8))
    ns.Pipeline.from_spec([{"binaryconnect": {"epochs": 1}}]).run(m, digits, callbacks=[probe])
    assert probe.kinds == ["BinarizeWeights"]  # training form; the stage then left BinaryWeights
    kinds = {type(p).__name__ for mod in m.modules() if hasattr(mod, "parametrizations")
             for p in mod.parametrizations["weight"]}
    assert kinds == {"BinaryWeights"}


def test_an_interrupted_pipeline_resumes_to_the_same_weights(digits, tmp_path):
    spec = [{"magnitude": {"sparsity": 0.5, "epochs": 0}}, {"finetune": {"epochs": 2, "lr": 0.05, "seed": 1}}]
    ref = _model()
    ns.Pipeline.from_spec(spec).run(ref, digits)
    m = _model()
    with pytest.raises(KeyboardInterrupt):
        ns.Pipeline.from_spec(spec).run(m, digits, checkpoint_dir=tmp_path / "ck", checkpoint_every=7,
                                        callbacks=[Interrupt(25)])
    assert (tmp_path / "ck" / "stage2-finetune.ckpt").is_file()
    m = _model()
    never = [Interrupt(10 ** 9)]  # a resumed run has the callbacks it was written with
    runs = ns.Pipeline.from_spec(spec).run(m, digits, checkpoint_dir=tmp_path / "ck", resume=True, callbacks=never)
    assert runs[1]["report"]["resumed"] and _same(m, ref)
    again = _model()  # a finished stage resumes to its final weights without training
    runs = ns.Pipeline.from_spec(spec).run(again, digits, checkpoint_dir=tmp_path / "ck", resume=True,
                                           callbacks=never)
    assert runs[1]["report"]["steps"] == 40 and _same(again, ref)


def test_pipeline_run_refuses_bad_checkpoint_options(digits, tmp_path):
    pipe = ns.Pipeline.from_spec([{"finetune": {"epochs": 1}}])
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        pipe.run(_model(), digits, resume=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir '.*f' is a file"):
        pipe.run(_model(), digits, checkpoint_dir=tmp_path / "f")
    with pytest.raises(ValueError, match="callbacks must be a list of netsurgeon.Callback; got <.*Probe"):
        pipe.run(_model(), digits, callbacks=Probe())


def test_cli_compress_checkpoints_and_the_same_command_continues(tmp_path):
    runner = CliRunner()
    base = tmp_path / "b.safetensors"
    assert runner.invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "1", "-o", str(base)]).exit_code == 0
    args = ["compress", str(base), "--method", "finetune", "--set", "epochs=2", "--set", "select=best_val",
            "--checkpoint-dir", str(tmp_path / "ck")]
    r = runner.invoke(cli, [*args, "-o", str(tmp_path / "a.nsz")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ck" / "stage1-finetune.ckpt").is_file() and (tmp_path / "ck" / "run.json").is_file()
    r = runner.invoke(cli, [*args, "-o", str(tmp_path / "b.nsz")])  # continues: the finished stage is loaded
    assert r.exit_code == 0, r.output
    assert _same(ns.load_compressed(tmp_path / "a.nsz"), ns.load_compressed(tmp_path / "b.nsz"))
    r = runner.invoke(cli, [*args[:-2], "--set", "lr=0.5", *args[-2:], "-o", str(tmp_path / "c.nsz")])
    assert r.exit_code == 2 and "holds another run's checkpoints (its stages differ)" in r.output
    assert not (tmp_path / "c.nsz").exists()
    (tmp_path / "f").write_text("x")
    r = runner.invoke(cli, [*args[:-1], str(tmp_path / "f"), "-o", str(tmp_path / "d.nsz")])
    assert r.exit_code != 0 and "is a file" in r.output


def test_resume_or_start_continues_only_the_same_run(digits, tmp_path):
    from netsurgeon.compress import resume_or_start

    model_file = tmp_path / "m.bin"
    model_file.write_bytes(b"weights")
    pipe = ns.Pipeline.from_spec([{"finetune": {"epochs": 1}}])
    assert resume_or_start(tmp_path / "ck", model_file, pipe, 0, digits) is False
    assert resume_or_start(tmp_path / "ck", model_file, pipe, 0, digits) is True
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(its seed differ\)"):
        resume_or_start(tmp_path / "ck", model_file, pipe, 1, digits)
    model_file.write_bytes(b"other weights")
    with pytest.raises(ValueError, match=r"\(its input_sha256 differ\)"):
        resume_or_start(tmp_path / "ck", model_file, pipe, 0, digits)


def test_cli_train_select_best_val(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    r = runner.invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "2", "--select", "best_val", "-o", str(out)])
    assert r.exit_code == 0, r.output
    from netsurgeon.modelfile import load_model

    assert load_model(out)[1]["train"]["select"] == "best_val"
