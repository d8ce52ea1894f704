"""Compress a model file: the library behind ``netsurgeon compress`` and every ``netsurgeon compare`` entry.

:func:`compress_file` reads the input (a dense safetensors file, a plain state dict with the model named, or a
``.nsz`` file in its stored form, so runs chain), builds and checks the pipeline before any data loads, runs it,
and writes the ``.nsz`` file with its provenance; :func:`compress_model` is the part both commands share: run a
pipeline on a model in memory and write the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import atomic_write, sha256_file
from .architecture import record_inputs
from .changes import arch_of
from .devices import model_device, parse_device
from .forms import weight_form
from .modelfile import MissingArchitectureError, load_compressed, load_model
from .nsz import CompressedFile, read_header
from .pipeline import Pipeline, check_checkpoint_dir
from .stats import chance_accuracy

__all__ = ["CompressResult", "compress_file", "compress_model", "read_input", "file_history", "output_path",
           "resume_or_start"]

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """What a compression run produced: the compressed model, the file written (None on ranks other than 0), the
    stages' records (method, config, report, seconds) and the test metrics."""

    model: nn.Module
    file: CompressedFile | None
    runs: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)


def read_input(model_file: str | os.PathLike[str], model_spec: str | None = None,
               model_args: Mapping[str, Any] | None = None, *, trust_code: bool = False,
               keep_codecs: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The model to compress and its file's metadata: a ``.nsz`` file in its stored form (codebooks, int8, ...
    kept), or a safetensors file; ``model_spec`` (a model name or ``pkg.module:factory``) names the architecture of
    a plain state dict (or a file whose record is to be overridden).

    Raises:
        MissingArchitectureError: a plain state dict and no ``model_spec``.
    """
    from .models import build_model

    model = None
    if model_spec is not None:
        model = build_model(model_spec, **dict(model_args or {}))
    if str(model_file).endswith(".nsz"):
        meta = read_header(model_file).header.get("meta") or {}
        return load_compressed(model_file, model, trust_code=trust_code, keep_codecs=keep_codecs), meta
    return load_model(model_file, model, trust_code=trust_code)


def file_history(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stages of every run that made a file (its ``meta["pipeline"]``), so a chained run keeps them."""
    runs = meta.get("pipeline")
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _inherited_defaults(model_file: str | os.PathLike[str], seed: int) -> dict[str, Any]:
    """Options a run takes from its input unless told otherwise: the seed, and a float16 file's value dtype."""
    defaults: dict[str, Any] = {"seed": seed}
    if str(model_file).endswith(".nsz"):
        dtypes = {r.value_dtype for r in read_header(model_file).records if r.value_dtype.startswith("float")}
        if dtypes == {"float16"}:
            defaults["value_dtype"] = "float16"
    return defaults


def compress_model(model: nn.Module, pipe: Pipeline, data: Any, output: str | os.PathLike[str] | None, *,
                   meta: Mapping[str, Any] | None = None, history: Sequence[dict[str, Any]] = (),
                   progress: bool = True, evaluate_test: bool = True,
                   device: str | torch.device | None = None, **run_options: Any) -> CompressResult:
    """Run ``pipe`` on ``model`` in place with ``data``, then write ``output`` (None: nothing is written, e.g. on
    ranks other than 0 of a distributed run). The file records the architecture as the stages left it (with the
    data's input shape where the record has none), ``meta``, the test metrics and the stages of ``history``
    followed by this pipeline's. ``device``: where the stages run (see :meth:`Pipeline.run`); the file is
    written from a CPU copy and the model is left on that device. ``run_options`` go to :meth:`Pipeline.run`
    (``callbacks``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``)."""
    from .train import evaluate

    runs = pipe.run(model, data, progress=progress, device=device, **run_options)
    metrics: dict[str, float] = {}
    if evaluate_test and getattr(data, "test", None) is not None:
        ev = evaluate(model, data.test)
        loss, acc = ev
        metrics = {"test_accuracy": acc, "test_loss": loss}
        if getattr(data, "metric", "accuracy") == "perplexity":
            metrics["test_perplexity"] = ev.perplexity
        chance = chance_accuracy(data)
        if chance is not None and acc <= chance + 0.02:
            log.warning("the compressed model is at chance accuracy (%.2f%%; always predicting the most frequent "
                        "class gives %.2f%%): the pipeline collapsed it; lower the sparsity or train longer",
                        100 * acc, 100 * chance)
    if output is None:
        return CompressResult(model, None, runs, metrics)
    arch = record_inputs(dict(arch_of(model) or {}) or None, data)
    dev = model_device(model)
    info = pipe.save(model.cpu(), output, meta={**(meta or {}), **metrics}, history=history, arch=arch, runs=runs)
    model.to(dev)
    return CompressResult(model, info, runs, metrics)


