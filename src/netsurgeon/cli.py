"""The ``netsurgeon`` command line: parse, call one library function, print. No compression logic here."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from . import __version__
from ._catalog import DATASETS, METRICS, MODEL_NAMES

# Everything that imports torch is imported inside the commands: --help and argument errors answer fast.

log = logging.getLogger("netsurgeon")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment (it may be replaced after the handler is made)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Fail(click.ClickException):
    """A library error shown as one line, exit code 2."""

    exit_code = 2


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's ValueError family (DataError, NszError, ...) into a one-line CLI error."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FloatingPointError) as e:
            raise _Fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from e

    return run


def _echo_table(table: Any) -> None:
    from .report import print_table

    print_table(table)


@click.group()
@click.version_option(__version__, prog_name="netsurgeon")
@click.option("-v", "--verbose", count=True, help="Log progress (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Make trained PyTorch networks smaller and faster, and measure it."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Long phases report on this logger: a bar on a terminal, plain lines every few seconds otherwise.
    progress = logging.getLogger("netsurgeon.progress")
    progress.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in progress.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
        progress.propagate = False
    if _rank() > 0:  # under torchrun only rank 0 reports; the other ranks say only what goes wrong
        progress.setLevel(logging.WARNING)


def _rank() -> int:
    """This process's rank under torchrun (0 in a plain run), read without importing torch."""
    return int(os.environ.get("RANK", "0") or 0) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0


