"""The reference models of the papers, built by name.

| name        | layers                                                        | params (28x28 input) |
| ----------- | ------------------------------------------------------------- | -------------------- |
| lenet300    | LeNet-300-100: fc 300, fc 100, fc 10 (ReLU)                    | 266,610              |
| lenet5      | Caffe LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 | 431,080          |
| mlpnet      | WoodFisher's MNIST MLP 784-40-20-10, no bias (ReLU)            | 32,360               |
| digits_cnn  | small CNN for 8x8 digits: conv 16@3x3, pool, conv 32@3x3, pool, fc 64, fc 10 | 13,706 (8x8) |
| resnet_small| CIFAR-style ResNet (He et al. 2016): 3 stages of basic blocks, BatchNorm, residual | 77,754 (3x32) |
| vgg_small   | two stages of 2 x (3x3 conv, BN, ReLU) + pool, fc 128, fc 10                  | 79,498 (width 16) |
| mlp_bn      | BinaryConnect/BNN MLP: widths x (fc, BN, ReLU or HardTanh), fc 10, BN         | 10.0M (3 x 2048) |
| lenet5_bn   | LeNet-5 in XNOR-Net's block order (BN before each binary layer)               | 433,760          |
| mlp_dropout | HashedNets' MLP: dropout on the input and after every hidden ReLU              | 795,010 (1 x 1000) |

Any other model is built from an import path, ``build_model("pkg.module:factory", **kwargs)``; the path and
the keyword arguments are recorded so a saved file can rebuild it (see :func:`rebuild`).

Caffe's LeNet-5 (``examples/mnist/lenet_train_test.prototxt``), which DNS and Deep Compression use,
has a ReLU only after ip1; we keep that.
"""

from __future__ import annotations

import importlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["build_model", "MODELS", "count_params", "arch_of", "record_arch", "rebuild", "rebuild_matching",
           "resnet_small", "UntrustedCodeError", "record_resized", "resized_record", "apply_resized", "layer_sizes",
           "original_model", "mlp_bn", "lenet5_bn", "mlp_dropout", "record_binary_inputs", "record_hwgq_inputs",
           "record_factorized", "apply_factorized", "record_activations"]

_ARCH_ATTR = "_netsurgeon_arch"


def _mlp(in_features: int, widths: list[int], num_classes: int, bias: bool = True) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    sizes = [in_features, *widths, num_classes]
    for i in range(len(sizes) - 1):
        layers.append((f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1], bias=bias)))
        if i < len(sizes) - 2:
            layers.append((f"relu{i + 1}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def lenet300(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998), the MLP of Han et al. 2015 Table 1 and DNS Table 1."""
    return _mlp(math.prod(input_shape), [300, 100], num_classes)


def mlpnet(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """784-40-20-10 MLP without biases, the MNIST model of WoodFisher (Singh & Alistarh 2020, Sec. 5)."""
    return _mlp(math.prod(input_shape), [40, 20], num_classes, bias=False)


def lenet5(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """Caffe's LeNet-5: conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, fc 500 + ReLU, fc 10."""
    c, h, w = _image_shape("lenet5", input_shape, min_side=16)
    side = lambda s: ((s - 4) // 2 - 4) // 2  # noqa: E731  two (5x5 valid conv, 2x2 pool) stages
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 20, 5)), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(50 * side(h) * side(w), 500)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(500, num_classes)),
    ]))


