"""Pipelines: a compression run as a list of registered stages, checked as a whole before any work starts.

    stages:
      - dns: {c_rate: 3.0, epochs: 20}
      - kmeans: {bits: {conv: 8, fc: 5}}
      - finetune: {epochs: 2, lr: 0.001, weight_decay: 0}
      - encode: {value_dtype: float16}

Each stage names a method of the registry (``netsurgeon methods`` lists them) and its options. A pipeline is
refused before anything runs when a stage cannot take the weights the previous one leaves (k-means before a
method that needs float weights), when ``encode`` is not last, or when a stage needs data and none is given.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import pkgutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from ._validation import check_finite_model
from .devices import parse_device, place, running_on
from .forms import weight_form, weight_forms
from .masks import take_skipped
from .plan import FAMILIES
from .progress import log as progress_log
from .registry import ANY_FORM, KINDS, REGISTRY, Method, MethodConfig, StageContext, option, register

__all__ = ["methods", "get_method", "Stage", "Pipeline", "EncodeConfig", "parse_value", "weight_form"]

log = logging.getLogger(__name__)
_DISCOVERED = False


def _discover() -> None:
    """Import every public module of the package once, so every method has registered itself (as scikit-learn's
    ``all_estimators`` walks its package), then check each method's forms and family."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    root = Path(__file__).resolve().parent
    for info in pkgutil.walk_packages([str(root)], f"{root.name}."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            importlib.import_module(info.name)
    known = set(weight_forms()) | {ANY_FORM}
    for m in REGISTRY.values():
        gives = set() if callable(m.gives) or m.gives is None else {m.gives}
        bad = (set(m.accepts) | gives) - known
        if bad:
            raise RuntimeError(f"method {m.name!r} names unknown weight form(s) {sorted(bad)}; known: "
                               f"{sorted(known)}.")
        bad_family = sorted({fam for fam, _ in m.compare.values()} - set(FAMILIES))
        if bad_family:
            raise RuntimeError(f"method {m.name!r}: family must be one of {list(FAMILIES)}; got {bad_family}.")
    _DISCOVERED = True


def methods() -> dict[str, Method]:
    """Every registered method, by name (the package's modules are imported on first use)."""
    _discover()
    return dict(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is an error listing the valid ones."""
    known = methods()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(known))}.")
    return known[name]


@dataclass(frozen=True)
class EncodeConfig(MethodConfig):
    owner: ClassVar[str] = "encode"
    value_dtype: str = option("float32", "dtype of stored float values", choices=("float32", "float16"))
    index_bits: int | str | dict[str, int] = option("auto", "relative-index width 1..16, auto (smallest file per "
                                                    "tensor), or {conv|fc|layer: bits} (the paper: conv 8, fc 5)",
                                                    low=1, high=16, choices=("auto",))
    huffman: bool = option(True, "Huffman-code the streams of shared tensors where that is smaller (Sec. 4)")


@register("encode", kind="codec", config=EncodeConfig, accepts=(ANY_FORM,),
          not_compared="the file-writing stage of every entry",
          citation="Han, Mao, Dally 2016, Deep Compression, arXiv:1510.00149, Sec. 2 (relative indices), Sec. 4",
          summary="how the .nsz file is written: value dtype, index width, Huffman coding (last stage)")
def _encode(model: nn.Module, cfg: EncodeConfig, ctx: StageContext) -> dict[str, Any]:
    return {}  # the file is written by Pipeline.save with these options


def check_checkpoint_dir(path: str | os.PathLike[str] | None) -> Path | None:
    """``path`` as a Path (None stays None), refused when it names a file: the stages' checkpoints go in it."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"pipeline: checkpoint_dir {str(p)!r} is a file, not a directory.")
    return p


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML (numbers, true/false, null, lists, {k: v} mappings), else the plain string; an
    N:M pattern such as ``2:4`` stays a string."""
    from .recipes import yaml_safe_load

    try:
        return yaml_safe_load(text)
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class Stage:
    method: str
    config: MethodConfig

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        return {self.method: self.config.to_dict()}


class Pipeline:
    """An ordered list of :class:`Stage`\\ s, plus what a recipe says about the model and the data.

    Build it with :meth:`from_spec` (a list like the YAML ``stages``; an ``encode`` stage is appended when the
    last stage is not one) or :meth:`from_yaml`; ``overrides``
    (``"key=value"``, ``"stage.key=value"`` or ``"N.key=value"`` with N the 1-based stage number) change
    options, and ``defaults`` (e.g. ``{"seed": 0}``) fill keys that neither the spec nor an override set.
    """

    def __init__(self, stages: Sequence[Stage], model: dict[str, Any] | None = None,
                 data: dict[str, Any] | None = None) -> None:
        if not stages:
            raise ValueError("pipeline: no stages; give at least one method.")
        self.stages, self.model, self.data = list(stages), model, data

    # -- building ----------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Sequence[Any], overrides: Sequence[str] = (), defaults: Mapping[str, Any] | None = None,
                  model: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                  source: str = "pipeline") -> Pipeline:
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
            raise ValueError(f"{source}: 'stages' must be a list of {{method: {{options}}}}; got {spec!r}.")
        raw: list[tuple[str, dict[str, Any]]] = []
        for i, item in enumerate(spec, 1):
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, Mapping) or len(item) != 1:
                raise ValueError(f"{source}: stage {i} must be one method name or {{method: {{options}}}}; "
                                 f"got {item!r}.")
            (name, opts), = item.items()
            opts = {} if opts is None else opts
            if not isinstance(opts, Mapping):
                raise ValueError(f"{source}: options of stage {i} ({name!r}) must be a mapping; got {opts!r}.")
            get_method(str(name))
            raw.append((str(name), dict(opts)))
        if not raw or get_method(raw[-1][0]).kind != "codec":
            raw.append(("encode", {}))  # every pipeline ends by writing the file; its options can be --set
        for text in overrides:
            cls._apply_override(raw, text, source)
        stages = []
        for i, (name, opts) in enumerate(raw, 1):
            m = get_method(name)
            for k, v in (defaults or {}).items():
                if k in m.config.keys():
                    opts.setdefault(k, v)
            try:
                stages.append(Stage(name, m.make_config(opts)))
            except TypeError as e:
                raise ValueError(f"{source}: stage {i} ({name!r}): {e}") from e
            except ValueError as e:
                raise ValueError(f"{source}: stage {i}: {e}") from e
        return cls(stages, model, data)

    @staticmethod
    def _apply_override(raw: list[tuple[str, dict[str, Any]]], text: str, source: str) -> None:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes key=value (or stage.key=value); got {text!r}.")
        target, _, opt = key.rpartition(".")
        if target:
            if target.isdigit():
                idx = [int(target) - 1] if 1 <= int(target) <= len(raw) else []
            else:
                idx = [i for i, (n, _) in enumerate(raw) if n == target]
            if not idx:
                raise ValueError(f"--set {text!r}: no stage {target!r}; stages: "
                                 f"{', '.join(f'{i}. {n}' for i, (n, _) in enumerate(raw, 1))}.")
            if len(idx) > 1:
                raise ValueError(f"--set {text!r}: {len(idx)} stages are {target!r}; name one by its number "
                                 f"({', '.join(str(i + 1) for i in idx)}).")
        else:
            idx = [i for i, (n, _) in enumerate(raw) if opt in get_method(n).config.keys()]
            if not idx:
                valid = sorted({k for n, _ in raw for k in get_method(n).config.keys()})
                raise ValueError(f"--set {text!r}: no stage has an option {opt!r}; valid keys: {', '.join(valid)}.")
            if len(idx) > 1:
                where = ", ".join(f"{i + 1}.{opt} ({raw[i][0]})" for i in idx)
                raise ValueError(f"--set {text!r}: {opt!r} is an option of several stages; write one of {where}.")
        name, opts = raw[idx[0]]
        if opt not in get_method(name).config.keys():
            raise ValueError(f"--set {text!r}: method {name!r} has no option {opt!r}; valid keys: "
                             f"{', '.join(get_method(name).config.keys())}.")
        opts[opt] = parse_value(value.strip())

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: Sequence[str] = (),
                  defaults: Mapping[str, Any] | None = None) -> Pipeline:
        from .recipes import read_recipe

        raw = read_recipe(path)
        return cls.from_spec(raw["stages"], overrides, defaults, raw.get("model"), raw.get("data"), source=str(path))

    # -- checking and running ------------------------------------------------------------------------------
    def check(self, *, has_data: bool, start_form: str = "float") -> None:
        """Refuse an impossible order, a misplaced codec, or a stage that needs data when there is none."""
        form, came_from = start_form, "the input model"
        for i, st in enumerate(self.stages, 1):
            m = st.spec
            if m.kind == "codec" and i != len(self.stages):
                raise ValueError(f"pipeline: stage {i} {m.name!r} writes the file and must be the last stage.")
            if not m.takes(form):
                text = weight_forms()
                need = " or ".join(text.get(f, f) for f in sorted(m.accepts))
                raise ValueError(f"pipeline: stage {i} {m.name!r} needs {need}, but {came_from} leaves "
                                 f"{text.get(form, form)}; put {m.name!r} earlier.")
            if m.requires_data(st.config) and not has_data:
                raise ValueError(f"pipeline: stage {i} {m.name!r} needs data ({KINDS[m.kind]}); give a data set.")
            gives = m.output_form(st.config)
            if gives is not None:
                form, came_from = gives, f"stage {i} {m.name!r}"

    def check_layers(self, model: nn.Module) -> None:
        """Refuse a per-layer option (``{layer: value}``) naming a layer ``model`` does not have, before any data
        loads or any work starts. Keys are layer (module) names as ``netsurgeon info`` and the reports print them
        (``fc1``; ``fc1.weight`` is read as ``fc1``), or a layer kind (``conv``, ``fc``) for every layer of it."""
        from .masks import LAYER_KINDS

        layers = {n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
        for i, st in enumerate(self.stages, 1):
            for key, value in st.config.to_dict().items():
                if not isinstance(value, Mapping):
                    continue
                bad = [k for k in value if k not in LAYER_KINDS and k not in layers
                       and k.rpartition(".")[0] not in layers]
                if bad:
                    shown = ", ".join(sorted(layers)[:12]) + (", ..." if len(layers) > 12 else "")
                    raise ValueError(f"stage {i} {st.method!r}: option {key!r} names {bad[0]!r}, which is not a layer "
                                     f"of the model; its layers: {shown} (or {'/'.join(LAYER_KINDS)} for every layer "
                                     "of a kind).")

    @property
    def encode(self) -> EncodeConfig:
        last = self.stages[-1].config
        return last if isinstance(last, EncodeConfig) else EncodeConfig()

    def run(self, model: nn.Module, data: Any = None, *, progress: bool = False,
            device: str | torch.device | None = None, teacher: nn.Module | None = None,
            callbacks: Sequence[Any] = (), checkpoint_dir: str | os.PathLike[str] | None = None,
            checkpoint_every: int = 500, resume: bool = False) -> list[dict[str, Any]]:
        """Run every stage on ``model`` in place; returns one record per stage (method, config, report, seconds).

        ``data`` is a :class:`~netsurgeon.data.Dataset` or :func:`~netsurgeon.data.from_loaders` data; stages
        train on its train split and choose on its validation split, never the test split. ``device``
        (``cpu``, ``cuda``, ``cuda:N``; None: where the model's parameters are) is where every stage runs: the
        model and in-memory splits move there first, and the methods keep their tensors beside the weights.
        ``teacher``: the model a ``distill`` stage learns from (default: ``model`` as the pipeline receives it);
        give the large model here to distill it into a smaller ``model`` (a student with fewer layers).
        ``callbacks``: :class:`~netsurgeon.train.Callback`\\ s run inside every training stage besides the method's
        own (a probe, a logger), finalized before it. ``checkpoint_dir``: each training stage checkpoints there
        (``stage<N>-<method>.ckpt``, every ``checkpoint_every`` steps, on Ctrl-C and at its end); with ``resume``
        a stage continues from its file, and a stage that had finished takes its final weights without training
        again (stages without training re-run: they are deterministic for a seed).
        """
        from .architecture import record_inputs
        from .changes import arch_of, set_arch
        from .data import as_data

        data = None if data is None else as_data(data)
        parse_device(device, "device")
        if resume and checkpoint_dir is None:
            raise ValueError("pipeline: resume=True needs checkpoint_dir (where the stages' checkpoints are).")
        from .train import Callback

        if isinstance(callbacks, (str, bytes, Callback)) or not all(isinstance(c, Callback) for c in callbacks):
            raise ValueError(f"pipeline: callbacks must be a list of netsurgeon.Callback; got {callbacks!r}.")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"pipeline: checkpoint_every must be an integer >= 0; got {checkpoint_every!r}.")
        ckpt = check_checkpoint_dir(checkpoint_dir)
        self.check(has_data=data is not None, start_form=weight_form(model))
        if data is not None and arch_of(model) is not None:  # token ids: the saved file's record says so
            set_arch(model, record_inputs(arch_of(model), data))
        self.check_layers(model)
        check_finite_model("pipeline", model)
        dev, data = place(model, data, device)
        if teacher is not None:
            teacher.to(dev)
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(data, progress, teacher, tuple(callbacks), None, checkpoint_every, resume)
        with running_on(dev):
            return self._run_stages(model, ctx, ckpt)

    def _run_stages(self, model: nn.Module, ctx: StageContext, ckpt: Path | None) -> list[dict[str, Any]]:
        if ctx.teacher is None and any(st.spec.needs_teacher for st in self.stages):
            ctx.teacher = copy.deepcopy(model).eval()
        out = []
        for i, st in enumerate(self.stages, 1):
            (progress_log if ctx.progress else log).info("stage %d/%d: %s", i, len(self.stages), st.method)
            ctx.checkpoint = None if ckpt is None else ckpt / f"stage{i}-{st.method}.ckpt"
            t0 = time.perf_counter()
            take_skipped(model)
            report = st.spec.run(model, st.config, ctx)
            out.append({"stage": i, "method": st.method, "config": st.config.to_dict(), "report": report,
                        "seconds": time.perf_counter() - t0, "skipped": take_skipped(model)})
        return out

    def save(self, model: nn.Module, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
             history: Sequence[dict[str, Any]] = (), arch: dict[str, Any] | None = None,
             runs: Sequence[dict[str, Any]] | None = None) -> Any:
        """Write ``model`` with the encode stage's options; ``meta["pipeline"]`` gets the earlier ``history``
        (from the input file) followed by this pipeline's stages (with the layers each left as they were, from
        ``runs``, the records :meth:`run` returned), so chained runs keep their provenance."""
        from .nsz import save_compressed

        enc = self.encode
        skipped = {r["stage"]: r["skipped"] for r in (runs or []) if r.get("skipped")}
        runs_made = [{"method": st.method, "config": st.config.to_dict(),
                      **({"skipped": skipped[i]} if i in skipped else {})} for i, st in enumerate(self.stages, 1)]
        runs = [*history, *runs_made]
        meta = {**(meta or {}), "method": "+".join(st.method for st in self.stages), "pipeline": runs}
        return save_compressed(model, path, value_dtype=enc.value_dtype, index_bits=enc.index_bits, arch=arch,
                               meta=meta, huffman=enc.huffman)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": [st.to_dict() for st in self.stages]}
        if self.model:
            out["model"] = self.model
        if self.data:
            out["data"] = self.data
        return out