def _start_ranks() -> None:
    """Join torchrun's process group when several ranks run this command (a no-op otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from .distributed import init_from_env

        init_from_env()


def _check_data_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value in DATASETS or ":" in value:
        return value
    raise click.BadParameter(f"unknown data set {value!r}; choose one of {', '.join(DATASETS)}, or give your "
                             "own as package.module:factory.")


_DATA_KEY = "netsurgeon.data"  # where the data options beyond --data/--data-dir/--seed wait for _load_data
_DATA_EXTRA = ("data_file", "seq_len", "token_dtype", "resize", "normalize", "metric")


def _stash_data_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Take the data options that only :func:`_load_data` reads out of the command's arguments (so a command's
    signature names only --data, --data-dir and --seed) and keep them on the click context."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        click.get_current_context().meta[_DATA_KEY] = {k: kwargs.pop(k, None) for k in _DATA_EXTRA}
        return fn(*args, **kwargs)

    return run


def _data_options(brief: bool = False) -> list[Callable[..., Any]]:
    """The data options. ``brief`` (compress, compare: commands that mostly reuse the model file's recorded data
    set and its options) keeps the help short: --seq-len, --token-dtype, --resize and --normalize are accepted but
    not listed (``netsurgeon train --help`` and docs/data.md show them)."""
    return [
        click.option("--data", "data_name", default=None, callback=_check_data_name,
                     metavar="NAME|pkg.module:factory",
                     help=f"Data set: {', '.join(DATASETS)}, or your factory (docs/data.md) [default: the model "
                          "file's, else mnist with --data-dir, else by --data-file's suffix, else digits]."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Directory: MNIST's IDX .gz files, or an image folder (a subfolder per class)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--data-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="File: .npz arrays (npz), token ids .npy/.bin (tokens), any text (text)."),
        click.option("--seq-len", type=int, default=None, hidden=brief,
                     help="Tokens per sequence (tokens, text, stdlib) [default: 128]."),
        click.option("--token-dtype", type=click.Choice(["uint16", "int32"]), default=None, hidden=brief,
                     help="Dtype of a raw .bin token file [default: uint16]."),
        click.option("--resize", default=None, metavar="N|HxW", hidden=brief, help="Resize every image (imagefolder)."),
        click.option("--normalize", default=None, metavar="none|auto|imagenet|M,S|M1,..,S1,..", hidden=brief,
                     help="Per-channel normalization of an image folder [default: none, pixels in [0, 1]]."),
        click.option("--metric", type=click.Choice(METRICS), default=None,
                     help="What the model is judged by [default: perplexity for token data, else accuracy]."),
        _stash_data_opts,
    ]


_data_opts = _data_options()
_data_opts_brief = _data_options(brief=True)


def _with(opts: list[Callable[..., Any]]) -> Callable[..., Any]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


def _model_args(items: tuple[str, ...]) -> dict[str, Any]:
    from .pipeline import parse_value

    out = {}
    for text in items:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value; got {text!r}.", param_hint="--model-arg")
        out[key.strip()] = parse_value(value.strip())
    return out


_model_opts = [
    click.option("--model", "model_spec", default=None, metavar="NAME|pkg.module:factory",
                 help="A netsurgeon model name or the import path of your model factory."),
    click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                 help="Keyword argument of the factory (repeatable; YAML values)."),
]
_device_opt = click.option("--device", default=None, metavar="cpu|cuda|cuda:N",
                           help="Where training and the methods run (default: cpu). Files are always written from "
                                "CPU copies; latency is measured on the CPU runtime.")


def _device(spec: str | None) -> Any:
    """``--device`` checked before any work: a one-line error quoting it unless this machine has it."""
    from .devices import parse_device

    try:
        return parse_device(spec)
    except ValueError as e:
        raise _Fail(str(e)) from None


_threads_opt = click.option("--threads", type=click.IntRange(min=1), default=None,
                            help="torch threads (set it on a busy machine; see README, Troubleshooting).")


def _data_name(given: str | None, data_dir: Path | None, *known: str | None, data_file: Path | None = None) -> str:
    """The data set to use: ``--data``, else what the recipe or the model file says, else MNIST when a directory
    is given, else the kind ``--data-file``'s suffix names (.npz arrays, .npy/.bin token ids, else text), else the
    bundled digits. A directory is never silently ignored."""
    if given is not None:
        if given == "digits" and data_dir is not None:
            raise _Fail(f"--data digits is bundled and takes no --data-dir (got {str(data_dir)!r}).")
        return given
    name = next((k for k in known if k), None)
    if name is None and data_file is not None:
        return {".npz": "npz", ".npy": "tokens", ".bin": "tokens"}.get(data_file.suffix.lower(), "text")
    if data_dir is None:
        return name or "digits"
    if name in (None, "digits"):
        if name == "digits":
            raise _Fail(f"the model was trained on the bundled digits, but --data-dir {str(data_dir)!r} was given; "
                        "pass --data mnist (or fashion-mnist) to use that directory.")
        return "mnist"
    return name


def _load_data(given: str | None, data_dir: Path | None, seed: int, *known: str | None,
               meta: dict[str, Any] | None = None, trust_code: bool = False) -> tuple[str, Any, dict[str, Any]]:
    """Resolve (:func:`_data_name`) and load the data set; returns ``(name, data, record)``, ``record`` being what
    a written file keeps (``data``, ``data_options``, ``metric``) so that a later command on it, given no --data,
    loads the same data. Options the user gives win over the file's; a data factory named only by a file runs
    only with --trust-code."""
    from .data import load_dataset

    opts: dict[str, Any] = {"data_dir": data_dir, **click.get_current_context().meta.get(_DATA_KEY, {})}
    meta = meta or {}
    name = _data_name(given, data_dir, *known, data_file=opts.get("data_file"))
    recorded = meta.get("data_options") if given is None and name == meta.get("data") else None
    if isinstance(recorded, dict):
        for k, v in recorded.items():
            if k in opts and opts[k] is None and v is not None:
                opts[k] = Path(v) if k in ("data_dir", "data_file") else v
        if opts.get("metric") is None and meta.get("metric") is not None:
            opts["metric"] = meta["metric"]
    if ":" in name and given is None and not trust_code:
        raise _Fail(f"the file or recipe names the data factory {name!r}, code outside netsurgeon; pass --data "
                    f"{name} to run it (or --trust-code).")
    data = load_dataset(name, seed=seed, **opts)
    kept = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in opts.items()
            if v is not None and k != "metric"}
    return name, data, {"data": name, "data_options": kept, "metric": data.metric}


def _score_line(scores: dict[str, Any]) -> str:
    """The line that reports a model's test metric: perplexity for a language model, else accuracy."""
    if "test_perplexity" in scores:
        return f"test perplexity {scores['test_perplexity']:.4f}"
    return f"test accuracy {100 * scores.get('test_accuracy', float('nan')):.2f}%"