def digits_cnn(input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10) -> nn.Sequential:
    """A small CNN sized for scikit-learn's 8x8 digits (used by ``netsurgeon demo``)."""
    c, h, w = _image_shape("digits_cnn", input_shape, min_side=4)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 16, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * (h // 4) * (w // 4), 64)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]))


def vgg_small(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """A small VGG-style CNN (Simonyan & Zisserman 2015's pattern at MNIST scale): two stages of two 3x3
    conv + BatchNorm + ReLU and a 2x2 max-pool, widths ``width`` and ``2·width``, then fc 128 + ReLU, fc."""
    c, h, w = _image_shape("vgg_small", input_shape, min_side=4)
    layers: list[tuple[str, nn.Module]] = []
    c_in = c
    for i, c_out in enumerate([width, width, 2 * width, 2 * width], 1):
        layers += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)), (f"bn{i}", nn.BatchNorm2d(c_out)),
                   (f"relu{i}", nn.ReLU())]
        if i % 2 == 0:
            layers.append((f"pool{i // 2}", nn.MaxPool2d(2)))
        c_in = c_out
    layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(c_in * (h // 4) * (w // 4), 128)),
               ("relu5", nn.ReLU()), ("fc2", nn.Linear(128, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def mlp_bn(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
           widths: list[int] | tuple[int, ...] = (2048, 2048, 2048), act: str = "relu",
           eps: float = 1e-4) -> nn.Sequential:
    """The MNIST MLP of BinaryConnect (ReLU) and BNN (HardTanh, whose sign the next binary layer takes):
    each hidden layer fc → BatchNorm (ε 1e-4, as the authors' code) → activation, then fc → BatchNorm on the
    outputs (the "L2-SVM" output layer of both papers' code)."""
    if act not in ("relu", "hardtanh"):
        raise ValueError(f"mlp_bn: act must be 'relu' or 'hardtanh'; got {act!r}.")
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"mlp_bn: widths must be a non-empty list of sizes >= 1; got {widths!r}.")
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    sizes = [math.prod(input_shape), *map(int, widths), num_classes]
    for i in range(len(sizes) - 1):
        layers += [(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1])), (f"bn{i + 1}", nn.BatchNorm1d(sizes[i + 1], eps))]
        if i < len(sizes) - 2:
            layers.append((f"act{i + 1}", nn.ReLU() if act == "relu" else nn.Hardtanh()))
    return nn.Sequential(OrderedDict(layers))


def mlp_dropout(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                widths: list[int] | tuple[int, ...] = (1000,), dropout: float = 0.25,
                input_dropout: float | None = None) -> nn.Sequential:
    """The MNIST net of HashedNets' released code: dropout (drop probability ``dropout``) on the input and after
    each hidden fc + ReLU; the default is the "3-layer" net (one hidden layer of 1000 units). ``input_dropout``
    (default: ``dropout``) sets the input's own rate, e.g. Hinton et al. 2015's teacher: 2 x 1200, 0.5 hidden,
    0.2 input."""
    input_dropout = dropout if input_dropout is None else input_dropout
    for label, rate in (("dropout", dropout), ("input_dropout", input_dropout)):
        if not 0 <= rate < 1:
            raise ValueError(f"mlp_dropout: {label} must be in [0, 1); got {rate!r}.")
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"mlp_dropout: widths must be a non-empty list of sizes >= 1; got {widths!r}.")
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten()), ("drop0", nn.Dropout(input_dropout))]
    sizes = [math.prod(input_shape), *map(int, widths), num_classes]
    for i in range(len(sizes) - 1):
        layers.append((f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1])))
        if i < len(sizes) - 2:
            layers += [(f"relu{i + 1}", nn.ReLU()), (f"drop{i + 1}", nn.Dropout(dropout))]
    return nn.Sequential(OrderedDict(layers))


