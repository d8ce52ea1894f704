"""The one training loop every method runs in: callbacks, LR schedules, progress, atomic resumable checkpoints.

Determinism: the order of mini-batches of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, so a run resumed at step ``s`` sees exactly the batches an uninterrupted run would. The
checkpoint holds model, optimizer, global RNG state, running epoch statistics and every callback's
``state_dict``; a resumed run ends at bit-identical weights on the same machine and thread count.

Under ``torchrun`` (several ranks, see :mod:`netsurgeon.distributed` and docs/distributed.md) each global
mini-batch is split across ranks and the gradients are combined into the gradient of the global mean loss, so
the run follows the single-process one; rank 0 writes checkpoints (with every rank's RNG state), all ranks
resume from them, and the ranks' weights and masks are checked identical at every epoch's end.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as ddp
from ._validation import atomic_save, check_finite_model
from .data import Dataset, LoaderData, Split, as_data, batches, check_metric
from .devices import model_device, place, running_on, to_device
from .masks import attach_masks_for_state_dict
from .progress import Progress
from .registry import MethodConfig, StageContext, option, register

__all__ = ["Callback", "BestOnValidation", "TrainConfig", "Trainer", "TrainResult", "train", "evaluate", "Evaluation",
           "lr_at",
           "run_training", "squared_hinge", "recalibrate_batchnorm", "flat_predictions"]

log = logging.getLogger(__name__)

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("constant", "step", "cosine", "inv", "exp")
_LOSSES = ("cross_entropy", "squared_hinge")
_SELECT = ("last", "best_val")


class Callback:
    """Base class of training-time methods. Every hook is optional; override what the method needs.

    Hooks, in call order: ``prepare`` once (attach masks or gates; ``ns.train`` calls it through
    ``on_train_start``, also on resume *before* the checkpoint is loaded), then per step ``loss`` (an extra
    loss term or None), ``after_backward`` (gradients are in ``.grad``), ``after_step`` (weights updated),
    ``on_epoch_end``, and ``finalize`` at the end (leave a plain masked model: pruned weights stay zero in
    any later training). ``state_dict``/``load_state_dict`` carry the callback's state through checkpoints
    (and through model selection: ``select="best_val"`` restores them with the chosen epoch's weights).
    ``stored()`` is a context in which the model computes as the file will hold it, for a method whose
    training network differs from its stored one (soft weight sharing's quantized weights).
    A callback may set ``hard_loss_weight`` (default 1) to scale the label loss (distillation: 1 − α).

    The ``trainer`` argument is optional everywhere, so a method runs in the user's own loop too::

        method.prepare(model, train_data=loader, val_data=val_loader)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)        # create it after prepare
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            extra = method.loss(out, (x, y))
            loss = loss if extra is None else loss + extra
            opt.zero_grad(); loss.backward(); method.after_backward(); opt.step(); method.after_step()
        method.finalize(model)
    """

    _model: nn.Module | None = None

    def prepare(self, model: nn.Module, *, train_data: Any = None, val_data: Any = None,
                optimizer: torch.optim.Optimizer | None = None) -> None:
        """Attach what the method needs to ``model`` (in place). ``train_data``/``val_data``: a Split or any
        iterable of ``(x, y)`` batches; ``optimizer``: only methods that read the learning rate use it."""
        self._model = model

    def on_train_start(self, trainer: Trainer) -> None:
        if self._model is not trainer.model:
            data = getattr(trainer, "data", None)
            self.prepare(trainer.model, train_data=getattr(data, "train", None), val_data=getattr(data, "val", None))

    def loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor], trainer: Trainer | None = None) -> Tensor | None:
        return None
    def after_backward(self, trainer: Trainer | None = None) -> None: ...
    def after_step(self, trainer: Trainer | None = None) -> None: ...
    def on_epoch_end(self, trainer: Trainer | None = None) -> None: ...
    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """End of training: returns the model, left with plain masks where the method pruned."""
        out = model if model is not None else self._model
        if out is None:
            raise ValueError(f"{type(self).__name__}: finalize() before prepare().")
        return out
    def state_dict(self) -> dict[str, Any]:
        return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    @contextlib.contextmanager
    def stored(self) -> Iterator[None]:
        """Within the block the model computes with the weights ``finalize`` would store (default: as trained)."""
        yield


def _stores_differently(cb: Callback) -> bool:
    return type(cb).stored is not Callback.stored


class BestOnValidation(Callback):
    """Model selection on the validation split (the papers' rule: report the epoch best on validation): at
    each epoch's end, keep a copy of the weights and of every other callback's state when the epoch beats the
    best so far (accuracy, or loss for a language model; the first of equal epochs wins), and put them back at
    the end of training, before the methods' ``finalize``. Where a method stores other weights than it trains
    with (its ``stored()`` context, e.g. soft weight sharing's quantized network), epochs are compared as
    stored. ``TrainConfig(select="best_val")`` adds one to a run; the test split is never read."""

    def __init__(self) -> None:
        self.best_score, self.best_epoch, self.scores = -math.inf, 0, []
        self._best: tuple[dict[str, Tensor], list[dict[str, Any]]] | None = None

    def on_epoch_end(self, trainer: Trainer | None = None) -> None:
        assert trainer is not None
        entry = trainer.history[-1]
        others = [cb for cb in trainer.callbacks if cb is not self]
        perplexity = getattr(trainer.data, "metric", "accuracy") == "perplexity"
        if any(_stores_differently(cb) for cb in others):
            with contextlib.ExitStack() as stack:
                for cb in others:
                    stack.enter_context(cb.stored())
                loss, acc = _evaluate_sharded(trainer.model, trainer.data.val)
            entry.update(stored_val_acc=acc, stored_val_loss=loss)
        else:
            loss, acc = entry["val_loss"], entry["val_acc"]
        score = -loss if perplexity else acc
        if not math.isfinite(score):
            raise ValueError(f"select='best_val': the validation {'loss' if perplexity else 'accuracy'} of epoch "
                             f"{entry['epoch']} is {score!r}; give a non-empty validation split.")
        self.scores.append(score)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, int(entry["epoch"])
            self._best = ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                          [copy.deepcopy(cb.state_dict()) for cb in others])

    def restore(self, trainer: Trainer) -> None:
        """Put the chosen epoch's weights and callback states back on ``trainer``'s model and callbacks."""
        if self._best is None:
            return
        weights, states = self._best
        trainer.model.load_state_dict(weights)
        for cb, state in zip([cb for cb in trainer.callbacks if cb is not self], states, strict=True):
            cb.load_state_dict(copy.deepcopy(state))

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "scores": list(self.scores),
                "best": self._best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.scores, self._best = list(state["scores"]), state["best"]


@dataclass(frozen=True)
class TrainConfig(MethodConfig):
    """Hyper-parameters of one training run (also the training fields of every training-time method)."""

    owner: ClassVar[str] = "TrainConfig"

    epochs: int = option(10, "passes over the training split", low=1)
    batch_size: int = option(64, "mini-batch size", low=1)
    optimizer: str = option("sgd", "sgd (with momentum) or adam", choices=_OPTIMIZERS)
    lr: float = option(0.01, "learning rate", low=0, low_open=True)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(5e-4, "L2 weight decay", low=0)
    schedule: str = option("constant", "LR schedule (inv: Caffe's lr*(1+g*it)^-p; exp: lr to lr*lr_gamma over "
                                       "the run, geometrically per epoch)", choices=_SCHEDULES)
    lr_gamma: float = option(0.1, "step: factor per lr_step_epochs; inv: g; exp: final/initial LR", low=0)
    lr_step_epochs: int = option(5, "step schedule period in epochs", low=1)
    lr_power: float = option(0.75, "inv schedule power", low=0)
    seed: int = option(0, "seed of batch order and of the method's own draws", low=0)
    max_steps: int | None = option(None, "stop after this many optimizer steps", low=1)
    loss: str = option("cross_entropy", "training loss (squared_hinge: the L2-SVM loss of BinaryConnect/BNN, "
                                        "sum over classes of max(0, 1 - t·y)^2 with t = ±1)", choices=_LOSSES)
    jitter: int = option(0, "shift each training image by up to this many pixels in each direction, zero-filled "
                            "(Hinton et al. 2015's MNIST teacher: 2)", low=0)
    select: str = option("last", "which epoch's weights the run keeps: last, or best_val (the epoch best on the "
                                 "validation split, weights and method state together)", choices=_SELECT)

    def train_config(self) -> TrainConfig:
        """The plain training fields of this config (drops a method's own fields)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (stateless, so resuming needs no scheduler state)."""
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_gamma ** (step // (cfg.lr_step_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if cfg.schedule == "inv":
        return cfg.lr * (1 + cfg.lr_gamma * step) ** (-cfg.lr_power)
    if cfg.schedule == "exp":  # BinaryConnect / BNN: LR x (final/initial)^(1/epochs) after every epoch
        return cfg.lr * cfg.lr_gamma ** (min(step // steps_per_epoch, cfg.epochs - 1) / max(1, cfg.epochs - 1))
    return cfg.lr


def jitter_images(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Shift every image of the batch ``x`` (N, C, H, W) by its own random (dy, dx) in [-pixels, pixels],
    filling with zeros (the input jitter of Hinton, Vinyals, Dean 2015, Sec. 3)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    cpu = torch.device("cpu")  # host indices from a CPU generator (a CPU index selects from a cuda batch)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1), generator=generator, device=cpu)
    rows = (dy + torch.arange(h, device=cpu))[:, :, None]  # (N, H, 1)
    cols = (dx + torch.arange(w, device=cpu))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n, device=cpu)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def flat_predictions(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits (P, classes), targets (P,))`` with one row per prediction: a classifier's (B, C) and (B,) as
    they are; a language model's (B, T, V) and (B, T) flattened to B·T next-token predictions."""
    if y.dim() > 1 and out.dim() == y.dim() + 1:
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return out, y


def squared_hinge(out: Tensor, y: Tensor) -> Tensor:
    """Σ_k max(0, 1 − t_k·y_k)² over classes, mean over the batch, targets t = ±1 (the L2-SVM output of
    BinaryConnect's and BNN's code)."""
    t = F.one_hot(y, out.shape[1]).to(out.dtype) * 2 - 1
    return (1 - t * out).clamp_min(0).pow(2).sum(1).mean()


@dataclass
class TrainResult:
    """Per-epoch history (``epoch``, ``loss``, ``train_acc``, ``val_acc``, ``val_loss``, ``lr``), the last step,
    and ``selected_epoch``: the epoch whose weights the model holds (the last, or the best on validation)."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    selected_epoch: int | None = None


class Evaluation(NamedTuple):
    """What :func:`evaluate` measures over a split; unpacks as ``(loss, accuracy)``.

    ``loss`` is the mean cross-entropy per prediction in nats (per token for a language model), ``accuracy``
    the fraction of predictions whose largest logit is the target (next-token accuracy for a language model).
    """

    loss: float
    accuracy: float

    @property
    def perplexity(self) -> float:
        """exp(mean cross-entropy over the split's predictions): a language model's perplexity."""
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def metric(self, name: str) -> float:
        """The value of metric ``name`` (``accuracy`` or ``perplexity``)."""
        return self.accuracy if check_metric("evaluate", name) == "accuracy" else self.perplexity


@torch.no_grad()
def evaluate(model: nn.Module, split: Split | Any, batch_size: int | None = None) -> Evaluation:
    """Return the mean cross-entropy and the accuracy of ``model`` on ``split`` (a Split or a DataLoader) as an
    :class:`Evaluation` (``.perplexity``, ``.metric(name)``). Targets (B,) are class labels; targets (B, T) are
    next tokens and outputs (B, T, V) their logits: every token counts once. ``batch_size`` (of a Split;
    default 1000 samples, or 2^16 tokens of sequences) changes only speed and memory."""
    if batch_size is None:
        per_row = math.prod(split.y.shape[1:]) if isinstance(split, Split) else 1
        batch_size = 1000 if per_row == 1 else max(1, 65536 // per_row)
    was = model.training
    model.eval()
    loss, correct, n = 0.0, 0, 0
    dev = model_device(model)
    try:
        for x, y in batches(split, batch_size):
            x, y = to_device(x, dev), to_device(y, dev)
            out, t = flat_predictions(model(x), y)
            loss += float(F.cross_entropy(out, t, reduction="sum"))
            correct += int((out.argmax(1) == t).sum())
            n += t.numel()
    finally:
        model.train(was)
    n = max(n, 1)
    return Evaluation(loss / n, correct / n)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Split | Any, max_batches: int = 100, batch_size: int = 100) -> int:
    """Re-estimate every BatchNorm's running mean and variance as a plain average over up to ``max_batches``
    training batches, with the weights the model computes with now; the rest of the model stays in eval mode
    (no dropout, no stochastic sampling). Needed whenever the weights changed after the statistics were taken
    (BinaryConnect's authors re-estimate them after each epoch). Returns the number of samples used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the plain mean over the batches seen
        bn.train()
    n = 0
    try:
        for i, (x, _) in enumerate(batches(data, batch_size)):
            if i >= max_batches:
                break
            model(x)
            n += len(x)
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.train(was)
    return n


class Trainer:
    """State of one run, handed to callbacks: ``model``, ``optimizer``, ``data``, ``config``, ``step``."""

    def __init__(self, model: nn.Module, data: Dataset | LoaderData, config: TrainConfig,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.model, self.data, self.config, self.callbacks = model, data, config.train_config(), list(callbacks)
        self._in_memory = isinstance(data.train, Split)
        n = len(data.train)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("train: the training data is empty.")
        self.steps_per_epoch = math.ceil(n / config.batch_size) if self._in_memory else n
        if config.jitter and self._in_memory and data.train.x.dim() != 4:  # type: ignore[union-attr]
            raise ValueError(f"train: jitter={config.jitter!r} shifts images, but the training inputs have shape "
                             f"{tuple(data.train.x.shape)} (need N, C, H, W).")  # type: ignore[union-attr]
        self._loader_iter: Any = None
        self._loader_pos = (-1, -1)  # (epoch, batch) the loader iterator will yield next
        self.rank, self.world_size = ddp.world()
        # split each global batch across ranks, unless the user's loader already gives each rank its own
        self._split_rows = self.world_size > 1 and not ddp.rank_local(data.train)
        if self.world_size > 1 and config.batch_size < self.world_size:
            raise ValueError(f"train: batch_size={config.batch_size!r} is smaller than the {self.world_size} ranks "
                             "it is split across; use batch_size >= the number of ranks.")
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._epoch_sums = torch.zeros(3, dtype=torch.float64, device="cpu")  # loss sum, correct, count: host-side
        self.history: list[dict[str, float]] = []
        self._selector: BestOnValidation | None = None
        if self.config.select == "best_val":
            val = getattr(data, "val", None)
            if val is None or not _nonempty(val):
                raise ValueError("train: select='best_val' chooses an epoch on the validation split, but the data "
                                 "has none; give a validation split, or select='last'.")
            self._selector = BestOnValidation()
            self.callbacks.append(self._selector)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _batch_order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data.train), generator=g, device="cpu")  # the same order on any device

    def _batch(self, epoch: int, i: int) -> tuple[Tensor, Tensor]:
        if self._in_memory:
            idx = self._batch_order(epoch)[i * self.config.batch_size:(i + 1) * self.config.batch_size]
            return self.data.train.x[idx], self.data.train.y[idx]
        if self._loader_pos != (epoch, i):  # a new epoch, or a resume in the middle of one: skip ahead
            sampler = getattr(self.data.train, "sampler", None)
            if hasattr(sampler, "set_epoch"):  # DistributedSampler: its shuffle of epoch e, the same after a resume
                sampler.set_epoch(epoch)
            self._loader_iter = batches(self.data.train)
            for _ in range(i):
                next(self._loader_iter)
        self._loader_pos = (epoch, i + 1)
        try:
            return next(self._loader_iter)
        except StopIteration:
            raise ValueError(f"train: the data loader yielded fewer batches than its len() "
                             f"({self.steps_per_epoch}).") from None

    # -- checkpoints -------------------------------------------------------------------------------
    def _config_key(self) -> str:
        d = asdict(self.config)
        d.pop("max_steps")  # a resumed run may extend or cut the step budget
        return json.dumps(d, sort_keys=True)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        assert self.optimizer is not None
        rngs = ddp.gather_rng_states()  # a collective: every rank calls save_checkpoint, rank 0 writes
        state = {
            "format": "netsurgeon-checkpoint-1", "config": self._config_key(), "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "torch_rng": rngs[0], "world_size": self.world_size, "torch_rng_ranks": torch.stack(rngs),
            "epoch_sums": ddp.all_reduce_sum(self._epoch_sums.clone()),  # the ranks' sums: rank 0 resumes them
            "history": json.dumps(self.history),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }
        if self.rank == 0:
            atomic_save(path, lambda tmp: torch.save(state, tmp))
        ddp.barrier()

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        assert self.optimizer is not None
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise ValueError(f"checkpoint {str(path)!r} is unreadable (truncated or not a checkpoint): {e}") from e
        if not isinstance(state, dict) or state.get("format") != "netsurgeon-checkpoint-1":
            raise ValueError(f"checkpoint {str(path)!r} is not a netsurgeon checkpoint.")
        if state["config"] != self._config_key():
            raise ValueError(f"checkpoint {str(path)!r} was written with another training config; "
                             f"it holds {state['config']}.")
        written_by = int(state.get("world_size", 1))
        if written_by != self.world_size:
            raise ValueError(f"checkpoint {str(path)!r} was written by {written_by} rank(s); this run has "
                             f"{self.world_size}. Resume with the same --nproc_per_node.")
        if len(state["callbacks"]) != len(self.callbacks):
            raise ValueError(f"checkpoint {str(path)!r} holds {len(state['callbacks'])} callback states, "
                             f"this run has {len(self.callbacks)} callbacks.")
        try:
            attach_masks_for_state_dict(self.model, state["model"])
            self.model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, AttributeError) as e:
            first = " ".join(str(e).split())[:300]
            raise ValueError(f"checkpoint {str(path)!r} holds another model's weights ({first}); "
                             "resume with the model it was written for, or drop --resume.") from e
        self.optimizer = self._make_optimizer()  # parameters may have moved under new masks
        self.optimizer.load_state_dict(state["optimizer"])
        # clone: torch 2.13 segfaults in set_rng_state on a row view with a storage offset
        torch.set_rng_state((state["torch_rng_ranks"][self.rank] if "torch_rng_ranks" in state
                             else state["torch_rng"]).clone())
        self._epoch_sums = state["epoch_sums"].clone() if self.rank == 0 else torch.zeros_like(state["epoch_sums"])
        self.history = json.loads(state["history"])
        self.step = int(state["step"])
        for cb, s in zip(self.callbacks, state["callbacks"], strict=True):
            cb.load_state_dict(s)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int = 0,
            resume: bool = False, progress: bool = False) -> TrainResult:
        check_finite_model("train", self.model)
        torch.manual_seed(self.config.seed)
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.optimizer = self._make_optimizer()
        if resume:
            if checkpoint is None or not Path(checkpoint).is_file():
                raise ValueError(f"resume: no checkpoint file at {str(checkpoint)!r}.")
            self.load_checkpoint(checkpoint)
            log.info("resumed from %s at step %d", checkpoint, self.step)
        bar = Progress("train", self.total_steps, start=self.step) if progress and self.rank == 0 else None
        self.model.train()
        try:
            while self.step < self.total_steps:
                self._one_step()
                if bar:
                    bar.update(self.step, self._running())
                if checkpoint and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint)
        except KeyboardInterrupt:
            if checkpoint and self.world_size > 1:  # the other ranks may be gone: no collective now
                log.warning("interrupted at step %d; resume from the last periodic checkpoint %s", self.step,
                            checkpoint)
            elif checkpoint:
                self.save_checkpoint(checkpoint)
                log.warning("interrupted at step %d; checkpoint written to %s", self.step, checkpoint)
            raise
        finally:
            if bar:
                bar.close()
        if checkpoint:  # the state training ended in: a resumed run with more steps goes on from it
            self.save_checkpoint(checkpoint)
        self._check_ranks("end of training")
        selected = int(self.history[-1]["epoch"]) if self.history else None
        if self._selector is not None and self._selector.best_epoch:
            self._selector.restore(self)
            selected = self._selector.best_epoch
            log.info("select='best_val': kept epoch %d of %d", selected, len(self.history))
        return TrainResult(self.history, self.step, selected)

    def _running(self) -> str:
        """This epoch's running training loss and its metric, for the progress bar."""
        loss, correct, n = (float(v) for v in self._epoch_sums)
        if not n:
            return ""
        if getattr(self.data, "metric", "accuracy") == "perplexity":
            return f"loss {loss / n:.4f} ppl {math.exp(min(loss / n, 700)):.3f}"
        return f"loss {loss / n:.4f} acc {correct / n:.4f}"

    def _check_ranks(self, when: str) -> None:
        """Under torchrun: stop if the ranks' weights or masks differ (see :func:`distributed.check_identical`)."""
        if self.world_size > 1:
            ddp.check_identical([*self.model.named_parameters(), *((n, b) for n, b in self.model.named_buffers()
                                                                   if n.endswith(".mask"))], when)

    def _one_step(self) -> None:
        assert self.optimizer is not None
        epoch, i = divmod(self.step, self.steps_per_epoch)
        x, y = self._batch(epoch, i)
        if self.config.jitter:  # its own generator per step: the same shifts after a resume
            if x.dim() != 4:
                raise ValueError(f"train: jitter={self.config.jitter!r} shifts images, but a batch has shape "
                                 f"{tuple(x.shape)} (need N, C, H, W).")
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7_919 * self.step + 1)
            x = jitter_images(x, self.config.jitter, g)
        if self._split_rows:
            x, y = ddp.shard_rows(x, y)
        lr = lr_at(self.config, self.step, self.steps_per_epoch, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = self.model(x)
        flat_out, flat_y = flat_predictions(out, y)  # a language model: every token is one prediction
        loss = squared_hinge(flat_out, flat_y) if self.config.loss == "squared_hinge" else F.cross_entropy(
            flat_out, flat_y)
        weight = math.prod(getattr(cb, "hard_loss_weight", 1.0) for cb in self.callbacks)  # distillation: 1 - α
        total = loss * weight if weight != 1.0 else loss
        for cb in self.callbacks:
            extra = cb.loss(out, (x, y), self)
            if extra is not None:
                total = total + extra
        finite = bool(torch.isfinite(total))
        if self.world_size > 1:  # every rank stops together, or the others would wait in the all-reduce
            finite = float(ddp.all_reduce_sum(torch.tensor([0.0 if finite else 1.0], device="cpu"))[0]) == 0.0
        if not finite:
            raise FloatingPointError(f"train: loss became {float(total)} at step {self.step}; "
                                     "lower the learning rate.")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.world_size > 1:
            ddp.sum_weighted_grads([p for p in self.model.parameters() if p.requires_grad], len(y))
        for cb in self.callbacks:
            cb.after_backward(self)
        self.optimizer.step()
        self.step += 1
        for cb in self.callbacks:
            cb.after_step(self)
        with torch.no_grad():
            self._epoch_sums += torch.tensor([float(loss) * flat_y.numel(), float((flat_out.argmax(1) == flat_y).sum()),
                                              flat_y.numel()], dtype=torch.float64, device="cpu")
        if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
            if self.world_size > 1:
                ddp.all_reduce_sum(self._epoch_sums)
                ddp.average_batchnorm_stats(self.model)
                self._check_ranks(f"epoch {epoch + 1}")
            s = self._epoch_sums
            val = self.data.val
            has_val = val is not None and _nonempty(val)
            val_loss, val_acc = _evaluate_sharded(self.model, val) if has_val else (float("nan"), float("nan"))
            self.history.append({"epoch": epoch + 1, "step": self.step, "loss": float(s[0] / s[2]),
                                 "train_acc": float(s[1] / s[2]), "val_acc": val_acc, "val_loss": val_loss, "lr": lr})
            log.info("epoch %d: loss %.4f train acc %.4f val acc %.4f val loss %.4f", epoch + 1, s[0] / s[2],
                     s[1] / s[2], val_acc, val_loss)
            self._epoch_sums = torch.zeros(3, dtype=torch.float64, device="cpu")
            for cb in self.callbacks:
                cb.on_epoch_end(self)


def _evaluate_sharded(model: nn.Module, split: Split | Any) -> tuple[float, float]:
    """:func:`evaluate`, each rank on its share of an in-memory split, the sums combined (a loader: every rank
    evaluates all of it)."""
    rank, size = ddp.world()
    if size > 1 and ddp.rank_local(split):  # each rank holds its own part of the split: combine the sums
        loss, acc = evaluate(model, split)
        n = len(split.sampler)  # type: ignore[attr-defined]
        sums = ddp.all_reduce_sum(torch.tensor([loss * n, acc * n, n], dtype=torch.float64, device="cpu"))
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])
    if size == 1 or not isinstance(split, Split):
        return evaluate(model, split)
    part = Split(split.x[rank::size], split.y[rank::size])
    n = len(part)
    loss, acc = evaluate(model, part) if n else (0.0, 0.0)
    sums = ddp.all_reduce_sum(torch.tensor([loss * n, acc * n, n], dtype=torch.float64, device="cpu"))
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _nonempty(data: Any) -> bool:
    try:
        return len(data) > 0
    except TypeError:
        return True


def train(model: nn.Module, data: Dataset | LoaderData | Any, config: TrainConfig | None = None, *,
          callbacks: Sequence[Callback] = (), checkpoint: str | os.PathLike[str] | None = None,
          checkpoint_every: int = 0, resume: bool = False, progress: bool = False,
          device: str | torch.device | None = None) -> TrainResult:
    """Train ``model`` in place on ``data.train`` (validation accuracy logged per epoch).

    Args:
        model: any ``nn.Module`` mapping a batch of ``data`` inputs to class logits (B, C), or, for token data
            (targets (B, T)), a language model's next-token logits (B, T, vocab); every token is one prediction.
        data: the splits, a :class:`~netsurgeon.data.Dataset` or the user's DataLoaders wrapped by
            :func:`netsurgeon.data.from_loaders`, or a bare training DataLoader; callbacks may read the validation
            split, never the test split.
        config: hyper-parameters (default :class:`TrainConfig`).
        callbacks: training-time methods (DNS, AutoPrune, ...), see :class:`Callback`.
        checkpoint: file to write checkpoints to (atomically); also written on Ctrl-C and at the end.
        checkpoint_every: write a checkpoint every this many steps (0: only on interrupt and at the end).
        resume: continue from ``checkpoint``; the result equals an uninterrupted run's.
        progress: show a progress bar with loss and accuracy on stderr.
        device: ``cpu``, ``cuda`` or ``cuda:N`` to train on (None: where the model's parameters are); the model
            moves there, in-memory splits once, a loader's batches as they come.
    """
    dev, data = place(model, as_data(data), device)
    with running_on(dev):
        return Trainer(model, data, config or TrainConfig(), callbacks).fit(checkpoint, checkpoint_every, resume,
                                                                           progress)


def run_training(model: nn.Module, ctx: StageContext, config: TrainConfig,
                 callback: Callback | None = None) -> dict[str, Any]:
    """Run one training stage of a pipeline: train with ``callback`` (if any) and the pipeline's own callbacks
    (``ctx.callbacks``), checkpointing to ``ctx.checkpoint`` (resumed from it when ``ctx.resume``), then
    ``finalize`` the pipeline's callbacks and the method's. The report holds the per-epoch history and the
    epoch kept (``config.select``)."""
    data = ctx.require_data(config.owner)
    resume = bool(ctx.resume and ctx.checkpoint is not None and Path(ctx.checkpoint).is_file())
    own = [callback] if callback is not None else []
    result = train(model, data, config, callbacks=[*own, *ctx.callbacks], checkpoint=ctx.checkpoint,
                   checkpoint_every=ctx.checkpoint_every, resume=resume, progress=ctx.progress)
    for cb in [*ctx.callbacks, *own]:
        cb.finalize(model)
    kept = next((h for h in result.history if h["epoch"] == result.selected_epoch), {})
    return {"steps": result.steps, "val_acc": kept.get("val_acc"), "train_loss": kept.get("loss"),
            "selected_epoch": result.selected_epoch, "resumed": resume, "history": result.history}


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    owner: ClassVar[str] = "finetune"


@register("finetune", quick={"epochs": 1}, not_compared="the fine-tuning stage of entries",
          kind="training", config=FinetuneConfig, accepts=("float", "shared", "hashed", "pq"),
          needs_data=True,
          citation="Han et al. 2015 Sec. 3.3 (retraining); Han et al. 2016 Sec. 3.3 (centroid fine-tuning)",
          summary="train with the current masks / codebooks fixed in place (pruned weights stay zero)")
def _finetune(model: nn.Module, cfg: FinetuneConfig, ctx: StageContext) -> dict[str, Any]:
    return run_training(model, ctx, cfg)