def _test_scores(model: Any, data: Any) -> tuple[dict[str, Any], str]:
    """The model's scores on the test split (for a file's metadata) and a line that reports its metric."""
    from .train import evaluate

    if data.test is None:
        raise _Fail(f"data set {data.name!r} has no test split; the factory must return one.")
    ev = evaluate(model, data.test)
    scores: dict[str, Any] = {"test_accuracy": ev.accuracy, "test_loss": ev.loss}
    if data.metric == "perplexity":
        scores["test_perplexity"] = ev.perplexity
        return scores, f"test perplexity {ev.perplexity:.4f}"
    return scores, f"test accuracy {100 * ev.accuracy:.2f}%"


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@cli.command("train")
@_with(_model_opts)
@_with(_data_opts)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the trained model (.safetensors).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "step", "cosine", "inv"]), default="constant",
              show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint file (written atomically, also on Ctrl-C).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps (a schedule still spans --epochs).")
@click.option("--select", type=click.Choice(["last", "best_val"]), default="last", show_default=True,
              help="Keep the last epoch's weights, or those of the epoch best on the validation split.")
@_threads_opt
@_device_opt
@_friendly
def train_cmd(model_spec: str | None, model_args: tuple[str, ...], data_name: str | None, data_dir: Path | None,
              seed: int, output: Path, epochs: int, batch_size: int, optimizer: str, lr: float, weight_decay: float,
              schedule: str, checkpoint: Path | None, checkpoint_every: int, resume: bool, max_steps: int | None,
              select: str, threads: int | None, device: str | None) -> None:
    """Train a model from scratch and save it as .safetensors.

    \b
    Examples:
      netsurgeon train --model lenet5 --data mnist --data-dir DIR -o lenet5.safetensors
      netsurgeon train --model resnet_small --data imagefolder --data-dir photos/ --resize 32 -o r.safetensors
      netsurgeon train --model gpt --data stdlib --seq-len 128 --optimizer adam --lr 1e-3 --weight-decay 0 \\
          --max-steps 2000 -o gpt.safetensors
    """
    if model_spec is None:
        raise click.UsageError("give --model (one of " + ", ".join(MODEL_NAMES) + ", or pkg.module:factory).")
    if resume and checkpoint is None:
        raise click.BadParameter("--resume needs --checkpoint FILE.", param_hint="--resume")
    _check_output(output)
    dev = _device(device)
    if output.suffix in (".nsz", ".onnx"):
        raise _Fail(f"train writes a dense .safetensors file; the output {str(output)!r} names a {output.suffix} "
                    "file (a .nsz file is what netsurgeon compress writes from it).")
    kwargs = _model_args(model_args)
    import torch  # torch from here on

    from .modelfile import save_model
    from .models import build_model
    from .train import TrainConfig, train

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, schedule=schedule, seed=seed, max_steps=max_steps, select=select)
    _set_threads(threads)
    _start_ranks()
    data_name, data, record = _load_data(data_name, data_dir, seed)
    torch.manual_seed(seed)  # the model's initial weights: same seed, same weights (on every rank)
    if ":" in model_spec:
        model = build_model(model_spec, data.input_shape, **kwargs)
    else:
        if not data.num_classes:
            raise _Fail(f"data set {data.name!r} does not say its number of classes; return num_classes from the "
                        "factory (a dict key).")
        model = build_model(model_spec, data.input_shape, data.num_classes, **kwargs)
    from .architecture import record_inputs
    from .changes import arch_of, set_arch

    set_arch(model, record_inputs(arch_of(model), data))  # token ids: the record says so for every later command
    _check_input_shape(model, data, model_spec)
    train(model, data, cfg, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
          progress=True, device=dev)
    if _rank() > 0:  # every rank holds the same weights; rank 0 writes them
        return
    scores, line = _test_scores(model, data)
    save_model(model.cpu(), output, meta={**record, **scores, "train": cfg.to_dict()})
    click.echo(f"{model_spec} on {data_name}: {line} -> {output}")


