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
| gpt         | byte-level GPT: 4 x (LN, causal MHA, LN, MLP 4x), LN, untied Linear head       | 3,323,648 (T=128) |
| resnet18    | ResNet-18, torchvision's layout and names (He et al. 2016, Table 1)          | 11,689,512 (1000) |
| mobilenetv2 | MobileNetV2, torchvision's layout and names (Sandler et al. 2018, Table 2)   | 3,504,872 (1000) |
| gpt2_ffn    | GPT-2-small's feed-forward sub-block: fc 768 -> 3072, GELU, fc 3072 -> 768     | 4,722,432        |
| gpt2_decoder| ``gpt`` at GPT-2-small's width (768, 12 heads), 2 layers, byte vocabulary | 14,669,056 (T=128) |

The image zoo defaults to 1x28x28 inputs and 10 classes; ``resnet18`` and ``mobilenetv2`` to 3x224x224 and 1000,
``gpt2_ffn`` to 768 features in and out, ``gpt2_decoder`` to 128 tokens of a 256-byte vocabulary (see
``_DEFAULTS``). These four are real shapes for speed measurements (the runtime's benchmark, issue 38); nothing is
downloaded, and their weights are random until trained here.

Any other model is built from an import path, ``build_model("pkg.module:factory", **kwargs)``; the path and
the keyword arguments are recorded so a saved file can rebuild it (see :func:`rebuild`).

Caffe's LeNet-5 (``examples/mnist/lenet_train_test.prototxt``), which DNS and Deep Compression use,
has a ReLU only after ip1; we keep that.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .changes import arch_of, set_arch

__all__ = ["build_model", "MODELS", "count_params", "arch_of", "record_arch", "resnet_small", "mlp_bn", "lenet5_bn",
           "mlp_dropout", "Logits", "huggingface", "resnet18", "mobilenetv2", "gpt2_ffn", "gpt2_decoder"]


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


class _GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: h + attn(LN(h)) under a causal mask, then h + MLP(LN(h))."""

    def __init__(self, width: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, n_head, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("fc1", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("fc2", nn.Linear(4 * width, width)), ("drop", nn.Dropout(dropout))]))

    def forward(self, h: Tensor, causal: Tensor) -> Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=causal, need_weights=False, is_causal=True)[0]
        return h + self.mlp(self.ln2(h))


class GPT(nn.Module):
    """A decoder-only language model: token embedding + learned positions, ``n_layer`` pre-LN blocks, final
    LayerNorm, Linear head. Input (B, T) int64 token ids, T <= the context; output (B, T, vocab) logits of the
    next token at every position."""

    def __init__(self, vocab: int, context: int, n_layer: int, width: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(_GPTBlock(width, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)  # untied from ``tok``: an ordinary Linear layer for every method
        # GPT-2's initialisation (Radford et al. 2019, Sec. 2.3): N(0, 0.02), residual projections / sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2 or name == "pos":
                resid = name.endswith(("out_proj.weight", "fc2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if resid else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).triu(1)  # True: may not attend
        h = self.tok(idx) + self.pos[:t]  # (B, T, width)
        for block in self.blocks:
            h = block(h, causal)
        return self.head(self.ln_f(h))  # (B, T, vocab)


def gpt(input_shape: tuple[int, ...] = (128,), num_classes: int = 256, n_layer: int = 4, width: int = 256,
        n_head: int = 4, dropout: float = 0.0) -> GPT:
    """A small GPT (Radford et al. 2018/2019; layout of GPT-2, Sec. 2.3: LayerNorm before each sub-block and after
    the last) built from torch modules only: ``nn.Embedding`` tokens, a learned positional ``nn.Parameter``,
    ``n_layer`` blocks of LN + ``nn.MultiheadAttention(batch_first=True)`` with a causal mask + LN + MLP
    (Linear-GELU-Linear, 4x width), a final LN and an untied ``nn.Linear`` head, so every method sees an ordinary
    Linear output layer. ``input_shape`` is ``(context,)`` (token ids, int64); ``num_classes`` is the vocabulary
    (256: bytes). Defaults: 4 layers, width 256, 4 heads, 3,323,648 parameters at context 128."""
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise ValueError(f"gpt: input_shape must be (context,) of token ids; got {tuple(input_shape)!r}.")
    for label, v in (("num_classes", num_classes), ("n_layer", n_layer), ("width", width), ("n_head", n_head)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"gpt: {label} must be a positive integer; got {v!r}.")
    if width % n_head:
        raise ValueError(f"gpt: width must be a multiple of n_head; got width={width!r}, n_head={n_head!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"gpt: dropout must be in [0, 1); got {dropout!r}.")
    return GPT(num_classes, int(input_shape[0]), n_layer, width, n_head, dropout)


class _TVBasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv 3x3 + BN + ReLU, conv 3x3 + BN, plus the input (through ``downsample``,
    a 1x1 conv + BN, where the shape changes), ReLU. Attribute names follow torchvision's, so its state dicts
    load."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def resnet18(input_shape: tuple[int, ...] = (3, 224, 224), num_classes: int = 1000, width: int = 64) -> nn.Sequential:
    """ResNet-18 (He et al. 2016, Table 1, "18-layer"): conv 7x7/2 + BN + ReLU, max-pool 3x3/2, four stages of two
    basic blocks (widths ``width``·1/2/4/8, stride 2 from the second stage, 1x1 projection shortcuts), global
    average pool, fc. torchvision's layout and parameter names (``conv1``, ``layer1.0.conv1``,
    ``layer2.0.downsample.0``, ``fc``; torchvision itself does not import beside this torch). 11,689,512 parameters
    at 1000 classes; any input of at least 32x32 (e.g. 3x64x64)."""
    c, _, _ = _image_shape("resnet18", input_shape, min_side=32)
    if width < 1:
        raise ValueError(f"resnet18: width must be >= 1; got {width!r}.")
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(c, width, 7, 2, 3, bias=False)), ("bn1", nn.BatchNorm2d(width)), ("relu", nn.ReLU()),
        ("maxpool", nn.MaxPool2d(3, 2, 1))]
    c_in = width
    for i in range(4):
        c_out = width * 2 ** i
        stride = 1 if i == 0 else 2
        layers.append((f"layer{i + 1}", nn.Sequential(_TVBasicBlock(c_in, c_out, stride),
                                                      _TVBasicBlock(c_out, c_out, 1))))
        c_in = c_out
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c_in, num_classes))]
    model = nn.Sequential(OrderedDict(layers))
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of ``divisor``, not below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (no bias) + BN (+ ReLU6)."""
    layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))


