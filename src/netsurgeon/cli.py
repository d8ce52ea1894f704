"""The ``netsurgeon`` command line: parse, call one library function, print. No compression logic here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml

from . import __version__
from .data import DATASETS, load_dataset
from .models import MODELS, build_model

log = logging.getLogger("netsurgeon")


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


_data_opts = [
    click.option("--data", "data_name", type=click.Choice(DATASETS), default="digits", show_default=True,
                 help="Data set; mnist/fashion-mnist read IDX .gz files from --data-dir."),
    click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Directory with the IDX .gz files."),
    click.option("--seed", type=int, default=0, show_default=True),
]


def _with(opts: list[Callable[..., Any]]) -> Callable[..., Any]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


@cli.command("train")
@click.option("--model", "model_name", type=click.Choice(list(MODELS)), required=True)
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
@_friendly
def train_cmd(model_name: str, data_name: str, data_dir: Path | None, seed: int, output: Path, epochs: int,
              batch_size: int, optimizer: str, lr: float, weight_decay: float, schedule: str,
              checkpoint: Path | None, checkpoint_every: int, resume: bool) -> None:
    """Train a model from scratch and save it as .safetensors."""
    from .modelfile import save_model
    from .train import TrainConfig, evaluate, train

    if resume and checkpoint is None:
        raise click.BadParameter("--resume needs --checkpoint FILE.", param_hint="--resume")
    data = load_dataset(data_name, data_dir, seed=seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, schedule=schedule, seed=seed)
    train(model, data, cfg, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
          progress=True)
    _, acc = evaluate(model, data.test)
    save_model(model, output, meta={"data": data_name, "test_accuracy": acc, "train": cfg.__dict__})
    click.echo(f"{model_name} on {data_name}: test accuracy {100 * acc:.2f}% -> {output}")


@cli.command("compress")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["magnitude", "dns", "autoprune", "woodfisher", "woodtaylor", "obd",
                                            "diag_fisher", "obs", "none"]), default="magnitude", show_default=True,
              help="magnitude: Han 2015; dns: Guo 2016; autoprune: Xiao 2019 (--mu); woodfisher..obs: one-shot "
                   "second-order (global --sparsity); none: keep the input's zeros (e.g. with --share-bits).")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML recipe (overrides the method options).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to remove, in [0, 1).")
@click.option("--quality", type=float, default=None, help="Han's rule: remove |w| < quality x std(layer).")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retraining epochs per round (needs data; 0 = prune only).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="magnitude: original LR (retraining uses lr/10); dns: the surgery run's LR.")
@click.option("--c-rate", type=float, default=3.0, show_default=True, help="dns: crate c (larger prunes more).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="dns, autoprune: training epochs.")
@click.option("--iter-stop", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="dns: no mask updates after this many steps.")
@click.option("--gamma", type=click.FloatRange(min=0), default=1e-3, show_default=True,
              help="dns: update probability (1 + gamma*i)^-power.")
@click.option("--mu", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="autoprune: strength of the regularizer on the auxiliary parameters.")
@click.option("--num-grads", type=click.IntRange(min=1), default=1000, show_default=True,
              help="second-order: gradients for the Fisher.")
@click.option("--block-size", type=click.IntRange(min=0), default=2000, show_default=True,
              help="second-order: Fisher block size (0 = one full inverse).")
@click.option("--damp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="second-order: dampening lambda (default 1e-5; 0.1 for woodtaylor).")
@_with(_data_opts)
@click.option("--value-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--index-bits", default="auto", show_default=True, help="Relative-index width 1..16, or auto.")
@click.option("--share-bits", default=None, help="k-means weight sharing after pruning: 'conv=8,fc=5' or one int "
              "(Deep Compression); Huffman-coded in the file.")
@click.option("--centroid-epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="Centroid fine-tuning epochs after sharing (needs data).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@_friendly
def compress_cmd(model_file: Path, method: str, recipe: Path | None, sparsity: float | None,
                 quality: float | None, scope: str, rounds: int, finetune_epochs: int, lr: float,
                 c_rate: float, epochs: int, iter_stop: int, gamma: float, mu: float, num_grads: int, block_size: int,
                 damp: float | None, data_name: str,
                 data_dir: Path | None, seed: int, value_dtype: str, index_bits: str, share_bits: str | None,
                 centroid_epochs: int, output: Path) -> None:
    """Prune (magnitude, DNS or second-order) and optionally k-means-share a model; write a .nsz file.

    MODEL_FILE is a .safetensors from `train` or a .nsz (e.g. an already pruned model)."""
    from .coding.nsz import save_compressed
    from .modelfile import load_model
    from .recipes import SECOND_ORDER, Recipe, apply_recipe, load_recipe
    from .train import evaluate

    if recipe is not None:
        rec = load_recipe(recipe)
    elif method == "dns":
        rec = Recipe(method="dns", finetune={"epochs": epochs, "lr": lr, "seed": seed},
                     dns={"c_rate": c_rate, "iter_stop": iter_stop, "gamma": gamma, "seed": seed},
                     save={"value_dtype": value_dtype, "index_bits": index_bits})
    elif method == "autoprune":
        rec = Recipe(method="autoprune", finetune={"epochs": epochs, "lr": lr, "seed": seed},
                     autoprune={"mu": mu, "seed": seed}, save={"value_dtype": value_dtype, "index_bits": index_bits})
    elif method == "none":
        rec = Recipe(method="none", save={"value_dtype": value_dtype, "index_bits": index_bits})
    elif method in SECOND_ORDER:
        if sparsity is None:
            raise click.UsageError(f"--method {method} needs --sparsity (one global fraction).")
        fisher = {"num_grads": num_grads, "block_size": block_size or None, "seed": seed}
        if damp is not None:
            fisher["damp"] = damp
        elif method == "woodtaylor":
            fisher["damp"] = 0.1
        rec = Recipe(method=method, sparsity=sparsity, fisher=fisher,
                     finetune={"epochs": finetune_epochs, "lr": lr, "seed": seed} if finetune_epochs else {},
                     save={"value_dtype": value_dtype, "index_bits": index_bits})
    else:
        if sparsity is None and quality is None:
            raise click.UsageError("give --sparsity, --quality or --recipe.")
        rec = Recipe(method=method, sparsity=sparsity, quality=quality, scope=scope, rounds=rounds,
                     finetune={"epochs": max(finetune_epochs, 1), "lr": lr, "seed": seed},
                     save={"value_dtype": value_dtype, "index_bits": index_bits})
        if finetune_epochs == 0:
            rec = Recipe(**{**rec.__dict__, "rounds": 1})
    if share_bits:
        rec = Recipe(**{**rec.__dict__, "quantize": {"bits": _parse_bits(share_bits), "epochs": centroid_epochs}})
    bits = rec.save.get("index_bits", "auto")
    bits = int(bits) if str(bits).isdigit() else bits
    if model_file.suffix == ".nsz":
        from .coding.nsz import read_compressed
        from .runtime import load_compressed

        model, meta = load_compressed(model_file), read_compressed(model_file)[0].header.get("meta") or {}
    else:
        model, meta = load_model(model_file)
    use_data = (recipe is not None or finetune_epochs > 0 or rec.method in ("dns", "autoprune")
                or rec.method in SECOND_ORDER
                or (bool(rec.quantize) and rec.quantize.get("epochs", 0) > 0))
    data = load_dataset(data_name, data_dir, seed=seed) if use_data else None
    apply_recipe(model, data, rec, progress=True)
    acc = evaluate(model, data.test)[1] if data is not None else None
    info = save_compressed(model, output, value_dtype=rec.save.get("value_dtype", "float32"), index_bits=bits,
                           meta={**meta, "method": rec.method, "test_accuracy": acc})
    msg = f"{output}: {info.file_bytes:,} bytes ({info.compression:.2f}x smaller than dense float32)"
    click.echo(msg + (f", test accuracy {100 * acc:.2f}%" if acc is not None else ""))


def _parse_bits(text: str) -> int | dict[str, int]:
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError as e:
        raise click.BadParameter(f"expected an int or 'conv=8,fc=5'; got {text!r}.", param_hint="--share-bits") from e


@cli.command("eval")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@_with(_data_opts)
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1, 256),
              show_default=True, help="Batch sizes for latency (repeatable).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Fix torch's thread count.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def eval_cmd(model_file: Path, data_name: str, data_dir: Path | None, seed: int, batches: tuple[int, ...],
             threads: int | None, as_json: bool) -> None:
    """Accuracy, file bytes, nonzeros, FLOPs and latency ratio of a .nsz or .safetensors model."""
    import json

    from .modelfile import load_any
    from .models import arch_of
    from .report import layers_table, summarize, summary_table

    model = load_any(model_file)
    data = load_dataset(data_name, data_dir, seed=seed)
    shape = tuple((arch_of(model) or {}).get("input_shape", data.input_shape))
    if shape != data.input_shape:
        raise _Fail(f"{model_file} expects inputs {list(shape)} but {data_name} has {list(data.input_shape)}.")
    s = summarize(model, data.input_shape, data=data, file_path=model_file, batches=batches, threads=threads)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        _echo_table(summary_table({model_file.name: s}, title=f"{model_file} on {data_name} (test split)"))
        _echo_table(layers_table(model, title="nonzeros per tensor"))


@cli.command("info")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@_friendly
def info_cmd(model_file: Path) -> None:
    """Per-layer table of a .nsz file: shape, kept %, index bits, value bits, bytes."""
    from .coding.nsz import read_compressed
    from .report import file_table

    info, _ = read_compressed(model_file)
    _echo_table(file_table(info))
    meta = info.header.get("meta") or {}
    if meta:
        click.echo(yaml.safe_dump({"arch": info.header.get("arch"), "meta": meta}, sort_keys=False).rstrip())


@cli.command("demo")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("netsurgeon-demo"),
              show_default=True, help="Directory for the demo's files.")
@click.option("--sparsity", type=float, default=0.95, show_default=True)
@_friendly
def demo_cmd(output: Path, sparsity: float) -> None:
    """Train, prune, write .nsz, reload and evaluate on the bundled digits (no files needed)."""
    from .demo import run_demo
    from .report import summary_table

    r = run_demo(output, sparsity=sparsity, progress=True)
    _echo_table(summary_table({"dense": r["before"], "pruned .nsz": r["after"]},
                              title="LeNet-300-100 on bundled digits: before / after"))
    kept = ", ".join(f"{k} {v:.1f}%" for k, v in r["kept_pct"].items())
    click.echo(f"kept per layer: {kept}")
    click.echo(f"files: {', '.join(r['files'].values())}, summary.json  ({r['wall_s']:.1f} s)")


def main() -> None:
    cli(prog_name="netsurgeon")


if __name__ == "__main__":
    main()
