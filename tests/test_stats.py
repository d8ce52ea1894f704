import json
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netsurgeon as ns
from netsurgeon.masks import attach_masks
from netsurgeon.stats import count_nonzero, layer_flops, measure_latency, num_threads, total_flops


def test_count_nonzero_sees_masks_and_norms():
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    attach_masks(m)["0.weight"].mask[0] = 0
    # weight 12 - 4 masked, bias 3, BN weight 3 (ones) + BN bias 3 (zeros)
    assert count_nonzero(m) == (8 + 3 + 3, 12 + 3 + 6)


def test_dense_flops_match_torch_flop_counter():
    torch.manual_seed(0)  # unseeded, a random init drew an exact 0.0 weight in ~3 of 80 builds (eff < dense)
    for name in ("lenet5", "lenet300"):
        m = ns.build_model(name)
        with FlopCounterMode(display=False) as fc:
            m(torch.zeros(1, 1, 28, 28))
        dense, eff = total_flops(m, (1, 28, 28))
        assert dense == fc.get_total_flops()
        assert eff == dense


def test_effective_flops_count_only_nonzero_weights():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 5))
    masks = attach_masks(m)
    masks["0.weight"].mask[0] = 0            # half the conv filters
    masks["2.weight"].mask[:, :16] = 0       # half the fc inputs
    rows = {r.name: r for r in layer_flops(m, (1, 6, 6))}
    assert rows["0"].dense == 2 * 16 * 18 and rows["0"].effective == 2 * 16 * 9
    assert rows["2"].dense == 2 * 160 and rows["2"].effective == 2 * 80


def test_latency_is_a_ratio_against_the_reference():
    small, big = nn.Linear(8, 8), nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    lat = measure_latency(nn.Sequential(nn.Linear(256, 8)), big, torch.randn(64, 256), repeats=10, threads=1)
    assert lat.batch == 64 and lat.threads == 1
    assert lat.speedup > 2  # one small layer beats eight large ones
    assert small is not None


def test_num_threads_restores():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


_FAULTS = """
import json, resource, torch
from netsurgeon.stats import keep_freed_memory

def faults():  # minor page faults of each of 12 allocations of 40 MB (above glibc's largest mmap threshold)
    out = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(10_000_000).fill_(1.0)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

print(json.dumps([faults(), keep_freed_memory() != "default", faults()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.slow  # seconds (a subprocess, a large model or tensor): run by .ci/run
def test_keep_freed_memory_stops_large_tensors_from_faulting_their_pages_in_every_time():
    run = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True)
    before, applied, after = json.loads(run.stdout)
    assert applied
    assert all(f > 5000 for f in before)  # 40 MB is ~9,800 pages: each allocation faulted all of them in
    # reused memory does not fault (a few may: this machine's kernel can reclaim idle pages between allocations)
    assert sum(f < 100 for f in after) >= 4


def test_size_words_never_says_a_fraction_smaller():
    from netsurgeon.stats import size_words

    assert size_words(3.944) == "3.94x smaller"
    assert size_words(1.0) == "1.00x smaller"
    assert size_words(0.5) == "2.00x larger"