class _InvertedResidual(nn.Module):
    """MobileNetV2's block (Sandler et al. 2018, Table 1): 1x1 expansion (t > 1) + ReLU6, 3x3 depthwise + ReLU6,
    1x1 linear projection; the input added where stride 1 keeps the width. torchvision's ``conv`` names."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = int(round(c_in * t))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [_conv_bn(c_in, hidden, 1)] if t != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, c_out, 1, bias=False),
                   nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenetv2(input_shape: tuple[int, ...] = (3, 224, 224), num_classes: int = 1000,
                width_mult: float = 1.0, dropout: float = 0.2) -> nn.Sequential:
    """MobileNetV2 (Sandler et al. 2018, Table 2): conv 3x3/2 of 32, 17 inverted-residual blocks (t, c, n, s) =
    (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), conv 1x1 of 1280, global average
    pool, dropout, fc. torchvision's layout and parameter names (``features.N``, ``classifier.1``); 3,504,872
    parameters at 1000 classes and width 1.0."""
    c, _, _ = _image_shape("mobilenetv2", input_shape, min_side=32)
    if width_mult <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"mobilenetv2: need width_mult > 0 and dropout in [0, 1); got {width_mult!r}, {dropout!r}.")
    c_in, last = _divisible(32 * width_mult), _divisible(1280 * max(1.0, width_mult))
    features: list[nn.Module] = [_conv_bn(c, c_in, 3, 2)]
    for t, ch, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1)):
        c_out = _divisible(ch * width_mult)
        for i in range(n):
            features.append(_InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
            c_in = c_out
    features.append(_conv_bn(c_in, last, 1))
    model = nn.Sequential(OrderedDict([
        ("features", nn.Sequential(*features)), ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("classifier", nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes)))]))
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def gpt2_ffn(input_shape: tuple[int, ...] = (768,), num_classes: int = 768, hidden: int = 3072) -> nn.Sequential:
    """GPT-2-small's feed-forward sub-block (Radford et al. 2019): ``fc1`` 768 -> 3072, GELU, ``fc2`` 3072 -> 768,
    on inputs of ``input_shape`` = (width,) features (or (T, width) tokens); ``num_classes`` is the output width.
    Weights N(0, 0.02) as GPT-2's. The layer pair the runtime's batch-1 speed goals are set on (issue 38)."""
    if len(input_shape) not in (1, 2) or hidden < 1 or num_classes < 1:
        raise ValueError(f"gpt2_ffn: input_shape must be (width,) or (T, width), hidden and num_classes >= 1; got "
                         f"{tuple(input_shape)!r}, {hidden!r}, {num_classes!r}.")
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(int(input_shape[-1]), hidden)), ("gelu", nn.GELU()),
                                       ("fc2", nn.Linear(hidden, num_classes))]))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model


def gpt2_decoder(input_shape: tuple[int, ...] = (128,), num_classes: int = 256, n_layer: int = 2,
                 dropout: float = 0.0) -> GPT:
    """:func:`gpt` at GPT-2-small's width: ``n_layer`` blocks (default 2 of GPT-2-small's 12, to save time) of
    width 768 with 12 heads and a 3072-wide MLP; a byte vocabulary (``num_classes`` 256) instead of GPT-2's 50,257
    tokens, so the head does not dominate a decoder's time. Input (T,) token ids, T <= ``input_shape[0]``."""
    return gpt(input_shape, num_classes, n_layer=n_layer, width=768, n_head=12, dropout=dropout)