def _check_output(output: Path, *inputs: Path) -> None:
    """Refuse an output that would overwrite an input, or whose directory does not exist."""
    for i in inputs:
        if output.resolve() == i.resolve():
            raise _Fail(f"output {str(output)!r} is the input file; choose another name.")
    if not output.parent.resolve().is_dir():
        raise _Fail(f"output directory {str(output.parent)!r} does not exist.")


def _check_input_shape(model: Any, data: Any, what: str) -> None:
    """Run two training samples through ``model`` so a model/data mismatch is one clear line before any long
    work: a classifier must return (batch, classes) logits, a language model (batch, seq_len, vocab)."""
    import torch

    from .data import sample_batch

    x, y = sample_batch(data, 2)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, IndexError, TypeError) as e:
        raise _Fail(f"{what} does not accept inputs of shape {list(data.input_shape)} ({data.name}): "
                    f"{str(e).splitlines()[0]}. Is --data right?") from e
    finally:
        model.train(was)
    want = "(batch, classes)" if y.dim() == 1 else "(batch, seq_len, vocab)"
    if not isinstance(out, torch.Tensor) or out.shape[:-1] != y.shape or out.shape[-1] < 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _Fail(f"{what} returns outputs of shape {shape} for targets of shape {list(y.shape)} "
                    f"({data.name}); expected {want} logits.")
    if out.shape[-1] <= int(y.max()):
        raise _Fail(f"{what} returns {out.shape[-1]} logits per prediction but {data.name} has targets up to "
                    f"{int(y.max())}; build it for {data.num_classes} classes.")


@cli.command("compress", context_settings={"max_content_width": 100})
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", "method_names", default=None, metavar="NAME[,NAME...]",
              help="Stages to run, in order (see `netsurgeon methods`), e.g. dns,kmeans,finetune.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A stage option (repeatable): key=value, stage.key=value or N.key=value; YAML values.")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A YAML pipeline (see recipes/); --set overrides its values.")
@_with(_model_opts)
@click.option("--trust-code", is_flag=True, help="Allow rebuilding a model by the import path its file records.")
@_with(_data_opts_brief)
@_threads_opt
@_device_opt
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Training stages checkpoint here every 500 steps; the same command after an interruption "
                   "continues from them.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@_friendly
