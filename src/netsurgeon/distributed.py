"""Data-parallel training and sharded statistics under ``torchrun`` (torch.distributed; gloo on CPU).

Nothing here is needed in a single process: every helper is a no-op (or the identity) when no process group
is initialised or the world has one rank, so library code calls them unconditionally.

The rules that keep ranks identical (docs/distributed.md):

* each global mini-batch of the single-process run is split across ranks (rank r takes rows r, r + W, ...),
  unless the user's DataLoader has a ``DistributedSampler`` (each rank's batches are then its own, used whole);
  the gradients are summed with weights n_r / n over the ranks, which is the gradient of the global mean
  loss, so a W-rank run follows the single-process trajectory up to float rounding;
* every mask decision reads only what is identical on all ranks: the weights (identical after the same
  averaged gradients and the same optimizer), the method's own seeded generator (the same stream on every
  rank), and statistics all-reduced over ranks (AutoPrune's validation gradients);
* BatchNorm running statistics, the one state a rank computes from its own rows, are averaged over ranks at
  each epoch's end, before validation and checkpoints;
* :func:`check_identical` compares a digest of every parameter and mask across ranks (at each epoch's end and
  at the end of training) and stops with the first tensor that differs, rather than training on silently.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["init_from_env", "leave", "world", "is_main", "barrier", "shard_rows", "rank_local", "sum_weighted_grads",
           "all_reduce_sum", "average_batchnorm_stats", "check_identical", "gather_rng_states", "owner_ranges",
           "all_gather_concat", "mapped_large_allocations"]

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return world()[0] == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1); returns whether
    this process is one of several ranks. ``backend``: ``NETSURGEON_DIST_BACKEND`` or gloo (netsurgeon trains
    on the CPU; nccl needs the model and batches on the GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return False
    if not dist.is_initialized():
        backend = backend or os.environ.get("NETSURGEON_DIST_BACKEND", "gloo")
        # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when it is imported;
        # imported after the group exists (the first optimizer imports it, through torch._inductor) it holds ten
        # references to the group, so destroy_process_group no longer joins gloo's worker threads. Imported now,
        # its defaults are None.
        import torch.distributed.nn.functional  # noqa: F401

        dist.init_process_group(backend)
        atexit.register(leave)
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def leave() -> None:
    """Leave the process group (a no-op without one); :func:`init_from_env` registers it to run at exit.

    A rank must not reach interpreter shutdown with gloo's worker threads alive: a thread still releasing a
    finished collective's tensors then needs the GIL of a finalizing interpreter, and the process aborts
    ("terminate called without an active exception", SIGABRT; 1 in ~25 CLI runs under load). Destroying the
    group while the interpreter is whole joins those threads."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def rank_local(loader: object) -> bool:
    """True under torchrun when ``loader`` already gives each rank its own samples: a DataLoader whose sampler
    (or its batch sampler's) is a ``DistributedSampler``. Its batches are then used whole, not split again."""
    if world()[1] == 1:
        return False
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    return isinstance(sampler, DistributedSampler) or isinstance(getattr(batch_sampler, "sampler", None),
                                                                 DistributedSampler)


def shard_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's rows of a global mini-batch: rows ``rank, rank + W, ...`` (all of them in one process). Callers
    skip it for batches of a rank-local loader (:func:`rank_local`), decided once per run."""
    rank, size = world()
    if size == 1:
        return x, y
    return x[rank::size], y[rank::size]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (identity in one process); returns ``t``."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def sum_weighted_grads(params: Sequence[Tensor], n_local: int) -> int:
    """Replace each ``p.grad`` by Σ_r (n_r / n) · grad_r over ranks, where n_r is each rank's number of rows and
    n their total: the gradient of the mean loss over the whole global batch. One flat all-reduce (the bucket of
    DDP, without the overlap). A parameter without a gradient gets none on any rank (the graphs are the same).
    Returns n."""
    if world()[1] == 1:
        return n_local
    counts = torch.tensor([float(n_local)], dtype=torch.float64)
    dist.all_reduce(counts)
    n = int(counts.item())
    have = [p for p in params if p.grad is not None]
    if not have:
        return n
    flat = torch.cat([p.grad.reshape(-1) for p in have]) * (n_local / n)
    dist.all_reduce(flat)
    off = 0
    for p in have:
        k = p.grad.numel()
        p.grad.copy_(flat[off:off + k].view_as(p.grad))
        off += k
    return n


def average_batchnorm_stats(model: nn.Module) -> None:
    """Average every BatchNorm's running mean and variance over ranks (each rank saw only its own rows)."""
    size = world()[1]
    if size == 1:
        return
    bufs = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var) if b is not None]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).double() for b in bufs])
    dist.all_reduce(flat)
    flat /= size
    off = 0
    for b in bufs:
        b.copy_(flat[off:off + b.numel()].view_as(b).to(b.dtype))
        off += b.numel()


