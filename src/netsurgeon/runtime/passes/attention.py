"""Pass ``attention``: each ``nn.MultiheadAttention`` rebuilt as four plain ``nn.Linear`` projections (query, key,
value, output) around ``F.scaled_dot_product_attention`` (:class:`ProjectedAttention`), before the model is traced.

Why: ``nn.MultiheadAttention`` computes its projections inside ``F.multi_head_attention_forward`` from its raw
``in_proj_weight`` and ``out_proj.weight``, so a pruned, int8 or group-quantized projection never reached a kernel
(the packed ``in_proj_weight`` is no Linear layer, and swapping ``out_proj`` for a kernel module broke the call that
reads ``out_proj.weight``). Rebuilt, each projection is an ordinary Linear layer holding its share of the stored
form (the rows of ``in_proj_weight`` with their masks, int8 scales or group scales), and the ``linear`` pass puts
each on its fastest kernel like any other layer (sparse, int8, int4 groups, N:M). The attention itself stays torch.

Same results as the module it replaces: ``batch_first`` or not, unbatched inputs, boolean or float ``attn_mask``
(2-D or per head), ``key_padding_mask``, ``is_causal`` (as torch reads it: a hint that drops ``attn_mask`` when no
padding mask is given and no weights are asked for), ``need_weights`` (weights averaged over heads or not), dropout
in training only. A module with ``bias_k``/``bias_v`` or ``add_zero_attn`` is left as it is (rare; its ``out_proj``
then keeps its plain form, see :func:`attention_owned`). Not timed: the arithmetic is the module's own.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from ...forms import layer_form
from ..plan import RunChoice, RuntimePlan

__all__ = ["ProjectedAttention", "rebuild_attention", "attention_owned"]


class ProjectedAttention(nn.Module):
    """Multi-head attention over four ``nn.Linear`` projections; ``forward`` takes ``nn.MultiheadAttention``'s
    arguments and returns ``(output, weights or None)`` as it does. The projections are called as modules, so
    torch.fx sees each as a layer of its own (the attention core is one traced call, :func:`_attend`)."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear, num_heads: int,
                 batch_first: bool, dropout: float) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads, self.batch_first, self.dropout = num_heads, batch_first, dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        out, weights = _attend(q, k, v, key_padding_mask, attn_mask, need_weights, average_attn_weights, is_causal,
                               self.num_heads, self.batch_first, self.dropout if self.training else 0.0)
        return self.out_proj(out), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.q_proj.out_features}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _masks(kpm: Tensor | None, attn_mask: Tensor | None, need_weights: bool, is_causal: bool, dtype: torch.dtype,
           b: int, h: int, length: int, src: int) -> tuple[Tensor | None, bool]:
    """The additive (or boolean) mask for SDPA, shape broadcastable to (B, H, L, S), and the causal flag, by
    ``F.multi_head_attention_forward``'s rules (``is_causal`` needs ``attn_mask``; the hint drops the mask when
    there is no padding mask and no weights are asked for; a padding mask merges into it and ends the hint)."""
    kpm = F._canonical_mask(mask=kpm, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
                            other_name="attn_mask", target_type=dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
    if is_causal and kpm is None and not need_weights:
        return None, True
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=dtype, check_other=False)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (length, src):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                   f"{(length, src)}.")
            attn_mask = attn_mask.view(1, 1, length, src)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (b * h, length, src):
            attn_mask = attn_mask.view(b, h, length, src)
        else:
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} is not (L, S) = {(length, src)} or "
                               f"(N*num_heads, L, S) = {(b * h, length, src)}.")
    if kpm is None:
        return attn_mask, is_causal
    kpm = kpm.view(b, 1, 1, src)
    return (kpm if attn_mask is None else attn_mask + kpm), False


