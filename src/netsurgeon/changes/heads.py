"""``heads``: attention layers rebuilt with fewer heads (head pruning, ``pruning/heads.py``).

The record is ``{layer: [kept head indices]}``, the indices counted in the architecture as built (a layer pruned
twice records the heads of the original it still has). The loader rebuilds the base model, then shrinks those
layers: an ``nn.MultiheadAttention`` becomes a :class:`HeadAttention` (the same computation with separate q/k/v/out
projections of ``kept · head_dim`` rows, since ``nn.MultiheadAttention`` ties its inner width to ``embed_dim``), and
a Hugging Face attention (GPT-2's ``c_attn``/``c_proj``, BERT's ``self``/``output.dense``, ``q/k/v/o_proj`` as in
ViT) has its projections sliced in place; still on the meta device first and without pickle.

Attention kinds are found by duck typing, so nothing here imports ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..coding.container import NszError
from ..coding.schema import check_int, check_mapping, short
from . import ArchChange, record_change, register_change

__all__ = ["Heads", "HeadAttention", "AttentionSite", "HeadBlock", "attention_sites", "head_blocks", "shrink_heads",
           "record_heads", "MAX_HEADS"]

MAX_HEADS = 4096
_KEPT_ATTR = "_netsurgeon_heads"  # on a sliced Hugging Face attention: its heads, as indices of the original


class HeadAttention(nn.Module):
    """``nn.MultiheadAttention`` with a subset of its heads: the same forward signature and outputs, with
    ``q_proj``/``k_proj``/``v_proj`` (``len(heads)·head_dim`` rows) and ``out_proj`` as plain Linear layers, so
    parameters and FLOPs shrink with the heads and every weight-level method sees four Linear layers.

    ``heads`` are the kept heads' indices in the original layer of ``original_heads`` heads (a 3-d ``attn_mask``
    given per original head is sliced to them). Returned attention weights are those of the kept heads (averaged
    over them by default). Not supported (refused where the layer is found): ``add_bias_kv`` and
    ``add_zero_attn``.
    """

    def __init__(self, embed_dim: int, head_dim: int, heads: list[int], original_heads: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, out_bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        inner = len(heads) * head_dim
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.head_dim, self.num_heads = embed_dim, head_dim, len(heads)
        self.heads, self.original_heads = list(heads), original_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first, self.dropout = batch_first, dropout
        # what torch's fused TransformerEncoderLayer path checks first: with these it takes the module call
        self._qkv_same_embed_dim, self.in_proj_weight, self.in_proj_bias = False, None, None
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias, **kw)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, keep: list[int]) -> HeadAttention:
        """The layer ``mha`` restricted to heads ``keep`` (sorted indices), its weights copied (meta stays meta)."""
        E, H = mha.embed_dim, mha.num_heads
        hd = E // H
        w = mha.out_proj.weight
        idx = _index(keep, hd, device=w.device)
        new = cls(E, hd, keep, H, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
                  out_bias=mha.out_proj.bias is not None, batch_first=mha.batch_first, dropout=mha.dropout,
                  device=w.device, dtype=w.dtype)
        ws = mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else \
            (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bs = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for lin, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs, strict=True):
                lin.weight.copy_(wt.index_select(0, idx))
                if b is not None:
                    lin.bias.copy_(b.index_select(0, idx))
            new.out_proj.weight.copy_(w.index_select(1, idx))
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, B: int, dtype: torch.dtype
              ) -> Tensor | None:
        """One additive float mask broadcastable to (B, heads, T, S), as nn.MultiheadAttention merges them."""
        def additive(m: Tensor) -> Tensor:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
                if m.dtype == torch.bool else m.to(dtype)

        out = None
        if attn_mask is not None:
            m = additive(attn_mask)
            if m.dim() == 3:  # (B·original heads, T, S): this layer's heads
                m = m.view(B, self.original_heads, *m.shape[1:])[:, self.heads]
            out = m
        if key_padding_mask is not None:
            k = additive(key_padding_mask).view(B, 1, 1, -1)
            out = k if out is None else out + k
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (T, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (T, B, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, T, S, h, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(key).view(B, S, h, d).transpose(1, 2)    # (B, h, S, d)
        v = self.v_proj(value).view(B, S, h, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, B, q.dtype)
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, h, T, S)
            if causal:
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p) @ v if p > 0 else weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, h * d))  # (B, T, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


@dataclass(frozen=True)
class HeadBlock:
    """Part of a tensor laid out by heads: along ``axis``, at each of ``offsets``, ``heads`` blocks of ``head_dim``
    entries, head-major (q, k and v packed in one tensor are three offsets). ``weight``: not a bias."""

    owner: str       # module name, relative to the attention layer ("" for the layer itself)
    attr: str
    axis: int
    offsets: tuple[int, ...]
    weight: bool = True


@dataclass
class AttentionSite:
    """An attention layer whose heads can be removed: its name, kind (``mha``, ``head``, ``gpt2``, ``qkvo``,
    ``bert``), heads now, head width, and its heads as indices of the layer as built."""

    name: str
    kind: str
    module: nn.Module
    num_heads: int
    head_dim: int
    original: list[int]


def _index(keep: list[int], hd: int, offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """The rows of heads ``keep`` (``hd`` each) from ``offset``, on ``device`` (index_select wants its index
    beside the weights)."""
    keep_t = torch.as_tensor(keep, dtype=torch.long, device=device)
    return (offset + keep_t[:, None] * hd + torch.arange(hd, device=device)).reshape(-1)


def _heads_attr(m: nn.Module) -> str | None:
    return next((a for a in ("num_heads", "num_attention_heads") if isinstance(getattr(m, a, None), int)), None)


def _site(name: str, m: nn.Module) -> AttentionSite | str | None:
    """The attention site ``m`` is, a reason it cannot lose heads, or None when it is no attention layer."""
    if isinstance(m, nn.MultiheadAttention):
        if m.bias_k is not None or m.add_zero_attn:
            return "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
        return AttentionSite(name, "mha", m, m.num_heads, m.head_dim, list(range(m.num_heads)))
    if isinstance(m, HeadAttention):
        return AttentionSite(name, "head", m, m.num_heads, m.head_dim, list(m.heads))
    kind = None
    if all(type(getattr(m, a, None)).__name__ == "Conv1D" for a in ("c_attn", "c_proj")) and \
            isinstance(getattr(m, "split_size", None), int) and isinstance(getattr(m, "head_dim", None), int):
        if hasattr(m, "q_attn"):
            return "a cross-attention (GPT-2 q_attn) is not supported"
        kind, hd = "gpt2", m.head_dim
    elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            isinstance(getattr(m, "head_dim", None), int) and _heads_attr(m):
        if getattr(m, "num_key_value_groups", 1) != 1 or m.k_proj.out_features != m.q_proj.out_features:
            return "grouped-query attention (shared key/value heads) is not supported"
        kind, hd = "qkvo", m.head_dim
    else:
        s, o = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
        if s is not None and isinstance(o, nn.Linear) and isinstance(getattr(s, "attention_head_size", None), int) \
                and all(isinstance(getattr(s, a, None), nn.Linear) for a in ("query", "key", "value")):
            kind, hd = "bert", s.attention_head_size
    if kind is None:
        return None
    n = _width(m, kind) // hd
    return AttentionSite(name, kind, m, n, hd, list(getattr(m, _KEPT_ATTR, range(n))))


def _width(m: nn.Module, kind: str) -> int:
    """The layer's inner width (heads · head_dim) as its projections hold it now."""
    return {"gpt2": lambda: m.c_proj.weight.shape[0], "qkvo": lambda: m.q_proj.out_features,
            "bert": lambda: m.self.query.out_features}[kind]()


