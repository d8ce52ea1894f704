"""The method registry: every compression method registers itself once, with a validated config.

A method module declares a frozen config dataclass whose fields are made with :func:`option` (default, a
one-line help, and the allowed range or choices), and registers a ``run`` function with :func:`register`::

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        sparsity: float = option(0.5, "fraction of weights to remove", low=0, high=1, high_open=True)

    @register("mine", kind="oneshot", config=MyConfig, citation="Doe 2024, Eq. (3)", summary="...")
    def _run(model, cfg, ctx):
        ...                      # modify model in place
        return {"kept": ...}     # a JSON-ready report

The CLI (``netsurgeon methods``, ``compress --method NAME --set key=value``), YAML pipelines and validation
messages are all generated from that one declaration: nothing outside the method's module lists its options.

Weight forms describe what a stage needs and leaves, so a pipeline can refuse an impossible order before any
work starts: ``float`` (float weights, possibly masked) and one per storage form that holds weights otherwise
(``shared``, ``int8``, ``binary``, ``hashed``, ``pq``, ...: ``netsurgeon.forms`` declares them; the pipeline
checks the names when it discovers the methods, so this module imports no form).

A method also declares what the rest of the product needs of it: ``compare``, its entry (or entries) in
``netsurgeon compare`` as a function of the comparison's plan (``plan.py``), or ``not_compared``, why it has none;
``quick``, settings for a fast smoke run (the tests run every method with them); ``needs_teacher``, whether the
pipeline must keep the model as it received it (distillation).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

__all__ = ["KINDS", "ANY_FORM", "option", "MethodConfig", "Method", "StageContext", "register", "REGISTRY"]

KINDS: dict[str, str] = {
    "training": "training-time callback (runs inside a training run)",
    "oneshot": "one-shot transform",
    "quantizer": "quantizer (changes how weights are represented)",
    "codec": "codec (how the file is written; last stage)",
}
ANY_FORM = "any"  # accepts every weight form (the encode stage)


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple[Any, ...] | None = None) -> Any:
    """A config field: default, one-line help, and the allowed range (``low``/``high``) or ``choices``.

    For a per-layer field (``float | dict[str, float]``) the range applies to every value of the mapping.
    """
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _range_text(meta: Mapping[str, Any]) -> str:
    lo, hi = meta.get("low"), meta.get("high")
    if lo is not None and hi is not None:
        return f"in {'(' if meta['low_open'] else '['}{lo:g}, {hi:g}{')' if meta['high_open'] else ']'}"
    if lo is not None:
        return f"{'>' if meta['low_open'] else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if meta['high_open'] else '<='} {hi:g}"
    return ""


def type_text(tp: Any, meta: Mapping[str, Any]) -> str:
    """Plain-English description of a field's type and range, for help and error messages."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a, meta) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is dict:
        return f"a mapping {{layer: {type_text(typing.get_args(tp)[1], meta)}}}"
    if tp is str and meta.get("choices"):
        return f"one of {list(meta['choices'])}"
    rng = _range_text(meta)
    name = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__",
                                                                                                   str(tp)))
    return f"{name} {rng}".strip() if tp in (int, float) else name


class _Bad(Exception):
    pass