def compress_cmd(model_file: Path, method_names: str | None, overrides: tuple[str, ...], recipe: Path | None,
                 model_spec: str | None, model_args: tuple[str, ...], trust_code: bool, data_name: str | None,
                 data_dir: Path | None, seed: int, threads: int | None, device: str | None,
                 checkpoint_dir: Path | None, output: Path) -> None:
    """Run a compression pipeline on MODEL_FILE and write a .nsz file.

    MODEL_FILE is a .safetensors (from `train`, or a plain state dict with --model) or a .nsz file.

    \b
    Examples:
      netsurgeon compress base.safetensors --method dns --set c_rate=3 -o dns.nsz
      netsurgeon compress base.safetensors --method magnitude,kmeans,finetune \\
          --set sparsity=0.9 --set bits=5 --set 3.lr=0.001 -o small.nsz
      netsurgeon compress base.safetensors --recipe recipes/deep_compression_lenet5.yaml -o dc.nsz
      netsurgeon compress base.safetensors --method binaryconnect --set epochs=20 --set select=best_val \\
          --checkpoint-dir runs/bc -o bc.nsz        # interrupted? the same line continues
    """
    if (method_names is None) == (recipe is None):
        raise click.UsageError("give --method NAME[,NAME...] or --recipe FILE (not both).")
    if not model_file.is_file():
        raise _Fail(f"model file {str(model_file)!r} does not exist.")
    _check_output(output, model_file)
    dev = _device(device)
    from .compress import compress_file, output_path

    output_path(output)
    chosen: dict[str, Any] = {}

    def load_data(pipe: Any, meta: dict[str, Any], model: Any) -> Any:
        _, data, record = _load_data(data_name, data_dir, seed, (pipe.data or {}).get("name"), meta.get("data"),
                                     meta=meta, trust_code=trust_code)
        chosen.update(record)
        _check_input_shape(model, data, str(model_file))
        _start_ranks()
        return data

    _set_threads(threads)
    stages = None if method_names is None else [n.strip() for n in method_names.split(",") if n.strip()]
    result = compress_file(model_file, output if _rank() == 0 else None, stages=stages, recipe=recipe,
                           overrides=overrides, seed=seed, model_spec=model_spec, model_args=_model_args(model_args),
                           trust_code=trust_code, load_data=load_data, meta=chosen, device=dev,
                           checkpoint_dir=checkpoint_dir)
    if result.file is None:  # every rank holds the same compressed model; rank 0 writes it
        return
    info = result.file
    from .stats import size_words

    click.echo(f"{output}: {info.file_bytes:,} bytes, {size_words(info.compression)} than the input model as dense "
               f"float32 ({info.dense_bytes:,} bytes); {_score_line(result.metrics)}")
    from .architecture import original_model

    orig = original_model(info.header.get("arch"), trust_code=True)  # the user's own factory, already run
    if orig is not None:
        n0, n = sum(p.numel() for p in orig.parameters()), sum(p.numel() for p in result.model.parameters())
        click.echo(f"structured: {n:,} of the original {n0:,} parameters ({n0 / n:.2f}x fewer)")


@cli.command("compare", context_settings={"max_content_width": 100})
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--methods", "method_names", default=None, metavar="NAME[,NAME...]",
              help="Entries to run [default: all]; `netsurgeon compare --list` names them.")
@click.option("--pipelines", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML {pipelines: {name: [stages]}} to compare instead of (or with --methods, besides) the "
                   "built-in entries; a stage option `budget: F` takes fraction F of the training budget.")
@click.option("--budget", default="20m", show_default=True, metavar="DURATION",
              help="Wall time for the whole comparison (20m, 1h, 90s); sets the training steps every entry gets.")
@click.option("--sparsity", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9,
              show_default=True, help="Sparsity the pruning entries aim for.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps of every entry, instead of timing them from --budget (the same steps on any "
                   "machine: reproducible weights).")
@_with(_model_opts)
@click.option("--trust-code", is_flag=True, help="Allow rebuilding a model by the import path its file records.")
@_with(_data_opts_brief)
@_threads_opt
@_device_opt
@click.option("--repeats", type=click.IntRange(min=5), default=30, show_default=True,
              help="Timed runs per latency measurement (medians).")
@click.option("--batch", "batch_sizes", default="1,256", show_default=True, metavar="B[,B]",
              help="Batch sizes latency is timed at (e.g. 1,8 for a language model, whose 256 sequences are slow).")
