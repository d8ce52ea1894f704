"""``factorized``: layers replaced by low-rank factors (``lowrank/``; Denton et al. 2014, Jaderberg et al. 2014,
Lebedev et al. 2015, Kim et al. 2016, Howard et al. 2017 for the separable case).

The record is ``{layer: rank}`` for a Linear layer replaced by a pair (in -> rank -> out) and ``{layer: {"kind":
k, "rank": r}}`` for a Conv2d replaced by the factor convolutions of kind ``k`` (spatial, cp, tucker with a rank
pair [R_in, R_out], separable). The structures built here are empty; the file's weights fill them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..coding.container import NszError
from ..coding.schema import check_int, check_mapping, short
from . import ArchChange, record_change, register_change

__all__ = ["Factorized", "CONV_KINDS", "factorizable_conv", "conv_structure", "factor_structure", "record_factorized",
           "apply_factorized"]

CONV_KINDS = ("spatial", "cp", "tucker", "separable")


def factorizable_conv(m: nn.Module) -> str | None:
    """Why ``m`` cannot be factorized here (None when it can): a plain, ungrouped, zero-padded Conv2d."""
    if type(m) is not nn.Conv2d:
        return f"a {type(m).__name__}, not a Conv2d"
    if m.groups != 1:
        return f"a grouped convolution (groups={m.groups})"
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return f"padding {m.padding!r} ({m.padding_mode})"
    return None


def _conv(cin: int, cout: int, kernel: tuple[int, int], conv: nn.Conv2d, *, axes: str, groups: int = 1,
          bias: bool = False) -> nn.Conv2d:
    """A Conv2d taking ``conv``'s stride, padding and dilation along ``axes`` ("hw", "h", "w" or "" for 1x1)."""
    def along(v: tuple[int, ...], other: int) -> tuple[int, int]:
        return tuple(v[i] if ax in axes else other for i, ax in enumerate("hw"))  # type: ignore[return-value]

    p = conv.weight
    return nn.Conv2d(cin, cout, kernel, stride=along(conv.stride, 1), padding=along(conv.padding, 0),
                     dilation=along(conv.dilation, 1), groups=groups, bias=bias, device=p.device, dtype=p.dtype)


def conv_structure(conv: nn.Conv2d, kind: str, rank: int | list[int]) -> nn.Sequential:
    """The empty (freshly initialised) ``nn.Sequential`` that factorization ``kind`` at ``rank`` puts in place
    of ``conv``; ``lowrank.factorize_conv`` fills it. Raises ValueError on a kind, rank or layer that does not fit."""
    why = factorizable_conv(conv)
    if why is not None:
        raise ValueError(f"cannot factorize {why}.")
    n, c, (kh, kw), b = conv.out_channels, conv.in_channels, conv.kernel_size, conv.bias is not None
    if kind == "tucker":
        if not (isinstance(rank, (list, tuple)) and len(rank) == 2 and all(isinstance(r, int) for r in rank)):
            raise ValueError(f"tucker needs a rank pair [R_in, R_out]; got {rank!r}.")
        rin, rout = rank
        if not (1 <= rin <= c and 1 <= rout <= n):
            raise ValueError(f"tucker ranks {list(rank)} must be within [1, {c}] x [1, {n}].")
        return nn.Sequential(_conv(c, rin, (1, 1), conv, axes=""), _conv(rin, rout, (kh, kw), conv, axes="hw"),
                             _conv(rout, n, (1, 1), conv, axes="", bias=b))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{kind} needs a positive integer rank; got {rank!r}.")
    if kind == "spatial":
        if rank > min(c * kh, n * kw):
            raise ValueError(f"spatial rank {rank} exceeds min(C·k_h, N·k_w) = {min(c * kh, n * kw)}.")
        return nn.Sequential(_conv(c, rank, (kh, 1), conv, axes="h"), _conv(rank, n, (1, kw), conv, axes="w", bias=b))
    if kind == "cp":
        return nn.Sequential(_conv(c, rank, (1, 1), conv, axes=""),
                             _conv(rank, rank, (kh, 1), conv, axes="h", groups=rank),
                             _conv(rank, rank, (1, kw), conv, axes="w", groups=rank),
                             _conv(rank, n, (1, 1), conv, axes="", bias=b))
    if kind == "separable":
        if rank > min(n, kh * kw):
            raise ValueError(f"separable depth multiplier {rank} exceeds min(N, k_h·k_w) = {min(n, kh * kw)}.")
        return nn.Sequential(_conv(c, c * rank, (kh, kw), conv, axes="hw", groups=c),
                             _conv(c * rank, n, (1, 1), conv, axes="", bias=b))
    raise ValueError(f"unknown convolution factorization {kind!r} (choose from {', '.join(CONV_KINDS)}).")


def factor_structure(layer: nn.Module, spec: int | dict[str, Any]) -> nn.Sequential:
    """The empty factor ``nn.Sequential`` a record entry describes (an int rank: a Linear pair; a mapping
    {"kind", "rank"}: a convolution factorization). Raises ValueError when ``layer`` does not fit."""
    if isinstance(spec, dict):
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"a {spec.get('kind')!r} factorization needs a Conv2d, not a {type(layer).__name__}.")
        return conv_structure(layer, spec["kind"], spec["rank"])
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"a rank-{spec} factor pair needs a Linear layer, not a {type(layer).__name__}.")
    dev = layer.weight.device
    return nn.Sequential(nn.Linear(layer.in_features, spec, bias=False, device=dev),
                         nn.Linear(spec, layer.out_features, bias=layer.bias is not None, device=dev))


def record_factorized(model: nn.Module, ranks: dict[str, Any]) -> None:
    """Record on ``model`` the layers replaced by low-rank factors ({layer: rank} for a Linear pair,
    {layer: {"kind", "rank"}} for a convolution), merged with any recorded before."""
    record_change(model, "factorized", ranks)


def apply_factorized(model: nn.Module, ranks: dict[str, Any], source: str = "file") -> nn.Module:
    """Replace each layer named in ``ranks`` by the empty factor layers its entry describes; a layer already
    replaced (an ``nn.Sequential``) is left for the weights to check. Raises ValueError naming a misfit."""
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


@register_change
class Factorized(ArchChange):
    key = "factorized"
    reshapes = True
    order = 20

    def check(self, where: str, value: Any) -> None:
        def one(layer: str, r: Any) -> None:
            if not isinstance(r, dict):
                check_int(where, f"factorized.{layer}", r, 1, 1 << 24)
                return
            kind = r.get("kind")
            if set(r) != {"kind", "rank"} or kind not in CONV_KINDS:
                raise NszError(f"{where}: field 'factorized' entry {short(layer)} must be a rank or "
                               f"{{kind: one of {list(CONV_KINDS)}, rank}}; got {short(r)}.")
            rank = r["rank"]
            if kind == "tucker":
                if not isinstance(rank, list) or len(rank) != 2:
                    raise NszError(f"{where}: field 'factorized.{layer}.rank' of a tucker factorization must be "
                                   f"[R_in, R_out]; got {short(rank)}.")
                for x in rank:
                    check_int(where, f"factorized.{layer}.rank", x, 1, 1 << 24)
            else:
                check_int(where, f"factorized.{layer}.rank", rank, 1, 1 << 24)

        check_mapping(where, "factorized", value, one)

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        apply_factorized(model, value, source)