def _image_shape(owner: str, shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape[1:]) < min_side:
        raise ValueError(f"{owner}: input_shape must be (C, H, W) with H, W >= {min_side}; got {shape!r}.")
    return int(shape[0]), int(shape[1]), int(shape[2])


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300, "lenet5": lenet5, "mlpnet": mlpnet, "digits_cnn": digits_cnn, "resnet_small": resnet_small,
    "vgg_small": vgg_small, "mlp_bn": mlp_bn, "lenet5_bn": lenet5_bn,
    "mlp_dropout": mlp_dropout, "gpt": gpt, "resnet18": resnet18, "mobilenetv2": mobilenetv2, "gpt2_ffn": gpt2_ffn,
    "gpt2_decoder": gpt2_decoder,
}
_TOKEN_MODELS = ("gpt", "gpt2_decoder")
_DEFAULTS: dict[str, tuple[tuple[int, ...], int]] = {  # (input_shape, num_classes) where not (1, 28, 28), 10
    "digits_cnn": ((1, 8, 8), 10), "resnet18": ((3, 224, 224), 1000), "mobilenetv2": ((3, 224, 224), 1000),
    "gpt2_ffn": ((768,), 768), "gpt2_decoder": ((128,), 256),
}


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


def build_model(name: str, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                **kwargs: Any) -> nn.Module:
    """Build a model by name, for inputs of ``input_shape`` (C, H, W), and record how to rebuild it.

    ``name`` is one of :data:`MODELS` (``input_shape`` defaults to 1x28x28, others in ``_DEFAULTS``;
    ``num_classes`` to 10 there) or an import path ``"package.module:factory"``, called as ``factory(**kwargs)`` with
    ``num_classes`` among them when it is given (a factory's own arguments always reach it; ``input_shape`` is then
    only recorded). Weights are initialized from torch's global generator: seed it first (``torch.manual_seed``)
    for reproducible runs; the CLI does.

    Raises:
        ValueError: unknown name, unimportable path, an argument the model does not take (naming the ones it
            does), kwargs that are not JSON-serializable, or a factory that does not return an ``nn.Module``.
    """
    if ":" in name:
        kwargs = {**kwargs, **({} if num_classes is None else {"num_classes": num_classes})}
    _check_json(name, kwargs)
    if ":" in name:
        factory = _load_factory(name)
        model = _call(name, factory, (), kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module.")
        record_arch(model, name, kwargs, input_shape)
        return model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or give an import path "
                         "'package.module:factory'.")
    default_shape, default_classes = _DEFAULTS.get(name, ((1, 28, 28), 10))
    classes = default_classes if num_classes is None else num_classes
    shape = tuple(input_shape) if input_shape is not None else default_shape
    model = _call(name, MODELS[name], (shape, classes), kwargs)
    arch: dict[str, Any] = {"name": name, "input_shape": list(shape), "num_classes": classes}
    if name in _TOKEN_MODELS:  # token ids: FLOP counts, the runtime's probes and export feed integers
        arch["input_dtype"] = "int64"
    if kwargs:
        arch["kwargs"] = kwargs
    return set_arch(model, arch)