def _digest(t: Tensor) -> bytes:
    return hashlib.blake2b(t.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


def check_identical(named: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Raise on every rank if any named tensor differs between ranks (compared by a 128-bit digest of its bytes).

    The error names the first tensor that differs: ranks whose masks or weights diverged would otherwise train
    on and write a model that no rank actually holds."""
    rank, size = world()
    if size == 1:
        return
    items = list(named)
    mine = torch.tensor(list(b"".join(_digest(t) for _, t in items)), dtype=torch.uint8)
    allv = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(allv, mine)
    for i, (name, _) in enumerate(items):
        ref = allv[0][16 * i:16 * (i + 1)]
        for r in range(1, size):
            if not torch.equal(allv[r][16 * i:16 * (i + 1)], ref):
                raise RuntimeError(f"distributed: {what}: {name!r} differs between rank 0 and rank {r}; the ranks "
                                   "diverged (a method drew from an unshared random stream or used rank-local "
                                   "statistics).")


def gather_rng_states() -> list[Tensor]:
    """Every rank's global torch RNG state (for checkpoints written by rank 0); ``[own]`` in one process."""
    mine = torch.get_rng_state()
    size = world()[1]
    if size == 1:
        return [mine]
    out = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(out, mine)
    return out


def owner_ranges(blocks: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Split consecutive blocks ``[(start, stop), ...]`` into ``size`` contiguous runs of blocks holding about
    equal numbers of entries; returns each rank's ``(first block, end block)``. A block is never split (its
    inverse lives on one rank); a rank gets no block when there are fewer blocks than ranks."""
    total = sum(b - a for a, b in blocks)
    bounds, acc, j = [0], 0, 0
    for r in range(1, size):
        target = total * r / size
        while j < len(blocks) and acc + (blocks[j][1] - blocks[j][0]) / 2 <= target:
            acc += blocks[j][1] - blocks[j][0]
            j += 1
        bounds.append(j)
    bounds.append(len(blocks))
    return [(bounds[r], bounds[r + 1]) for r in range(size)]


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@contextmanager
def mapped_large_allocations(nbytes: int = 1 << 20) -> Iterator[None]:
    """Inside: glibc's mmap threshold fixed at ``nbytes``, so every large temporary is mapped and unmapped instead
    of fragmenting the heap. glibc otherwise raises the threshold to the size of the largest block freed so far
    (up to 32 MiB), and after that the 8-32 MiB temporaries of a Fisher inversion come from the heap and stay
    there. Measured on WoodFisher's LeNet-5 fit (B = 2000, m = 1000): a single process peaked at 8.6 or 11.7 GiB
    from run to run for the same 8.0 GiB of statistics, a rank of the sharded fit 1.5 GiB above its share. On
    exit the threshold is set to 32 MiB, glibc's own ceiling (the dynamic rule cannot be restored). A no-op off
    glibc."""
    _mallopt_mmap_threshold(nbytes)
    try:
        yield
    finally:
        _mallopt_mmap_threshold(32 << 20)


def all_gather_concat(part: Tensor, sizes: Sequence[int]) -> Tensor:
    """Concatenate every rank's 1-D ``part`` (rank r's has ``sizes[r]`` entries) in rank order, on every rank."""
    size = world()[1]
    if size == 1:
        return part
    width = max(max(sizes), 1)
    padded = torch.zeros(width, dtype=part.dtype)
    padded[:part.numel()] = part
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes, strict=True)])