@click.option("--list", "list_only", is_flag=True, help="List the built-in entries and their stages, then exit.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report directory (index.html, results.json, files/, runs/); re-running it resumes.")
@_friendly
def compare_cmd(model_file: Path | None, method_names: str | None, pipelines: Path | None, budget: str, sparsity: float,
                steps: int | None,
                model_spec: str | None, model_args: tuple[str, ...], trust_code: bool, data_name: str | None,
                data_dir: Path | None, seed: int, threads: int | None, device: str | None, repeats: int,
                batch_sizes: str,
                list_only: bool, output: Path | None) -> None:
    """Run every compression method on MODEL_FILE with the same training budget, measure each result the same
    way (test error, nonzeros, file bytes, FLOPs, latency at batch 1 and 256) and write a report.

    \b
    Examples:
      netsurgeon compare base.safetensors --data mnist --data-dir DIR --budget 20m -o report/
      netsurgeon compare base.safetensors --methods magnitude,dns,kmeans --budget 5m -o quick/
    Open report/index.html in a browser. Interrupted? Run the same command again: finished methods are kept.
    """
    from .compare import Plan, parse_budget, plan_entries, suite

    if list_only:
        for name, (family, make) in suite().items():
            stages = " -> ".join(next(iter(s)) for s in make(Plan(steps=1, steps_per_epoch=1)))
            click.echo(f"{name:18s} {family:13s} {stages}")
        return
    if model_file is None:
        raise click.UsageError("give MODEL_FILE, the trained model to compare the methods on (or --list).")
    if output is None:
        raise click.UsageError("give -o/--output DIR for the report.")
    if not model_file.is_file():
        raise _Fail(f"model file {str(model_file)!r} does not exist.")
    if output.exists() and not output.is_dir():
        raise _Fail(f"output {str(output)!r} exists and is not a directory.")
    parse_budget(budget)  # bad input is one line before anything loads
    dev = _device(device)
    batches = _batch_sizes(batch_sizes)
    names = None if method_names is None else [n.strip() for n in method_names.split(",") if n.strip()]
    plan_entries(Plan(steps=1, steps_per_epoch=1, sparsity=sparsity), names, pipelines)
    from .changes import arch_of
    from .compare import run_comparison  # torch from here on
    from .compress import read_input

    _set_threads(threads)
    model, meta = read_input(model_file, model_spec, _model_args(model_args), trust_code=trust_code)
    data_name, data, _ = _load_data(data_name, data_dir, seed, meta.get("data"), meta=meta, trust_code=trust_code)
    _check_input_shape(model, data, str(model_file))
    arch = arch_of(model) or {}
    r = run_comparison(model, data, output, methods=names, pipelines=pipelines, budget=budget, steps=steps,
                       sparsity=sparsity, seed=seed, threads=threads, repeats=repeats, batches=batches,
                       input_file=model_file,
                       data_name=data_name,
                       model_name=str(arch.get("name") or arch.get("factory") or model_spec or model_file.stem),
                       command=_command_line(), progress=True, device=dev)
    ok = [x for x in r["rows"] if x["status"] == "ok"]
    click.echo(f"{len(ok)} of {len(r['rows'])} methods ran ({r['wall_s_this_run'] / 60:.1f} min); "
               f"report: {output / 'index.html'}, numbers: {output / 'results.json'}")


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch 1,8`` as (1, 8): one or more positive integers, comma-separated."""
    try:
        out = tuple(int(p) for p in text.split(","))
    except ValueError:
        out = ()
    if not out or any(b < 1 for b in out):
        raise click.BadParameter(f"give positive batch sizes separated by commas (e.g. 1,8); got {text!r}.",
                                 param_hint="--batch")
    return out


def _command_line() -> str:
    """The current command as a user would type it (arguments, and options that differ from their defaults)."""
    import os
    import shlex
    from pathlib import Path

    def text(v: object) -> str:  # a path as typed from here: no machine's absolute prefix in a shared result
        return os.path.relpath(v) if isinstance(v, Path) and v.is_absolute() else str(v)

    ctx = click.get_current_context()
    parts = ["netsurgeon", ctx.info_name or ""]
    for p in ctx.command.params:
        v = ctx.params.get(p.name or "")
        if isinstance(p, click.Argument):
            parts.append(text(v))
        elif v not in (None, False, ()) and v != p.default:
            flag = max(p.opts, key=len)
            if getattr(p, "is_flag", False):
                parts.append(flag)
            else:
                for x in v if getattr(p, "multiple", False) else [v]:
                    parts += [flag, text(x)]
    return shlex.join(parts)


@cli.command("methods")
@click.argument("name", required=False)
@_friendly
def methods_cmd(name: str | None) -> None:
    """List every compression method, or show one method's options (netsurgeon methods dns)."""
    from .pipeline import get_method, methods
    from .report import method_table, methods_table

    if name is None:
        _echo_table(methods_table(methods()))
        click.echo("Options of one method: netsurgeon methods NAME. Use: compress FILE --method NAME --set key=value.")
        return
    m = get_method(name)
    click.echo(f"{m.name}: {m.summary}")
    click.echo(f"kind: {m.kind}; paper: {m.citation}")
    _echo_table(method_table(m))