def attention_sites(model: nn.Module) -> tuple[list[AttentionSite], dict[str, str]]:
    """The attention layers of ``model`` whose heads can be removed, and the ones found that cannot ({name: why})."""
    sites, skipped = [], {}
    for name, m in model.named_modules():
        if "parametrizations." in f".{name}.":
            continue
        s = _site(name, m)
        if isinstance(s, AttentionSite):
            sites.append(s)
        elif isinstance(s, str):
            skipped[name] = s
    return sites, skipped


def head_blocks(site: AttentionSite) -> list[HeadBlock]:
    """Every tensor of ``site`` laid out by heads: the query/key/value rows and the output projection's columns."""
    W = site.num_heads * site.head_dim
    if site.kind == "mha":
        m = site.module
        qkv = [HeadBlock("", "in_proj_weight", 0, (0, W, 2 * W))] if m._qkv_same_embed_dim else \
            [HeadBlock("", f"{p}_proj_weight", 0, (0,)) for p in "qkv"]
        if m.in_proj_bias is not None:
            qkv.append(HeadBlock("", "in_proj_bias", 0, (0, W, 2 * W), weight=False))
        return [*qkv, HeadBlock("out_proj", "weight", 1, (0,))]
    if site.kind == "gpt2":  # Conv1D holds (in, out): q, k, v are columns of c_attn, the heads rows of c_proj
        return [HeadBlock("c_attn", "weight", 1, (0, W, 2 * W)), HeadBlock("c_attn", "bias", 0, (0, W, 2 * W), False),
                HeadBlock("c_proj", "weight", 0, (0,))]
    names = {"head": ("q_proj", "k_proj", "v_proj", "out_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
             "bert": ("self.query", "self.key", "self.value", "output.dense")}[site.kind]
    out = []
    for n in names[:3]:
        out.append(HeadBlock(n, "weight", 0, (0,)))
        if getattr(site.module.get_submodule(n), "bias", None) is not None:
            out.append(HeadBlock(n, "bias", 0, (0,), weight=False))
    return [*out, HeadBlock(names[3], "weight", 1, (0,))]


@torch.no_grad()
def shrink_heads(model: nn.Module, site: AttentionSite, keep: list[int]) -> AttentionSite:
    """Keep only heads ``keep`` (sorted indices among the site's current heads) of one attention layer, in place
    (an nn.MultiheadAttention is replaced by a :class:`HeadAttention`). Returns the new site."""
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= site.num_heads:
        raise ValueError(f"{site.name}: keep heads {keep} must be sorted, distinct, and within [0, {site.num_heads})"
                         " (at least one).")
    original = [site.original[i] for i in keep]
    if site.kind == "mha":
        new = HeadAttention.from_mha(site.module, keep)
        parent, _, attr = site.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        for enc in model.modules():  # its fused path would hand the layers nested tensors, which only MHA reads
            if isinstance(enc, nn.TransformerEncoder) and any(getattr(layer, "self_attn", None) is new
                                                              for layer in enc.layers):
                enc.use_nested_tensor = False
        return AttentionSite(site.name, "head", new, len(keep), site.head_dim, original)
    m = site.module
    for b in head_blocks(site):
        owner = m.get_submodule(b.owner) if b.owner else m
        t = getattr(owner, b.attr)
        idx = torch.cat([_index(keep, site.head_dim, off) for off in b.offsets]).to(t.device)
        t.data = t.data.index_select(b.axis, idx).contiguous()
        if isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = owner.weight.shape
        elif hasattr(owner, "nf"):  # Conv1D: (in, out)
            owner.nf = owner.weight.shape[1]
    W = len(keep) * site.head_dim
    if site.kind == "head":
        m.num_heads, m.heads = len(keep), original
    elif site.kind == "gpt2":
        m.split_size, m.num_heads = W, len(keep)
    elif site.kind == "qkvo":
        setattr(m, _heads_attr(m), len(keep))
    else:
        m.self.num_attention_heads, m.self.all_head_size = len(keep), W
    if site.kind != "head":
        object.__setattr__(m, _KEPT_ATTR, original)
    return AttentionSite(site.name, site.kind, m, len(keep), site.head_dim, original)


def record_heads(model: nn.Module, kept: dict[str, list[int]]) -> None:
    """Record on ``model`` the heads each shrunk attention layer keeps (indices of the layer as built)."""
    record_change(model, "heads", kept)


def apply_heads(model: nn.Module, kept: dict[str, list[int]], source: str = "file") -> nn.Module:
    """Shrink each attention layer named in ``kept`` to the recorded heads; raises ValueError naming a misfit."""
    for name, heads in kept.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: attention layer {name!r} (heads record) is not in the model.") from None
        site = _site(name, m)
        if not isinstance(site, AttentionSite):
            raise ValueError(f"{source}: layer {name!r} ({type(m).__name__}) is not an attention layer whose heads "
                             f"can be removed{'' if site is None else f' ({site})'}.")
        if site.original == list(heads):
            continue
        missing = sorted(set(heads) - set(site.original))
        if missing:
            raise ValueError(f"{source}: attention layer {name!r} has no head {missing[0]} (it has {site.original}).")
        shrink_heads(model, site, [site.original.index(h) for h in heads])
    return model


@register_change
class Heads(ArchChange):
    key = "heads"
    reshapes = True
    order = 15  # after resized layers, before a projection is factorized

    def check(self, where: str, value: Any) -> None:
        def one(layer: str, heads: Any) -> None:
            if not isinstance(heads, list) or not 1 <= len(heads) <= MAX_HEADS:
                raise NszError(f"{where}: field 'heads' entry {short(layer)} must be a list of 1 to {MAX_HEADS} head "
                               f"indices; got {short(heads)}.")
            for h in heads:
                check_int(where, f"heads.{layer}", h, 0, MAX_HEADS - 1)
            if any(a >= b for a, b in zip(heads, heads[1:], strict=False)):
                raise NszError(f"{where}: field 'heads.{layer}' must list increasing head indices; got {short(heads)}.")

        check_mapping(where, "heads", value, one)

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        apply_heads(model, value, source)