def compress_file(model_file: str | os.PathLike[str], output: str | os.PathLike[str] | None, *,
                  stages: Sequence[Any] | None = None, recipe: str | os.PathLike[str] | None = None,
                  overrides: Sequence[str] = (), seed: int = 0, model_spec: str | None = None,
                  model_args: Mapping[str, Any] | None = None, trust_code: bool = False,
                  load_data: Callable[[Pipeline, dict[str, Any], nn.Module], Any], progress: bool = True,
                  meta: Mapping[str, Any] | None = None, device: str | torch.device | None = None,
                  checkpoint_dir: str | os.PathLike[str] | None = None,
                  checkpoint_every: int = 500) -> CompressResult:
    """Compress ``model_file`` with a pipeline (``stages`` like a recipe's, or a ``recipe`` file; ``overrides``
    as ``--set``) and write ``output``.

    Everything that can be checked without data is checked first: the pipeline's options and order, the input
    file and its architecture (a plain state dict is rebuilt from ``model_spec``, else from the recipe's
    ``model``). ``load_data(pipe, file_meta, model)`` then returns the data set (and may check that the model
    takes its inputs). The run keeps the input's stored forms, its float16 values unless told otherwise, and the
    history of the runs that made it. ``device`` (``cpu``, ``cuda``, ``cuda:N``) is checked before the file is
    read; the stages run there. ``checkpoint_dir``: the training stages checkpoint there (every
    ``checkpoint_every`` steps), and the same call after an interruption continues from them: the directory
    records the run (:func:`resume_or_start`) and one of another run is refused.
    """
    parse_device(device)
    if (stages is None) == (recipe is None):
        raise ValueError("compress: give stages or a recipe (not both).")
    defaults = _inherited_defaults(model_file, seed)
    pipe = (Pipeline.from_yaml(recipe, overrides, defaults) if recipe is not None
            else Pipeline.from_spec(stages, overrides, defaults, source="--method"))
    try:
        model, file_meta = read_input(model_file, model_spec, model_args, trust_code=trust_code)
    except MissingArchitectureError:  # a plain state dict: the recipe's model, if it names one, rebuilds it
        if model_spec is not None or not pipe.model:
            raise
        spec = pipe.model.get("factory") or pipe.model.get("name")
        model, file_meta = read_input(model_file, spec, {**(pipe.model.get("kwargs") or {}), **(model_args or {})},
                                      trust_code=trust_code)
    pipe.check(has_data=True, start_form=weight_form(model))
    pipe.check_layers(model)
    check_checkpoint_dir(checkpoint_dir)  # before the data loads
    data = load_data(pipe, file_meta, model)
    resume = checkpoint_dir is not None and resume_or_start(checkpoint_dir, model_file, pipe, seed, data)
    return compress_model(model, pipe, data, output, meta={**file_meta, **(meta or {})},
                          history=file_history(file_meta), progress=progress, device=device,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume)


RUN_RECORD = "run.json"


def resume_or_start(checkpoint_dir: str | os.PathLike[str], model_file: str | os.PathLike[str], pipe: Pipeline,
                    seed: int, data: Any) -> bool:
    """Whether a compression run with ``checkpoint_dir`` continues from the checkpoints there.

    The directory's ``run.json`` records the run that owns it: the input file's sha256, the stages with every
    option, the seed and the data set's name. The same run continues (True); another run is refused with the
    fields that differ, so an edited recipe or another input never resumes from weights it did not make; an empty
    or new directory is claimed for this run (False).
    """
    d = Path(checkpoint_dir)
    record = json.loads(json.dumps({"input_sha256": sha256_file(model_file), "stages": pipe.to_dict()["stages"],
                                    "seed": seed, "data": getattr(data, "name", None)}, default=str))
    f = d / RUN_RECORD
    if f.is_file():
        try:
            held = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint directory {str(d)!r}: its {RUN_RECORD} is unreadable ({e}); give a new "
                             "directory.") from e
        differ = sorted(k for k in record if not isinstance(held, dict) or held.get(k) != record[k])
        if differ:
            raise ValueError(f"checkpoint directory {str(d)!r} holds another run's checkpoints (its "
                             f"{', '.join(differ)} differ); give a new directory, or delete this one to start over.")
        log.info("continuing the run checkpointed in %s", d)
        return True
    with atomic_write(f, "w") as fh:
        json.dump(record, fh, indent=2)
    return False


def output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, refused (one line, quoting it) unless it names a ``.nsz`` file."""
    p = Path(path)
    if p.suffix != ".nsz":
        raise ValueError(f"compress writes a .nsz file; the output {str(p)!r} has another extension.")
    return p
