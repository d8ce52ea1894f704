"""An image folder: one subfolder per class, read with PIL (no torchvision), held in memory as float32.

``root/cat/1.png, root/dog/2.jpg, ...``; or ``root/train/<class>/...`` with optional ``root/val/`` and
``root/test/`` beside it (splits that are absent are carved out of ``train`` with a seed). Every image is
converted to RGB, resized if asked (``resize``), scaled to [0, 1] and optionally normalized per channel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .core import DataError, Dataset, Split, _split_off

__all__ = ["image_folder", "parse_resize", "parse_normalize", "IMAGE_SUFFIXES", "IMAGENET_MEAN_STD"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the torchvision ImageNet models' statistics


def parse_resize(value: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``64`` or ``"64"`` -> (64, 64); ``"48x64"`` or (48, 64) -> (height 48, width 64); None -> None."""
    if value is None:
        return None
    parts: list[object] = list(value) if isinstance(value, (tuple, list)) else str(value).lower().split("x")
    try:
        hw = [int(str(v)) for v in parts]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw *= 2
    if len(hw) != 2 or min(hw) < 1:
        raise DataError(f"imagefolder: resize must be a size N or HxW of positive integers; got {value!r}.")
    return hw[0], hw[1]


def parse_normalize(value: str | None, channels: int = 3) -> str | tuple[tuple[float, ...], tuple[float, ...]]:
    """``None``/``"none"``: keep [0, 1]; ``"auto"``: the training split's per-channel mean and std;
    ``"imagenet"``: ImageNet's; ``"M,S"``: one mean and std for every channel; ``"M1,M2,M3,S1,S2,S3"``: per
    channel. Returns ``"none"``, ``"auto"`` or ``(means, stds)``."""
    text = "none" if value is None else str(value).strip().lower()
    if text in ("none", "auto"):
        return text
    if text == "imagenet":
        return IMAGENET_MEAN_STD
    try:
        nums = [float(v) for v in text.split(",")]
    except ValueError:
        nums = []
    if len(nums) == 2:
        nums = [nums[0]] * channels + [nums[1]] * channels
    if len(nums) != 2 * channels or min(nums[channels:]) <= 0:
        raise DataError(f"imagefolder: normalize must be none, auto, imagenet, 'mean,std' or {channels} means then "
                        f"{channels} stds (stds > 0), comma-separated; got {value!r}.")
    return tuple(nums[:channels]), tuple(nums[channels:])


def _classes(root: Path) -> list[str]:
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataError(f"imagefolder: no class subfolders in {str(root)!r} (expected one folder per class).")
    return names


def _read(root: Path, classes: list[str], size: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    from PIL import Image, UnidentifiedImageError

    xs, ys = [], []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            raise DataError(f"imagefolder: {str(root)!r} has no folder for class {name!r}.")
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"imagefolder: class folder {str(d)!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if size is not None and im.size != (size[1], size[0]):
                        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"imagefolder: cannot read image {str(f)!r} ({e}).") from e
            if xs[-1].shape != xs[0].shape:
                raise DataError(f"imagefolder: {str(f)!r} is {xs[-1].shape[1]}x{xs[-1].shape[0]} but the first "
                                f"image is {xs[0].shape[1]}x{xs[0].shape[0]}; pass --resize N (or HxW).")
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W) in [0, 1]
    return x, torch.tensor(ys, dtype=torch.int64)


def image_folder(root: str | os.PathLike[str], *, resize: str | int | tuple[int, int] | None = None,
                 normalize: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0) -> Dataset:
    """Load an image folder (class per subfolder) into memory as (N, 3, H, W) float32.

    Args:
        root: the folder; with ``train/`` (and optionally ``val/``, ``test/``) subfolders those are the splits
            and their class folders must carry the same names, else its subfolders are the classes.
        resize: ``N`` (N x N) or ``"HxW"``; without it every image must have the size of the first.
        normalize: see :func:`parse_normalize` (default ``none``: pixels in [0, 1]; ``auto`` uses the training
            split's per-channel statistics).
        val_fraction, test_fraction: of all images, held out (seeded) for a split the folder does not have.
        seed: the draw of the held-out images.

    Raises:
        DataError: missing folder, no class folders, an empty class folder, unreadable or mismatched images.
    """
    if root is None or str(root) == "":
        raise DataError("imagefolder: a directory is required (pass --data-dir DIR).")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"imagefolder: data directory does not exist: {str(base)!r}.")
    size, norm = parse_resize(resize), parse_normalize(normalize)
    has = {s: (base / s).is_dir() for s in ("train", "val", "test")}
    if has["train"]:
        classes = _classes(base / "train")
        for s in ("val", "test"):
            if has[s] and (extra := sorted(set(_classes(base / s)) - set(classes))):
                raise DataError(f"imagefolder: {str(base / s)!r} has classes {extra} that train/ does not.")
        parts = {s: _read(base / s, classes if s == "train" else _classes(base / s), size) for s in has if has[s]}
        for s in ("val", "test"):  # a split's labels index the training split's classes
            if s in parts:
                own = _classes(base / s)
                parts[s] = (parts[s][0], torch.tensor([classes.index(own[i]) for i in parts[s][1].tolist()]))
    else:
        classes = _classes(base)
        parts = {"train": _read(base, classes, size)}
    x, y = parts["train"]
    n_all = len(y) + sum(len(p[1]) for s, p in parts.items() if s != "train")
    held = {}
    for i, s in enumerate(("test", "val")):
        if s not in parts:
            n_hold = int(round((test_fraction if s == "test" else val_fraction) * n_all))
            if not 1 <= n_hold < len(y):
                raise DataError(f"imagefolder: too few images ({len(y)}) in {str(base)!r} to hold out a {s} split "
                                f"of {n_hold}; add images or {s}/ folder.")
            keep, hold = _split_off(x, y, n_hold, seed + i)
            x, y = keep.x, keep.y
            held[s] = (hold.x, hold.y)
    splits = {"train": (x, y), **{s: p for s, p in parts.items() if s != "train"}, **held}
    if norm == "auto":
        mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-8)
    elif norm != "none":
        mean, std = torch.tensor(norm[0]), torch.tensor(norm[1])
    else:
        mean, std = torch.zeros(3), torch.ones(3)

    def split(s: str) -> Split:
        xs, ys = splits[s]
        return Split((xs - mean[:, None, None]) / std[:, None, None], ys)

    info = {"root": str(base), "classes": classes, "resize": list(size) if size else None,
            "normalize": {"mean": mean.tolist(), "std": std.tolist()},
            "images": {s: len(splits[s][1]) for s in ("train", "val", "test")}}
    return Dataset("imagefolder", split("train"), split("val"), split("test"), num_classes=len(classes), info=info)