@cli.command("eval")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@_with(_model_opts)
@click.option("--trust-code", is_flag=True, help="Allow rebuilding a model by the import path its file records.")
@_with(_data_opts)
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1, 256),
              show_default=True, help="Batch sizes for latency (repeatable).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Fix torch's thread count.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def eval_cmd(model_file: Path, model_spec: str | None, model_args: tuple[str, ...], trust_code: bool,
             data_name: str | None, data_dir: Path | None, seed: int, batches: tuple[int, ...],
             threads: int | None, as_json: bool) -> None:
    """Accuracy (or perplexity), file bytes, nonzeros, FLOPs and latency ratio of a .nsz or .safetensors model."""
    import json

    from .changes import arch_of
    from .compress import read_input
    from .report import layers_table, summarize, summary_table

    model, meta = read_input(model_file, model_spec, _model_args(model_args), trust_code=trust_code,
                             keep_codecs=False)
    data_name, data, _ = _load_data(data_name, data_dir, seed, meta.get("data"), meta=meta, trust_code=trust_code)
    shape = tuple((arch_of(model) or {}).get("input_shape", data.input_shape))
    if shape != data.input_shape:
        raise _Fail(f"{model_file} expects inputs {list(shape)} but {data_name} has {list(data.input_shape)}.")
    _check_input_shape(model, data, str(model_file))
    s = summarize(model, data.input_shape, data=data, file_path=model_file, batches=batches, threads=threads)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        _echo_table(summary_table({model_file.name: s}, title=f"{model_file} on {data_name} (test split)"))
        _echo_table(layers_table(model, title="nonzeros per tensor"))


def _batch_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise _Fail(f"--batch takes positive integers separated by commas, e.g. 1,256; got {value!r}.")
    return out


@cli.command("bench-latency")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", "batch", default="1,256", show_default=True, metavar="B[,B...]",
              help="Batch sizes, comma-separated.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch, numba and onnxruntime threads.")