@fx.wrap
def _attend(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, attn_mask: Tensor | None, need_weights: bool,
            average: bool, is_causal: bool, heads: int, batch_first: bool, dropout_p: float
            ) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention of projected ``q`` (L, E), ``k``, ``v`` (S, E) per sample, laid out as the
    module's inputs were ((B, T, E) batch first, (T, B, E) otherwise, (T, E) unbatched); returns the heads'
    output in that layout, before the output projection, and the weights if asked for."""
    batched = q.dim() == 3
    if not batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        kpm = None if kpm is None else kpm.unsqueeze(0)
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    b, length, e = q.shape
    src, d = k.shape[1], e // heads
    mask, causal = _masks(kpm, attn_mask, need_weights, is_causal, q.dtype, b, heads, length, src)
    q4 = q.reshape(b, length, heads, d).transpose(1, 2)
    k4 = k.reshape(b, src, heads, d).transpose(1, 2)
    v4 = v.reshape(b, src, heads, d).transpose(1, 2)
    weights = None
    if need_weights:
        scores = torch.matmul(q4 * math.sqrt(1.0 / d), k4.transpose(-2, -1))
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v4)
        if average:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    out = out.transpose(1, 2).reshape(b, length, e)
    if not batched:
        return out.squeeze(0), weights
    return (out if batch_first else out.transpose(0, 1)), weights


def _sliced(p: nn.Module, rows: slice, total: int) -> nn.Module:
    """A copy of parametrization ``p`` (a mask, int8 or group-quantized codes with their scales, k-means indices)
    restricted to ``rows`` of a weight with ``total`` rows: every buffer with ``total`` rows is cut."""
    p = copy.deepcopy(p)
    for name, buf in list(p.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == total:
            setattr(p, name, buf[rows].clone())
    shape = getattr(p, "shape", None)
    if isinstance(shape, tuple) and shape and shape[0] == total:
        p.shape = (rows.stop - rows.start, *shape[1:])
    return p


def _projection(owner: nn.Module, attr: str, rows: slice, bias: Tensor | None) -> nn.Linear:
    """``owner.attr[rows]`` (and ``bias``) as an ``nn.Linear`` holding the same stored form: the weight's
    parametrizations cut to those rows. Where cutting does not give the same values (a form whose parts do not
    follow the rows, e.g. hashed), the layer holds the plain values."""
    value = getattr(owner, attr).detach()
    total = value.shape[0]
    value = value[rows]
    lin = nn.Linear(value.shape[1], value.shape[0], bias=bias is not None)
    with torch.no_grad():
        if bias is not None:
            lin.bias.copy_(bias.detach())
    lin.weight = nn.Parameter(value.clone(), requires_grad=False)
    if not parametrize.is_parametrized(owner, attr):
        return lin.eval()
    plist = owner.parametrizations[attr]
    try:
        original = plist.original.detach()
        if original.shape[0] != total:
            raise ValueError("parametrized original does not follow the rows")
        held = nn.Linear(value.shape[1], value.shape[0], bias=bias is not None)
        held.weight = nn.Parameter(original[rows].clone(), requires_grad=False)
        held.bias = lin.bias
        for p in plist:
            parametrize.register_parametrization(held, "weight", _sliced(p, rows, total), unsafe=True)
        if torch.equal(held.weight.detach(), value):
            return held.eval()
    except Exception:  # noqa: BLE001 - any form that cannot be cut by rows keeps its values, as plain weights
        pass
    return lin.eval()


def _rebuilt(mha: nn.MultiheadAttention) -> ProjectedAttention | None:
    """``mha`` as a :class:`ProjectedAttention` with the same weights and stored forms, or None where it uses
    ``bias_k``/``bias_v`` or ``add_zero_attn`` (kept as it is)."""
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        return None
    e = mha.embed_dim
    biases = [None] * 3 if mha.in_proj_bias is None else list(mha.in_proj_bias.detach().chunk(3))
    if mha._qkv_same_embed_dim:
        projs = [_projection(mha, "in_proj_weight", slice(i * e, (i + 1) * e), biases[i]) for i in range(3)]
    else:
        projs = [_projection(mha, attr, slice(0, e), biases[i])
                 for i, attr in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight"))]
    out = mha.out_proj  # a Linear subclass: the linear pass takes it as it is, stored form included
    return ProjectedAttention(*projs, out, mha.num_heads, mha.batch_first, mha.dropout).train(mha.training)


def _reads_weights(m: nn.Module) -> bool:
    """Whether ``m`` is one of torch's transformer layers, whose forward reads its children's weights directly
    (``self_attn.in_proj_weight``, ``linear1.weight`` for its fused inference path)."""
    return type(m).__module__ == "torch.nn.modules.transformer"


def rebuild_attention(model: nn.Module, plan: RuntimePlan) -> int:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by its :class:`ProjectedAttention`, except
    inside torch's own transformer layers (which read its weights); returns how many were replaced and records
    each in ``plan``."""
    count = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.MultiheadAttention) or not name \
                or _reads_weights(model.get_submodule(name.rpartition(".")[0])):
            continue
        new = _rebuilt(m)
        if new is None:
            continue
        form = layer_form(m, "in_proj_weight" if m._qkv_same_embed_dim else "q_proj_weight")[0]
        ws = [p.weight for p in (new.q_proj, new.k_proj, new.v_proj, new.out_proj)]
        density = sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        model.set_submodule(name, new)
        plan.runs.append(RunChoice([name], "attention", form, density))
        count += 1
    return count


def attention_owned(model: nn.Module) -> set[str]:
    """Names of the Linear layers whose parent reads their weight (an ``nn.MultiheadAttention`` left in ``model``
    its ``out_proj``, torch's transformer layers their ``linear1``/``linear2``): they keep their form, since a
    kernel module in their place has no ``weight`` to read."""
    owners = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
              or _reads_weights(m)]
    return {f"{name}.{child}" if name else child for name, m in owners
            for child, c in m.named_modules() if child and isinstance(c, nn.Linear)}
