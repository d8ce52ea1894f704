"""The reference models of the papers, built by name.

| name        | layers                                                        | params (28x28 input) |
| ----------- | ------------------------------------------------------------- | -------------------- |
| lenet300    | LeNet-300-100: fc 300, fc 100, fc 10 (ReLU)                    | 266,610              |
| lenet5      | Caffe LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 | 431,080          |
| mlpnet      | WoodFisher's MNIST MLP 784-40-20-10, no bias (ReLU)            | 32,360               |
| digits_cnn  | small CNN for 8x8 digits: conv 16@3x3, pool, conv 32@3x3, pool, fc 64, fc 10 | 13,706 (8x8) |

Caffe's LeNet-5 (``examples/mnist/lenet_train_test.prototxt``), which DNS and Deep Compression use,
has a ReLU only after ip1; we keep that.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

__all__ = ["build_model", "MODELS", "count_params", "arch_of"]

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


def _image_shape(owner: str, shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape[1:]) < min_side:
        raise ValueError(f"{owner}: input_shape must be (C, H, W) with H, W >= {min_side}; got {shape!r}.")
    return int(shape[0]), int(shape[1]), int(shape[2])


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300, "lenet5": lenet5, "mlpnet": mlpnet, "digits_cnn": digits_cnn,
}


def build_model(name: str, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Build a model by name for inputs of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    model = MODELS[name](tuple(input_shape), num_classes)
    # Recorded so a saved file can rebuild the model; not part of state_dict.
    object.__setattr__(model, _ARCH_ATTR, {"name": name, "input_shape": list(input_shape),
                                           "num_classes": num_classes})
    return model


def arch_of(model: nn.Module) -> dict | None:
    """The ``{"name", "input_shape", "num_classes"}`` that :func:`build_model` recorded, or None."""
    return getattr(model, _ARCH_ATTR, None)


def count_params(model: nn.Module) -> int:
    """Number of parameters (dense count, zeros included)."""
    return sum(p.numel() for p in model.parameters())