@click.option("--repeats", type=click.IntRange(min=5), default=100, show_default=True)
@click.option("--no-onnx", is_flag=True, help="Skip the onnxruntime columns.")
@click.option("--trust-code", is_flag=True, help="Allow rebuilding a model by the import path its file records.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly
def bench_latency_cmd(model_file: Path, batch: str, threads: int, repeats: int, no_onnx: bool, trust_code: bool,
                      as_json: bool) -> None:
    """Latency of a .nsz file: netsurgeon's runtime vs the dense model, torch CSR and onnxruntime, in one
    process (same threads, interleaved, medians), with the FLOP-ratio bound and the resident weight bytes."""
    import json

    from .latency import latency_report, report_lines

    batches = _batch_list(batch)
    if model_file.suffix != ".nsz":
        raise _Fail(f"bench-latency reads a .nsz file; got {str(model_file)!r}.")
    r = latency_report(model_file, batches, threads=threads, repeats=repeats, trust_code=trust_code,
                       onnx=not no_onnx)
    click.echo(json.dumps(r, indent=2) if as_json else "\n".join(report_lines(r)))


@cli.command("export")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .onnx file to write.")
@click.option("--dense", is_flag=True, help="Write every weight dense (torch.onnx.export's file as is).")
@click.option("--trust-code", is_flag=True, help="Allow rebuilding a model by the import path its file records.")
@_friendly
def export_cmd(model_file: Path, output: Path, dense: bool, trust_code: bool) -> None:
    """Export a .nsz file to ONNX: int8 as QDQ, k-means as uint8 codes + Gather, pruned weights as positions +
    values; onnxruntime then checks it against PyTorch."""
    from .export import export_onnx, require_onnx

    if model_file.suffix != ".nsz":
        raise _Fail(f"export reads a .nsz file; got {str(model_file)!r}.")
    if output.suffix != ".onnx":
        raise _Fail(f"export writes a .onnx file; got -o {str(output)!r}.")
    _check_output(output, model_file)
    try:
        require_onnx()
    except ImportError as e:
        raise _Fail(str(e)) from None
    info = export_onnx(model_file, output, trust_code=trust_code, compact=not dense)
    click.echo(f"wrote {output}: {info.file_bytes:,} bytes (dense ONNX: {info.dense_onnx_bytes:,}; "
               f".nsz: {model_file.stat().st_size:,}); onnxruntime vs PyTorch: max |logit diff| "
               f"{info.max_abs_logit_diff:.1e}")
    for name, form in info.compact.items():
        click.echo(f"  {name}: {form}")


@cli.command("info")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@_friendly
def info_cmd(model_file: Path) -> None:
    """Per-layer table of a .nsz file: shape, kept %, index bits, value bits, bytes."""
    from .nsz import read_header
    from .report import file_table

    info = read_header(model_file)  # validated, never decoded
    _echo_table(file_table(info))
    meta = dict(info.header.get("meta") or {})
    runs = meta.pop("pipeline", None)
    if meta or runs:
        for line in _fields_text({"arch": info.header.get("arch"), **meta}):
            click.echo(line)
    for i, run in enumerate(runs if isinstance(runs, list) else [], 1):
        click.echo(f"stage {i}: {_changed_options(run) if isinstance(run, dict) else str(run)[:80]}")
        skipped = run.get("skipped") if isinstance(run, dict) else None
        if isinstance(skipped, dict) and skipped:
            for layer, why in list(skipped.items())[:20]:
                click.echo(f"  left as it was: {str(layer)[:60]} ({str(why)[:100]})")


def _fields_text(fields: dict[str, Any], width: int = 100) -> list[str]:
    """``key: value`` lines, nested mappings as ``k=v`` lists, wrapped to ``width`` columns."""
    import textwrap

    out = []
    for key, value in fields.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.6g}"
        out += textwrap.wrap(f"{key}: {value}", width, subsequent_indent="    ") or [f"{key}:"]
    return out


def _changed_options(run: dict[str, Any]) -> str:
    """``method (key=value, ...)`` with only the options that differ from the method's defaults."""
    from .pipeline import get_method

    name, config = str(run.get("method"))[:40], run.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    try:
        default = get_method(name).config().to_dict()
    except ValueError:
        default = {}
    opts = ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if default.get(k, object()) != v)
    return name + (f" ({opts})" if opts else "")


@cli.command("demo")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("netsurgeon-demo"),
              show_default=True, help="Directory for the demo's files.")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.95, show_default=True)
@_threads_opt
@_friendly
def demo_cmd(output: Path, sparsity: float, threads: int | None) -> None:
    """Train, prune, write .nsz, reload and evaluate on the bundled digits (no files needed)."""
    from .demo import run_demo
    from .report import summary_table

    _set_threads(threads)
    r = run_demo(output, sparsity=sparsity, progress=True)
    _echo_table(summary_table({"dense": r["before"], "pruned .nsz": r["after"]},
                              title="LeNet-300-100 on bundled digits: before / after"))
    kept = ", ".join(f"{k} {v:.1f}%" for k, v in r["kept_pct"].items())
    click.echo(f"kept per layer: {kept}")
    click.echo(f"files: {', '.join(r['files'].values())}, {r['summary']}  ({r['wall_s']:.1f} s)")


def main() -> None:
    # a model factory named on the command line (--model mynets:factory, --data pkg:fn) is importable from the
    # working directory, as with ``python -m``
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    cli(prog_name="netsurgeon")


if __name__ == "__main__":
    main()