def lenet5_bn(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """Caffe's LeNet-5 sizes in XNOR-Net's block order (Sec. 3.2, Fig. 3: BN → BinActiv → BinConv → Pool):
    conv1 20@5x5 → BN → ReLU → pool; BN → conv2 50@5x5 → pool → ReLU; BN → fc1 500 → ReLU; BN → fc2.
    Trained in float it is the like-for-like baseline of the binary versions; the first and last layers stay
    real in XNOR-Net."""
    c, h, w = _image_shape("lenet5_bn", input_shape, min_side=16)
    side = lambda s: ((s - 4) // 2 - 4) // 2  # noqa: E731
    flat = 50 * side(h) * side(w)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 20, 5)), ("bn1", nn.BatchNorm2d(20)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("bn2", nn.BatchNorm2d(20)), ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()), ("bn3", nn.BatchNorm1d(flat)), ("fc1", nn.Linear(flat, 500)), ("relu3", nn.ReLU()),
        ("bn4", nn.BatchNorm1d(500)), ("fc2", nn.Linear(500, num_classes)),
    ]))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a residual add; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_small(input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, width: int = 16,
                 blocks: tuple[int, ...] | list[int] = (1, 1, 1)) -> nn.Module:
    """A CIFAR-style ResNet (He et al. 2016, Sec. 4.2) for 8x8 to 32x32 inputs: conv 3x3 + BN, then one stage
    per entry of ``blocks`` (widths ``width``·2^i, stride 2 from the second stage), global average pool, fc.

    Not a paper model: the test bed for "any user's model" (BatchNorm, residual adds, 1x1 shortcuts).
    """
    c, _, _ = _image_shape("resnet_small", input_shape, min_side=4)
    if width < 1 or not blocks or any(b < 1 for b in blocks):
        raise ValueError(f"resnet_small: need width >= 1 and blocks >= 1 per stage; got {width!r}, {blocks!r}.")
    layers: list[tuple[str, nn.Module]] = [("conv1", nn.Conv2d(c, width, 3, 1, 1, bias=False)),
                                           ("bn1", nn.BatchNorm2d(width)), ("relu", nn.ReLU())]
    c_in = width
    for i, n in enumerate(blocks):
        c_out = width * 2 ** i
        stage = [_BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
        layers.append((f"layer{i + 1}", nn.Sequential(*stage)))
        c_in = c_out
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c_in, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def _image_shape(owner: str, shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape[1:]) < min_side:
        raise ValueError(f"{owner}: input_shape must be (C, H, W) with H, W >= {min_side}; got {shape!r}.")
    return int(shape[0]), int(shape[1]), int(shape[2])


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300, "lenet5": lenet5, "mlpnet": mlpnet, "digits_cnn": digits_cnn, "resnet_small": resnet_small,
    "vgg_small": vgg_small, "mlp_bn": mlp_bn, "lenet5_bn": lenet5_bn,
    "mlp_dropout": mlp_dropout,
}


class UntrustedCodeError(ValueError):
    """A file asks to run code outside netsurgeon (a user's model factory) and the caller did not allow it."""


