"""Vector quantization of weights: product quantization and residual quantization (Gong, Liu, Yang, Bourdev
2014, "Compressing Deep Convolutional Networks using Vector Quantization", arXiv:1412.6115, Sec. 3.3-3.4),
and the Quantized-CNN layout for convolutions (Wu, Leng, Wang, Hu, Cheng 2016, Q-CNN, Sec. 3).

A weight tensor is read as *rows* of vectors along its input dimension: a Linear weight (out, in) has ``out``
rows of length ``in``; a convolution (out, in, kh, kw) has ``out·kh·kw`` rows, one per output channel and
kernel position, each the vector of its ``in`` input-channel weights (Q-CNN's layout: a subspace splits the
input channels, and one codebook serves every output channel and kernel position).

* ``pq`` (Gong Sec. 3.3, Eq. (4)-(5)): the row is split into S segments of ``sub_dim`` columns; each segment
  position s gets its own k-means codebook of k centroids over the rows' segments; a row is stored as S codes.
* ``rq`` (Gong Sec. 3.4, Eq. (6)): the whole row is quantized by k-means, then its residual by another
  codebook, for T stages; a row is stored as T codes.

The stored form (:class:`ProductQuantized`) is general: codebooks (T, S, k, sub_dim) and codes (T, rows, S);
``W[row, segment s] = Σ_t codebooks[t, s, codes[t, row, s]]`` (the last segment is truncated when sub_dim does
not divide the row). The codebooks are trainable, so ``finetune`` after ``pq`` updates them with the codes
fixed, as Deep Compression fine-tunes centroids. A ``.nsz`` file holds it as the ``pq`` codec: the codebook
floats plus the codes at ceil(log2 k) bits each.

* ``response_iters > 0`` (Q-CNN Sec. 3.1 and 3.3, fully connected layers): starting from Gong's codebooks,
  each Linear layer's codebooks and codes are refined to minimise the *response* error on training inputs,
  ``Σ_n ‖W x_n − Ŵ x̃_n‖²`` (their Eq. (4) with the error correction of Sec. 3.3: ``x̃_n`` is the input the
  already quantized layers before it produce, ``W x_n`` the original network's response), by block coordinate
  descent over the subspaces, each step exact: codes by the quadratic cost of every codeword, codewords by
  least squares.
* The same for convolutions (Q-CNN Sec. 3.2, groups = 1, zero padding): the layer's input is unfolded into
  patches, so its response is a sum over kernel positions p and subspaces j of ``U_pj D_code(o,p,j)``; a code
  step per (p, j) is exact as for Linear layers, and since one codebook serves every kernel position, each
  codebook is refitted jointly by least squares over all its positions (the normal equations reduce to the d x d
  cross-Gram matrices ``U_pjᵀ U_qj``), with a small proximal term so that unused codewords stay and no pass
  increases the error. Patches are subsampled (``max_rows``, seeded) to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..forms.pq import ProductQuantized
from ..masks import prunable_layers
from ..plan import CODEBOOK, oneshot_then_finetuned
from ..registry import MethodConfig, StageContext, option, register

__all__ = ["ProductQuantized", "kmeans_vectors", "product_quantize", "residual_quantize", "quantize_vectors",
           "refine_response", "refine_conv_response", "refine_model_response", "PQConfig", "rows_of"]


def rows_of(w: Tensor) -> Tensor:
    """The rows a weight is quantized as: (out, in) for Linear, (out·kh·kw, in) for a convolution."""
    if w.dim() == 2:
        return w
    return w.movedim(1, -1).reshape(-1, w.shape[1])


def kmeans_vectors(x: Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means of the rows of ``x`` (n, d): k-means++ seeding (seeded), Lloyd iterations; returns the centroids
    (k', d) (k' = min(k, n)) and each row's code (n,). Empty clusters are re-seeded at the worst-fitted row."""
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    cents = [x[int(torch.randint(n, (1,), generator=g, device="cpu"))]]
    d2 = ((x - cents[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            i = int(torch.multinomial((d2 / total).cpu(), 1, generator=g))  # a CPU generator draws on the CPU
        else:  # every row is a centroid already: any row
            i = int(torch.randint(n, (1,), generator=g, device="cpu"))
        cents.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(cents)
    codes = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        dist = torch.cdist(x, c) ** 2
        new = dist.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, new, x)
        counts = torch.bincount(new, minlength=k).double()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # an empty cluster takes the row that is worst fitted now
            worst = dist.gather(1, new[:, None]).squeeze(1).argsort(descending=True)
            c[empty] = x[worst[: int(empty.sum())]]
        if torch.equal(new, codes):
            break
        codes = new
    codes = (torch.cdist(x, c) ** 2).argmin(1)
    return c.float(), codes


def _segments(rows: Tensor, sub_dim: int) -> Tensor:
    """(rows, cols) -> (rows, S, d) with S = ceil(cols / sub_dim) segments of d = ceil(cols / S) <= sub_dim
    columns (the layout a file records with S alone), the last segment zero-padded."""
    n, cols = rows.shape
    s = -(-cols // sub_dim)
    d = -(-cols // s)
    padded = torch.zeros(n, s * d, dtype=rows.dtype, device=rows.device)
    padded[:, :cols] = rows
    return padded.reshape(n, s, d)


def product_quantize(w: Tensor, sub_dim: int, k: int, seed: int = 0) -> ProductQuantized:
    """Gong et al. Sec. 3.3: k-means per segment position over the rows' segments of ``sub_dim`` columns."""
    segs = _segments(rows_of(w.detach()), sub_dim)
    n, s, d = segs.shape
    books = torch.zeros(1, s, min(k, n), d, device=w.device)
    codes = torch.zeros(1, n, s, dtype=torch.long, device=w.device)
    for j in range(s):
        c, codes[0, :, j] = kmeans_vectors(segs[:, j], k, seed=seed + j)
        books[0, j, : c.shape[0]] = c
    return ProductQuantized(books, codes, tuple(w.shape))


def residual_quantize(w: Tensor, k: int, stages: int, seed: int = 0) -> ProductQuantized:
    """Gong et al. Sec. 3.4: whole rows quantized by k-means, then the residual, ``stages`` times."""
    rows = rows_of(w.detach()).float()
    n, d = rows.shape
    books = torch.zeros(stages, 1, min(k, n), d, device=w.device)
    codes = torch.zeros(stages, n, 1, dtype=torch.long, device=w.device)
    residual = rows.clone()
    for t in range(stages):
        c, codes[t, :, 0] = kmeans_vectors(residual, k, seed=seed + 1000 * t)
        books[t, 0, : c.shape[0]] = c
        residual = residual - c[codes[t, :, 0]]
    return ProductQuantized(books, codes, tuple(w.shape))


@torch.no_grad()
def quantize_vectors(model: nn.Module, kind: str = "pq", *, sub_dim: int = 4, k: int = 256, stages: int = 2,
                     layers: str = "all", seed: int = 0) -> dict[str, dict[str, Any]]:
    """Replace each Linear (and, with ``layers="all"``, Conv) weight by its vector-quantized form, in place.
    Returns per layer: bits per weight of the codes plus codebooks (float32), and the relative RMS error. A layer
    whose codebooks and codes would take 32 bits per weight or more (few rows: the codebooks dominate) stays
    float and is reported as skipped."""
    check_finite_model("pq", model)
    out = {}
    for name, m in prunable_layers(model, "pq").items():
        if layers == "fc" and not isinstance(m, nn.Linear):
            continue
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"pq: layer {name!r} already holds parametrized weights (masks or codebooks); vector "
                             "quantization starts from float weights.")
        w = m.weight.detach().clone()
        par = product_quantize(w, sub_dim, k, seed) if kind == "pq" else residual_quantize(w, k, stages, seed)
        t, s, kk, d = par.codebooks.shape
        bits = par.codes.numel() * max(1, (kk - 1).bit_length()) + 32 * par.codebooks.numel()
        if bits >= 32 * w.numel():
            out[name] = {"skipped": f"{bits / w.numel():.1f} bits per weight would not be smaller than float32"}
            continue
        parametrize.register_parametrization(m, "weight", par, unsafe=True)
        out[name] = {"bits_per_weight": bits / w.numel(), "codebook_size": kk, "stages": t, "subspaces": s,
                     "relative_rms_error": float((m.weight - w).norm() / w.norm().clamp_min(1e-12))}
    if not any("skipped" not in v for v in out.values()):
        raise ValueError(f"pq: no layer to quantize (layers={layers!r}, or every layer too small for its "
                         "codebooks).")
    return out


@torch.no_grad()
def refine_response(par: ProductQuantized, x_in: Tensor, target: Tensor, iters: int, damp: float = 1e-6) -> list[float]:
    """Q-CNN's response-error refinement of one Linear layer's product quantization, in place.

    ``x_in`` (N, in): the layer's inputs in the quantized network; ``target`` (N, out): the original layer's
    response (without bias). For each subspace j in turn, with the other subspaces' contributions fixed
    (R = target − x̃ Ŵᵀ + x̃_j Ŵ_jᵀ), every output row's code is the codeword D_k minimising
    ‖R_c − x̃_j D_k‖² = D_kᵀ G D_k − 2 P_cᵀ D_k + const (G = x̃_jᵀ x̃_j, P = x̃_jᵀ R), and every used codeword is
    the least-squares fit of its rows, D_k = G⁻¹ mean_{c: code k} P_c. Returns the relative response error
    ‖target − x̃ Ŵᵀ‖ / ‖target‖ before the first pass and after each pass."""
    t, s, k, d = par.codebooks.shape
    if t != 1 or len(par.shape) != 2:
        raise ValueError("refine_response: product quantization (one stage) of a Linear weight only.")
    xs = _segments(x_in.float(), d)  # (N, S, d), zero-padded like the weight (sub_dim d gives back S segments)
    books, codes = par.codebooks.data[0], par.codes[0]                     # (S, k, d), (rows, S)
    norm = target.norm().clamp_min(1e-12)

    def approx() -> Tensor:  # x̃ Ŵᵀ from the current codebooks
        w_rows = books[torch.arange(s, device=codes.device)[None, :], codes]                    # (rows, S, d)
        return torch.einsum("nsd,rsd->nr", xs, w_rows)

    errors = [float((target - approx()).norm() / norm)]
    eye = torch.eye(d, device=xs.device)
    for _ in range(iters):
        for j in range(s):
            xj = xs[:, j]                                                  # (N, d)
            wj = books[j][codes[:, j]]                                     # (rows, d)
            r = target - approx() + xj @ wj.T                              # (N, rows)
            g = xj.T @ xj
            g = g + damp * (g.diagonal().mean() + 1e-12) * eye
            p = xj.T @ r                                                   # (d, rows)
            cost = ((books[j] @ g) * books[j]).sum(1)[None, :] - 2 * p.T @ books[j].T   # (rows, k)
            codes[:, j] = cost.argmin(1)
            count = torch.bincount(codes[:, j], minlength=k).float()
            sums = torch.zeros(k, d, device=p.device).index_add_(0, codes[:, j], p.T)
            used = count > 0
            books[j, used] = torch.linalg.solve(g, (sums[used] / count[used, None]).T).T
        errors.append(float((target - approx()).norm() / norm))
    return errors


def _patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The inputs of ``conv`` as (N·L, P, C) patches: L output positions, P kernel positions, C input channels."""
    u = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, C·P, L)
    n, _, positions = u.shape
    c = conv.in_channels
    return u.reshape(n, c, -1, positions).permute(0, 3, 2, 1).reshape(n * positions, -1, c)


@torch.no_grad()
def refine_conv_response(par: ProductQuantized, u: Tensor, target: Tensor, iters: int,
                         damp: float = 1e-6) -> list[float]:
    """Q-CNN's response-error refinement of one convolution's product quantization (groups = 1), in place.

    ``u`` (M, P, C): input patches of the quantized network (:func:`_patches`); ``target`` (M, O): the original
    layer's response at those patches (without bias). Per subspace j: for each kernel position p, every output
    channel's code is the codeword minimising the exact quadratic cost of its residual (as
    :func:`refine_response`); then codebook j, shared by all positions, is the least-squares fit of the residual
    over all positions at once, ``H vec(D) = b`` with ``H_kk' = Σ_o Σ_{p,q: codes k, k'} U_pjᵀU_qj``, plus a
    proximal term ``λ‖D − D_old‖²`` (λ = damp · mean diagonal of H) that keeps unused codewords. Returns the
    relative response error before the first pass and after each pass."""
    t, s, k, d = par.codebooks.shape
    if t != 1 or len(par.shape) != 4:
        raise ValueError("refine_conv_response: product quantization (one stage) of a Conv2d weight only.")
    o, c = par.shape[0], par.shape[1]
    positions = par.shape[2] * par.shape[3]
    m = u.shape[0]
    us = torch.zeros(m, positions, s * d, dtype=torch.float64, device=u.device)
    us[:, :, :c] = u.double()
    us = us.reshape(m, positions, s, d)
    target = target.double()
    books = par.codebooks.data[0].double()                                 # (S, k, d)
    codes = par.codes[0].reshape(o, positions, s)                          # a view: updates land in the buffer
    norm = target.norm().clamp_min(1e-12)

    def weight() -> Tensor:                                                # (O, P, S, d)
        return books[torch.arange(s, device=codes.device)[None, None, :], codes]

    approx = torch.einsum("mpsd,opsd->mo", us, weight())
    errors = [float((target - approx).norm() / norm)]
    for _ in range(iters):
        for j in range(s):
            for p in range(positions):                                     # codes: exact per (p, j)
                x = us[:, p, j]
                old = books[j][codes[:, p, j]]                             # (O, d)
                r = target - approx + x @ old.T
                g = x.T @ x
                cost = ((books[j] @ g) * books[j]).sum(1)[None, :] - 2 * (x.T @ r).T @ books[j].T   # (O, k)
                codes[:, p, j] = cost.argmin(1)
                approx += x @ (books[j][codes[:, p, j]] - old).T
            xj = us[:, :, j]                                               # (M, P, d)
            cj = codes[:, :, j]                                            # (O, P)
            old = books[j][cj]                                             # (O, P, d)
            r = target - approx + torch.einsum("mpd,opd->mo", xj, old)
            cross = torch.einsum("mpd,mqe->pqde", xj, xj)                  # (P, P, d, d)
            pair = (cj[:, :, None] * k + cj[:, None, :]).reshape(-1)
            h = torch.zeros(k * k, d, d, dtype=torch.float64, device=cross.device).index_add_(
                0, pair, cross[None].expand(o, -1, -1, -1, -1).reshape(-1, d, d))
            h = h.reshape(k, k, d, d).permute(0, 2, 1, 3).reshape(k * d, k * d)
            b = torch.zeros(k, d, dtype=torch.float64, device=cross.device).index_add_(
                0, cj.reshape(-1), torch.einsum("mpd,mo->opd", xj, r).reshape(-1, d)).reshape(-1)
            lam = damp * float(h.diagonal().mean()) + 1e-12
            h.diagonal().add_(lam)
            books[j] = torch.linalg.solve(h, b + lam * books[j].reshape(-1)).reshape(k, d)
            approx += torch.einsum("mpd,opd->mo", xj, books[j][cj] - old)
        errors.append(float((target - approx).norm() / norm))
    par.codebooks.data[0] = books.float()
    return errors


@torch.no_grad()
def refine_model_response(model: nn.Module, dense: nn.Module, x: Tensor, iters: int, max_rows: int = 20_000,
                          seed: int = 0) -> dict[str, list[float]]:
    """:func:`refine_response` for every product-quantized Linear layer of ``model`` and
    :func:`refine_conv_response` for every product-quantized Conv2d (groups = 1, zero padding; others are left
    as Gong's), in forward order, with the error correction of Q-CNN Sec. 3.3: each layer's inputs come from
    ``model`` as quantized so far, its target from ``dense`` (the original network) on the same ``x``. A
    convolution's patches are subsampled to ``max_rows`` (seeded by ``seed``)."""
    out = {}
    lin = [(n, m) for n, m in model.named_modules() if (isinstance(m, nn.Linear) or (
        isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"))
        and parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations["weight"][0], ProductQuantized)]
    g = torch.Generator().manual_seed(seed)
    for name, m in lin:
        par = m.parametrizations["weight"][0]
        if par.codebooks.shape[0] != 1:
            continue
        seen: dict[str, Tensor] = {}
        hooks = [mod.register_forward_hook(lambda _m, a, _o, key=key, store=seen: store.__setitem__(key, a[0]))
                 for key, mod in (("q", m), ("d", dense.get_submodule(name)))]
        was = model.training, dense.training
        try:
            model.eval()
            dense.eval()
            model(x)
            dense(x)
        finally:
            for h in hooks:
                h.remove()
            model.train(was[0])
            dense.train(was[1])
        w = dense.get_submodule(name).weight.detach()
        if isinstance(m, nn.Linear):
            out[name] = refine_response(par, seen["q"].flatten(1), seen["d"].flatten(1) @ w.T, iters)
            continue
        uq, ud = _patches(seen["q"], m), _patches(seen["d"], m)
        keep = torch.randperm(uq.shape[0], generator=g, device="cpu")[:max_rows]
        uq, ud = uq[keep], ud[keep]
        target = torch.einsum("mpc,opc->mo", ud, w.movedim(1, -1).reshape(w.shape[0], -1, w.shape[1]))
        out[name] = refine_conv_response(par, uq, target, iters)
    return out


@dataclass(frozen=True)
class PQConfig(MethodConfig):
    owner: ClassVar[str] = "pq"
    kind: str = option("pq", "pq: product quantization (segments of sub_dim); rq: residual quantization of whole "
                             "rows in `stages` codebooks", choices=("pq", "rq"))
    sub_dim: int = option(4, "pq: columns per segment (Gong's s = in / sub_dim segments)", low=1, high=4096)
    k: int = option(256, "centroids per codebook (codes take ceil(log2 k) bits)", low=2, high=65536)
    stages: int = option(2, "rq: number of residual stages", low=1, high=16)
    layers: str = option("all", "all: Linear and Conv (Q-CNN's layout for convolutions); fc: Linear only",
                         choices=("all", "fc"))
    seed: int = option(0, "seed of the k-means++ seeding and of the samples drawn", low=0)
    response_iters: int = option(0, "Q-CNN: passes of response-error refinement of the Linear and Conv2d layers' "
                                    "codebooks and codes on training inputs (0: Gong's weight-error k-means only)",
                                 low=0)
    response_samples: int = option(2000, "training inputs the response error is measured on", low=1)

    def validate(self) -> None:
        if self.response_iters and self.kind != "pq":
            raise ValueError("pq: response_iters refines product quantization only; set kind=pq.")


@register("pq", family="quantization",
          compare=oneshot_then_finetuned("pq", CODEBOOK), quick={"k": 4, "sub_dim": 4},
          kind="quantizer", config=PQConfig, gives="pq", needs_data=lambda c: c.response_iters > 0,
          citation="Gong, Liu, Yang, Bourdev 2014, Compressing Deep Convolutional Networks using Vector "
                   "Quantization, Sec. 3.3-3.4; conv layout and response-error refinement as Wu et al. 2016 "
                   "(Q-CNN), Sec. 3.1-3.3, Eq. (4)",
          summary="product / residual vector quantization of weights: codebooks + codes per layer")
def _run_pq(model: nn.Module, cfg: PQConfig, ctx: StageContext) -> dict[str, Any]:
    import copy

    dense = copy.deepcopy(model) if cfg.response_iters else None
    out: dict[str, Any] = {"layers": quantize_vectors(model, cfg.kind, sub_dim=cfg.sub_dim, k=cfg.k,
                                                      stages=cfg.stages, layers=cfg.layers, seed=cfg.seed)}
    if cfg.response_iters:
        train = ctx.require_data("pq").train
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(train), generator=g, device="cpu")[: cfg.response_samples]
        out["response_error"] = refine_model_response(model, dense, train.x[idx], cfg.response_iters,
                                                      seed=cfg.seed)
    return out