def _check(value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Return ``value`` (numbers normalized) if it is of type ``tp`` within ``meta``'s range, else raise _Bad."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, meta)
            except _Bad:
                continue
        raise _Bad
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Bad
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Bad
        return {k: _check(v, vt, meta) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad
        if tp is int and not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise _Bad
            value = int(value)
        if not math.isfinite(value):
            raise _Bad
        lo, hi = meta.get("low"), meta.get("high")
        if lo is not None and (value < lo or (meta.get("low_open") and value == lo)):
            raise _Bad
        if hi is not None and (value > hi or (meta.get("high_open") and value == hi)):
            raise _Bad
        return float(value) if tp is float else value
    if tp is str:
        if not isinstance(value, str):
            raise _Bad
        if meta.get("choices") and value not in meta["choices"]:
            raise _Bad
        return value
    raise TypeError(f"registry: unsupported option type {tp!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: each field is type- and range-checked from its :func:`option`.

    Subclasses add cross-field checks in :meth:`validate`. ``owner`` names the method in messages.
    """

    owner: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                checked = _check(value, hints[f.name], f.metadata)
            except _Bad:
                raise ValueError(f"{self.owner}: {f.name} must be {type_text(hints[f.name], f.metadata)}; "
                                 f"got {value!r}.") from None
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ValueError naming the method and the keys."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build from a mapping; an unknown key is an error that lists the valid ones."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"{cls.owner}: unknown key(s) {unknown}; valid keys: {', '.join(cls.keys())}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per field: key, type/range text, default, help."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append({"key": f.name, "type": type_text(hints[f.name], f.metadata), "default": default,
                         "help": f.metadata.get("help", "")})
        return rows


@dataclass
class StageContext:
    """What a stage's ``run`` may use besides the model: the data (None if the user gave none), a progress
    flag, ``teacher``: the model as the pipeline received it (kept only when a stage distills from it), and
    what a training stage passes to its run: the pipeline's own ``callbacks`` (run inside every training
    stage, finalized before the method's), and ``checkpoint`` (the stage's checkpoint file, written every
    ``checkpoint_every`` steps; continued from when ``resume``). Stages never read ``data.test``."""

    data: Any = None
    progress: bool = False
    teacher: Any = None
    callbacks: tuple[Any, ...] = ()
    checkpoint: Any = None
    checkpoint_every: int = 0
    resume: bool = False

    def require_data(self, method: str) -> Any:
        if self.data is None:
            raise ValueError(f"{method}: needs data (training or gradient statistics); give a data set.")
        return self.data


@dataclass(frozen=True)
class Method:
    """A registered method. ``run(model, config, ctx) -> report`` modifies ``model`` in place."""

    name: str
    kind: str
    config: type[MethodConfig]
    citation: str
    summary: str
    run: Callable[..., dict[str, Any]]
    accepts: frozenset[str]
    gives: str | None | Callable[[Any], str | None]
    needs_data: bool | Callable[[Any], bool]
    family: str = ""
    compare: Mapping[str, tuple[str, Callable[[Any], list[dict[str, Any]]]]] = field(default_factory=dict)
    not_compared: str = ""
    quick: Mapping[str, Any] = field(default_factory=dict)
    needs_teacher: bool = False

    def make_config(self, values: Mapping[str, Any] | None = None) -> MethodConfig:
        return self.config.from_dict(dict(values or {}))

    def requires_data(self, config: MethodConfig) -> bool:
        return bool(self.needs_data(config) if callable(self.needs_data) else self.needs_data)

    def output_form(self, config: MethodConfig) -> str | None:
        """The weight form this stage leaves with ``config`` (None: the form it received)."""
        return self.gives(config) if callable(self.gives) else self.gives

    def takes(self, form: str) -> bool:
        """Whether this method can start from weights in ``form``."""
        return ANY_FORM in self.accepts or form in self.accepts


REGISTRY: dict[str, Method] = {}


_Run = Callable[..., dict[str, Any]]
_Entry = Callable[[Any], list[dict[str, Any]]]


def register(name: str, *, kind: str, config: type[MethodConfig], citation: str, summary: str,
             accepts: tuple[str, ...] = ("float",), gives: str | None | Callable[[Any], str | None] = None,
             needs_data: bool | Callable[[Any], bool] = False, family: str = "",
             compare: _Entry | Mapping[str, _Entry | tuple[str, _Entry]] | None = None, not_compared: str = "",
             quick: Mapping[str, Any] | None = None, needs_teacher: bool = False) -> Callable[[_Run], _Run]:
    """Register ``run`` as method ``name``.

    Args:
        accepts: weight forms it can start from (``ANY_FORM`` for all); gives: the form it leaves (None:
            unchanged; or a function of the config); needs_data: a bool or a function of the config.
        family: its family in comparisons (``plan.FAMILIES``).
        compare: its ``netsurgeon compare`` entry: a function of the plan returning stages (the entry is named
            after the method), or ``{entry name: function or (family, function)}`` for several; ``not_compared``
            says why a method has no entry of its own name (every method has one or the other).
        quick: option values for a fast smoke run (the tests run every method with them).
        needs_teacher: the pipeline keeps a copy of the model as it received it (``StageContext.teacher``).

    Raises RuntimeError on a duplicate name or a malformed declaration.
    """
    if kind not in KINDS:
        raise RuntimeError(f"register({name!r}): kind must be one of {list(KINDS)}; got {kind!r}.")
    if not dataclasses.is_dataclass(config) or not issubclass(config, MethodConfig):
        raise RuntimeError(f"register({name!r}): config must be a MethodConfig dataclass.")
    raw = {} if compare is None else dict(compare) if isinstance(compare, Mapping) else {name: compare}
    if (name in raw) == bool(not_compared):
        raise RuntimeError(f"register({name!r}): give the method's own compare entry or say why it has none "
                           "(not_compared), not both.")
    entries = {k: v if isinstance(v, tuple) else (family, v) for k, v in raw.items()}
    if any(not fam for fam, _ in entries.values()):
        raise RuntimeError(f"register({name!r}): a method with a compare entry needs a family.")

    def deco(run: _Run) -> _Run:
        if name in REGISTRY and REGISTRY[name].run is not run:
            raise RuntimeError(f"method {name!r} is registered twice.")
        REGISTRY[name] = Method(name, kind, config, citation, summary, run, frozenset(accepts), gives, needs_data,
                                family, entries, not_compared, dict(quick or {}), needs_teacher)
        return run

    return deco