def _load_factory(path: str) -> Callable[..., nn.Module]:
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"model import path must look like 'package.module:factory'; got {path!r}.")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} of model factory {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (model factory {path!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model factory {path!r} is not callable.")
    return obj


def build_model(name: str, input_shape: tuple[int, ...] | None = None, num_classes: int = 10,
                **kwargs: Any) -> nn.Module:
    """Build a model by name, for inputs of ``input_shape`` (C, H, W), and record how to rebuild it.

    ``name`` is one of :data:`MODELS` (``input_shape`` defaults to 1x28x28, or 1x8x8 for digits_cnn) or an
    import path ``"package.module:factory"``, called as ``factory(**kwargs)`` (``input_shape`` is then only
    recorded). Weights are initialized from torch's global generator: seed it first (``torch.manual_seed``)
    for reproducible runs; the CLI does.

    Raises:
        ValueError: unknown name, unimportable path, kwargs that are not JSON-serializable, or a factory that
            does not return an ``nn.Module``.
    """
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ValueError(f"build_model: keyword arguments of {name!r} must be JSON-serializable (numbers, "
                         f"strings, lists, dicts) so a file can rebuild the model; got {kwargs!r}.") from e
    if ":" in name:
        model = _load_factory(name)(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module.")
        record_arch(model, name, kwargs, input_shape)
        return model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or give an import path "
                         "'package.module:factory'.")
    shape = tuple(input_shape) if input_shape is not None else ((1, 8, 8) if name == "digits_cnn" else (1, 28, 28))
    model = MODELS[name](shape, num_classes, **kwargs)
    arch: dict[str, Any] = {"name": name, "input_shape": list(shape), "num_classes": num_classes}
    if kwargs:
        arch["kwargs"] = kwargs
    object.__setattr__(model, _ARCH_ATTR, arch)  # not part of state_dict
    return model


def record_arch(model: nn.Module, factory: str, kwargs: dict[str, Any] | None = None,
                input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Record on ``model`` that ``factory(**kwargs)`` rebuilds it (for a model the user built directly)."""
    arch: dict[str, Any] = {"factory": factory, "kwargs": dict(kwargs or {})}
    if input_shape is not None:
        arch["input_shape"] = list(input_shape)
    object.__setattr__(model, _ARCH_ATTR, arch)
    return model


def rebuild(arch: dict[str, Any], *, trust_code: bool = False, source: str = "file") -> nn.Module:
    """Build the (untrained) model an ``arch`` record describes.

    A user's factory (``{"factory": "pkg.mod:fn", "kwargs": ...}``) means importing and calling code named
    by the file; that runs only with ``trust_code=True`` (a file from elsewhere could name any function).
    netsurgeon's own models never need it.

    Raises:
        UntrustedCodeError: a user's factory without ``trust_code``.
        ValueError: a malformed record, or a factory that fails.
    """
    if not isinstance(arch, dict):
        raise ValueError(f"{source}: the architecture record is malformed ({arch!r}).")
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{source}: the architecture's kwargs are malformed ({kwargs!r}).")
    model = _rebuild_base(arch, trust_code=trust_code, source=source)
    if apply_arch_changes(model, arch, source):
        object.__setattr__(model, _ARCH_ATTR, dict(arch))
    return model


def _rebuild_base(arch: dict[str, Any], *, trust_code: bool, source: str) -> nn.Module:
    kwargs = arch.get("kwargs") or {}
    if "factory" in arch:
        factory = arch["factory"]
        if not isinstance(factory, str):
            raise ValueError(f"{source}: the architecture's factory is malformed ({factory!r}).")
        if not (factory.startswith("netsurgeon.") or trust_code):
            raise UntrustedCodeError(
                f"{source}: the model is rebuilt by calling {factory!r} with {kwargs!r}, code outside netsurgeon; "
                "pass trust_code=True (CLI: --trust-code) if you trust this file, or pass the model to fill.")
        return build_model(factory, arch.get("input_shape"), **kwargs)
    name, shape, classes = arch.get("name"), arch.get("input_shape"), arch.get("num_classes", 10)
    if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(classes, int):
        raise ValueError(f"{source}: the architecture record is malformed ({arch!r}).")
    return build_model(name, tuple(shape), classes, **kwargs)


def rebuild_matching(arch: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, trust_code: bool = False,
                     source: str = "file") -> nn.Module:
    """:func:`rebuild` ``arch``, but only if its state_dict has exactly the tensor names and ``shapes`` a file
    declares: the architecture is first built on torch's ``meta`` device (no memory), so a record that would
    build a huge model, or one that does not match the file, is refused before anything is allocated.

    Raises:
        UntrustedCodeError: a user's factory without ``trust_code``.
        ValueError: the record cannot be built, or its tensors differ from ``shapes`` (names them).
    """
    try:
        with torch.device("meta"):
            probe = rebuild(arch, trust_code=trust_code, source=source)
    except UntrustedCodeError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError, AttributeError) as e:
        raise ValueError(f"{source}: cannot rebuild the recorded architecture: {' '.join(str(e).split())[:200]}") from e
    own = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if own != shapes:
        missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
        wrong = sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])
        detail = (f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else
                  f"tensor {wrong[0]!r} is {list(shapes[wrong[0]])} in the file but {list(own[wrong[0]])} in the "
                  "recorded architecture")
        raise ValueError(f"{source}: the file's tensors do not match its recorded architecture: {detail}.")
    return rebuild(arch, trust_code=trust_code, source=source)


def apply_arch_changes(model: nn.Module, arch: dict[str, Any], source: str = "file") -> bool:
    """Apply what a record says changed since the architecture was built, in place: ``resized`` layers
    (structured pruning), ``factorized`` Linear layers (low rank), ``binary_inputs`` (binary networks).
    Returns whether there was anything; raises ValueError naming a layer that does not fit."""
    if arch.get("resized"):
        apply_resized(model, arch["resized"], source)
    if arch.get("factorized"):
        apply_factorized(model, arch["factorized"], source)
    if arch.get("binary_inputs"):
        from .quantization.binary import apply_binary_inputs

        apply_binary_inputs(model, arch["binary_inputs"], source)
    if arch.get("hwgq_inputs"):
        from .quantization.hwgq import apply_hwgq_inputs

        apply_hwgq_inputs(model, arch["hwgq_inputs"], source)
    if arch.get("activations"):
        from .quantization.binary import apply_activations

        apply_activations(model, arch["activations"], source)
    return bool(arch.get("resized") or arch.get("factorized") or arch.get("binary_inputs") or arch.get("hwgq_inputs")
                or arch.get("activations"))


def record_resized(model: nn.Module, resized: dict[str, dict[str, int]]) -> None:
    """Record on ``model`` the layer sizes that differ from its architecture as built (structured pruning),
    merged with any recorded before, so a ``.nsz`` file rebuilds the smaller model."""
    arch = arch_of(model) or {}  # a model without a record still records its sizes: a file can resize the
    merged = {k: dict(v) for k, v in (arch.get("resized") or {}).items()}  # model the user passes to fill
    for name, sizes in resized.items():
        merged.setdefault(name, {}).update(sizes)
    object.__setattr__(model, _ARCH_ATTR, {**arch, "resized": merged})


def record_hwgq_inputs(model: nn.Module, inputs: dict[str, int]) -> None:
    """Record the layers whose input is HWGQ-quantized and their bits, so a ``.nsz`` file rebuilds the quantizers."""
    arch = arch_of(model) or {}
    object.__setattr__(model, _ARCH_ATTR, {**arch, "hwgq_inputs": {**(arch.get("hwgq_inputs") or {}), **inputs}})


def record_binary_inputs(model: nn.Module, inputs: dict[str, str]) -> None:
    """Record on ``model`` which layers binarize their input ({layer: "sign" | "scaled"}), so a ``.nsz`` file
    rebuilds them (a model without a record still records them, for the model the user passes to fill)."""
    arch = arch_of(model) or {}
    object.__setattr__(model, _ARCH_ATTR, {**arch, "binary_inputs": {**(arch.get("binary_inputs") or {}), **inputs}})


def record_activations(model: nn.Module, replaced: dict[str, str]) -> None:
    """Record the activation modules replaced ({name: "hardtanh"}: a ReLU feeding a binarized input), so a
    ``.nsz`` file rebuilds them."""
    arch = arch_of(model) or {}
    object.__setattr__(model, _ARCH_ATTR, {**arch, "activations": {**(arch.get("activations") or {}), **replaced}})


def record_factorized(model: nn.Module, ranks: dict[str, Any]) -> None:
    """Record on ``model`` the layers replaced by low-rank factors ({layer: rank} for a Linear pair,
    {layer: {"kind", "rank"}} for a convolution), merged with any recorded before, so a ``.nsz`` file rebuilds
    them."""
    arch = arch_of(model) or {}
    object.__setattr__(model, _ARCH_ATTR, {**arch, "factorized": {**(arch.get("factorized") or {}), **ranks}})


def apply_factorized(model: nn.Module, ranks: dict[str, Any], source: str = "file") -> nn.Module:
    """Replace each layer named in ``ranks`` by the empty factor layers its entry describes (see
    :func:`record_factorized`); a layer already replaced (an ``nn.Sequential``) is left for the weights to check.
    Raises ValueError naming a misfit."""
    from .lowrank import factor_structure

    for name, spec in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: factorized layer {name!r} is not in the model.") from None
        if isinstance(old, nn.Sequential):
            continue
        try:
            new = factor_structure(old, spec)
        except ValueError as e:
            raise ValueError(f"{source}: factorized layer {name!r}: {e}") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def original_model(arch: dict[str, Any] | None, *, trust_code: bool = False, device: str = "meta") -> nn.Module | None:
    """The architecture a structured-pruned or factorized record was made from (its ``resized`` layers at their
    built sizes, its ``factorized`` layers whole), on ``device`` ("meta": no memory); None when the record has
    neither or cannot be rebuilt."""
    if not arch or not (arch.get("resized") or arch.get("factorized")) or ("name" not in arch
                                                                           and "factory" not in arch):
        return None
    base = {k: v for k, v in arch.items() if k not in ("resized", "binary_inputs", "factorized", "hwgq_inputs")}
    with torch.device(device):
        return rebuild(base, trust_code=trust_code)


def arch_of(model: nn.Module) -> dict | None:
    """How to rebuild ``model`` (what :func:`build_model` or :func:`record_arch` recorded), or None."""
    return getattr(model, _ARCH_ATTR, None)


def count_params(model: nn.Module) -> int:
    """Number of parameters (dense count, zeros included)."""
    return sum(p.numel() for p in model.parameters())


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The size fields of every Linear, Conv1d/2d and BatchNorm layer, by name."""
    out = {}
    for name, m in model.named_modules():
        keys = ("in_features", "out_features") if isinstance(m, nn.Linear) else \
            ("in_channels", "out_channels", "groups") if isinstance(m, (nn.Conv1d, nn.Conv2d)) else \
            ("num_features",) if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) else ()
        if keys:
            out[name] = {k: int(getattr(m, k)) for k in keys}
    return out


def resized_record(model: nn.Module, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The layers of ``model`` whose sizes differ from ``before`` (:func:`layer_sizes` of the architecture as
    built), with their new sizes: what a ``.nsz`` file records so the smaller model is rebuilt without pickle."""
    out = {}
    for name, sizes in layer_sizes(model).items():
        diff = {k: v for k, v in sizes.items() if before.get(name, {}).get(k, v) != v}
        if diff:
            out[name] = diff
    return out


def apply_resized(model: nn.Module, resized: dict[str, dict[str, int]], source: str = "file") -> nn.Module:
    """Rebuild the layers named in ``resized`` (see :func:`resized_record`) at their recorded sizes (fresh
    weights, same device as the model's); raises ValueError naming a layer or field that does not fit."""
    for name, sizes in resized.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: resized layer {name!r} is not in the model.") from None
        p = next(old.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        if isinstance(old, nn.Linear) and set(sizes) <= {"in_features", "out_features"}:
            new: nn.Module = nn.Linear(sizes.get("in_features", old.in_features),
                                       sizes.get("out_features", old.out_features), bias=old.bias is not None,
                                       device=dev)
        elif isinstance(old, (nn.Conv1d, nn.Conv2d)) and set(sizes) <= {"in_channels", "out_channels", "groups"}:
            new = type(old)(sizes.get("in_channels", old.in_channels), sizes.get("out_channels", old.out_channels),
                            old.kernel_size, old.stride, old.padding, old.dilation, sizes.get("groups", old.groups),
                            old.bias is not None, old.padding_mode, device=dev)
        elif isinstance(old, (nn.BatchNorm1d, nn.BatchNorm2d)) and set(sizes) <= {"num_features"}:
            new = type(old)(sizes["num_features"], old.eps, old.momentum, old.affine, old.track_running_stats,
                            device=dev)
        else:
            raise ValueError(f"{source}: cannot resize layer {name!r} ({type(old).__name__}) with {sizes}.")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model
