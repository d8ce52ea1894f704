"""The gradient exchange of the sharded WoodFisher (several ranks under torchrun; docs/distributed.md).

Each rank owns a contiguous run of Fisher blocks (:func:`distributed.owner_ranges`), computes its share of the
per-sample gradients and receives every sample's entries of its own blocks, so that it can invert them alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import distributed as ddp
from ...stats import gradient_rows

__all__ = ["exchange_chunk", "gradient_columns"]


def exchange_chunk(num_grads: int, ranks: int) -> int:
    """Gradient rows each rank sends per all-to-all of the sharded fit: at most 32, and at most m/4W so that the
    two exchange buffers stay under half a rank's share of the gradients."""
    return max(1, min(32, num_grads // (4 * ranks)))


def gradient_columns(job: Any) -> tuple[Tensor, list[Tensor]]:
    """Every gradient row's entries in this rank's columns (``job``: the fit's ``curvature.FitJob``, which imports
    this module). Rank r computes rows i ≡ r (mod W), ``chunk`` at a
    time; after each chunk one all-to-all sends every rank the columns of its blocks, so a rank never holds more
    than its (m, d/W) share plus two exchange buffers of ``chunk`` x W rows of d/W (chunk <= m/4W, so the buffers
    stay under half the share). Returns the (num_grads, hi - lo) columns and the two buffers, which the caller
    frees after the inversions (see :func:`distributed.mapped_large_allocations`)."""
    import torch.distributed as dist

    rank, size = ddp.world()
    c, sizes = job.cfg, job.shard_sizes
    cuts = [0]
    for n in sizes:
        cuts.append(cuts[-1] + n)
    width = max(sizes)  # gloo's all-to-all takes equal shapes: pad to the widest share
    chunk = exchange_chunk(c.num_grads, size)
    out = torch.empty(c.num_grads, sizes[rank])
    send, recv = torch.zeros(size, chunk, width), torch.empty(size, chunk, width)
    rows = gradient_rows(job.model, job.data, job.layout.tensors, c.num_grads, c.grad_batch, c.seed,
                         progress=job.progress, every=(rank, size))
    for first in range(0, c.num_grads, chunk * size):  # global rows first .. first + chunk*size - 1
        for j in range(len(range(first + rank, min(first + chunk * size, c.num_grads), size))):
            _, row = next(rows)
            for q in range(size):
                send[q, j, :sizes[q]] = row[cuts[q]:cuts[q + 1]]
        dist.all_to_all(list(recv.unbind(0)), list(send.unbind(0)))
        for r in range(size):  # rank r's j-th row of this chunk is global row first + r + j*size
            for j, i in enumerate(range(first + r, min(first + chunk * size, c.num_grads), size)):
                out[i].copy_(recv[r, j, :sizes[rank]])  # row by row: no chunk-sized temporary
    rows.close()
    return out, [send, recv]