def _check_json(name: str, kwargs: dict[str, Any]) -> None:
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ValueError(f"build_model: keyword arguments of {name!r} must be JSON-serializable (numbers, "
                         f"strings, lists, dicts) so a file can rebuild the model; got {kwargs!r}.") from e


def _call(name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)``; an argument ``fn`` does not take is a ValueError naming the ones it does."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the call say what is wrong
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kwargs) - set(params))
        if bad:
            takes = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise ValueError(f"model {name!r} does not take argument(s) {bad}; it takes {takes}.")
    return fn(*args, **kwargs)


def record_arch(model: nn.Module, factory: str, kwargs: dict[str, Any] | None = None,
                input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Record on ``model`` that ``factory(**kwargs)`` rebuilds it (for a model the user built directly)."""
    arch: dict[str, Any] = {"factory": factory, "kwargs": dict(kwargs or {})}
    if input_shape is not None:
        arch["input_shape"] = list(input_shape)
    return set_arch(model, arch)


def count_params(model: nn.Module) -> int:
    """Number of parameters (dense count, zeros included)."""
    return sum(p.numel() for p in model.parameters())




class Logits(nn.Module):
    """A model whose forward returns a structure (a Hugging Face ``ModelOutput``, a tuple) seen as one returning its
    logits: ``.logits`` when it has them, else the first element. Parameter names gain a ``model.`` prefix."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, Tensor) else out[0]


def huggingface(cls: str, config: dict[str, Any]) -> nn.Module:
    """A Hugging Face ``transformers`` model of class ``cls`` (e.g. ``"BertForSequenceClassification"``) built
    from ``config`` (the keyword arguments of its config class) with fresh weights, nothing downloaded, seen
    through :class:`Logits`. Files record the class and config, so they rebuild it (transformers is not a
    dependency of netsurgeon: install it to use this).

    Raises:
        ValueError: transformers missing, or ``cls`` not one of its model classes.
    """
    try:
        import transformers
    except ImportError:
        raise ValueError("huggingface models need the transformers package: pip install transformers") from None
    model_cls = getattr(transformers, cls, None)
    config_cls = getattr(model_cls, "config_class", None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module) and config_cls is not None):
        raise ValueError(f"huggingface: {cls!r} is not a transformers model class (e.g. BertForSequenceClassification,"
                         " GPT2LMHeadModel, ViTForImageClassification).")
    return Logits(model_cls(config_cls(**config)))
