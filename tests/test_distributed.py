"""torchrun with 2 CPU ranks (gloo): identical masks, sharded WoodFisher = single process, kill + resume."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import netsurgeon as ns
from netsurgeon import distributed as ddp

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(*args: str, ranks: int = 2, check: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    # faulthandler: a rank that aborts (gloo's "terminate called without an active exception", seen once or twice
    # in a dozen runs on a loaded machine) prints where it was, in the failure message below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
           *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"torchrun failed ({out.returncode}):\n{out.stderr[-8000:]}")
    return out


def load(p: Path) -> dict[str, torch.Tensor]:
    return torch.load(p, weights_only=True)


@pytest.mark.slow  # ~9 s: every training method under torchrun; the quick suite keeps the sharded WoodFisher run
def test_every_training_method_keeps_identical_masks_and_weights_on_two_ranks(tmp_path: Path) -> None:
    torchrun(str(WORKER), "methods", str(tmp_path))
    from dist_worker import METHODS

    for name in METHODS:
        a, b = load(tmp_path / f"{name}_rank0.pt"), load(tmp_path / f"{name}_rank1.pt")
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: ranks differ in {differ}"
    for name in ("dns", "autoprune", "magnitude", "gradual", "gradual_woodfisher"):  # the pruning methods prune
        masks = {k: v for k, v in load(tmp_path / f"{name}_rank0.pt").items() if k.endswith(".mask")}
        assert masks and 0 < float(sum(m.sum() for m in masks.values())) < sum(m.numel() for m in masks.values())


@pytest.mark.slow  # a torchrun launch of its own (~6 s); the quick suite keeps the methods run
def test_distributed_sampler_loaders_give_each_rank_its_own_rows_and_identical_masks(tmp_path: Path) -> None:
    torchrun(str(WORKER), "loader", str(tmp_path))
    for name in ("dns", "autoprune"):
        a, b = load(tmp_path / f"loader_{name}_rank0.pt"), load(tmp_path / f"loader_{name}_rank1.pt")
        la, lb = a.pop("_first_labels"), b.pop("_first_labels")
        assert len(la) == len(lb) == 16 and not torch.equal(la, lb)  # whole batches, different samples
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(k.endswith(".mask") and float(v.mean()) < 1 for k, v in a.items()), name


@pytest.mark.slow  # end to end, seconds: run by .ci/run with the slow cases
def test_sharded_woodfisher_equals_single_process(tmp_path: Path) -> None:
    torchrun(str(WORKER), "woodfisher", str(tmp_path))
    from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

    torch.set_num_threads(1)
    data = ns.data.digits(seed=0)
    torch.manual_seed(0)
    base = ns.build_model("digits_cnn", data.input_shape)
    for method, update in (("woodfisher", "single"), ("woodfisher", "joint"), ("woodtaylor", "single")):
        model = copy.deepcopy(base)
        fisher = FisherConfig(num_grads=37, block_size=300, damp=1e-3 if method == "woodfisher" else 0.1)
        OneShotPruner(method, fisher, update).fit(model, data.train).prune(model, 0.7)
        ref = model.state_dict()
        r0, r1 = load(tmp_path / f"{method}_{update}_rank0.pt"), load(tmp_path / f"{method}_{update}_rank1.pt")
        s0, s1 = tuple(r0.pop("_shard").tolist()), tuple(r1.pop("_shard").tolist())
        assert s0[0] == 0 and s0[1] == s1[0] and s0[1] > 0 and s1[1] > s1[0]  # each rank owned a real share
        for k in ref:
            assert torch.equal(r0[k], r1[k]), f"{method}/{update}: ranks differ in {k}"
            if k.endswith(".mask"):
                assert torch.equal(r0[k], ref[k]), f"{method}/{update}: mask {k} differs from one process"
            else:
                torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{method}/{update} {k}")
    assert_left_the_group(tmp_path)


def assert_left_the_group(out: Path) -> None:
    """After ``ddp.leave()`` no gloo thread is alive on any rank: a rank that exits with them still running can
    abort at interpreter shutdown (the worker made an optimizer, which used to leave the group referenced)."""
    for rank in (0, 1):
        names = (out / f"threads_rank{rank}.txt").read_text().split()
        if not names:
            pytest.skip("no /proc/self/task here to list threads")
        assert not [n for n in names if "gloo" in n], (rank, names)


def test_memory_estimate_per_rank_halves() -> None:
    from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

    p = OneShotPruner("woodfisher", FisherConfig(num_grads=1000, block_size=2000))
    p.sizes_ = [500, 25_000, 400_000, 5_000]
    p.shapes_ = [(20, 25), (50, 500), (500, 800), (10, 500)]
    one, two = p.memory_estimate(430_500, 2000), p.memory_estimate(430_500, 2000, ranks=2)
    assert 0.45 < two["inverses"] / one["inverses"] < 0.55
    assert two["total"] < 0.62 * one["total"]


def test_owner_ranges_split_blocks_evenly_and_never_split_one() -> None:
    blocks = [(0, 100), (100, 200), (200, 1200), (1200, 1300)]
    spans = ddp.owner_ranges(blocks, 2)
    assert spans[0][0] == 0 and spans[-1][1] == len(blocks)
    assert all(a <= b for a, b in spans) and spans[0][1] == spans[1][0]
    assert ddp.owner_ranges(blocks, 8)[-1][1] == 4  # more ranks than blocks: some own none
    assert ddp.owner_ranges([(0, 10)] * 1, 1) == [(0, 1)]


def test_helpers_are_identities_in_one_process() -> None:
    x, y = torch.arange(6.0), torch.arange(6)
    assert ddp.world() == (0, 1) and ddp.is_main()
    assert ddp.shard_rows(x, y)[0] is x
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert ddp.sum_weighted_grads([p], 5) == 5 and torch.equal(p.grad, torch.full((3,), 2.0))
    ddp.check_identical([("p", p)], "test")


@pytest.mark.slow  # a torchrun launch of its own (~6 s); the quick suite keeps the methods run
def test_a_rank_that_diverges_is_stopped_with_the_tensor_named(tmp_path: Path) -> None:
    out = torchrun(str(WORKER), "diverge", str(tmp_path), check=False)
    assert out.returncode != 0
    assert "distributed: epoch 1: 'conv1.weight' differs between rank 0 and rank 1" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_kill_one_rank_then_resume_ends_at_the_uninterrupted_weights(tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(str(WORKER), "train", str(full), "40")
    killed = torchrun(str(WORKER), "train", str(cut), "40", "17", check=False)
    assert killed.returncode != 0 and not (cut / "final_rank0.pt").exists()
    assert (cut / "ckpt.pt").is_file()
    step = int(torch.load(cut / "ckpt.pt", weights_only=True)["step"])
    assert 15 <= step < 40
    torchrun(str(WORKER), "train", str(cut), "40", "--resume")
    a, b = load(full / "final_rank0.pt"), load(cut / "final_rank0.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(torch.equal(b[k], v) for k, v in load(cut / "final_rank1.pt").items())


@pytest.mark.slow
def test_two_ranks_follow_the_single_process_run(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(str(WORKER), "plain", str(one), ranks=1)
    torchrun(str(WORKER), "plain", str(two))
    a, b = load(one / "final_rank0.pt"), load(two / "final_rank0.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    assert_left_the_group(two)


@pytest.mark.slow
def test_cli_compress_under_torchrun_writes_one_file_like_a_single_process(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from netsurgeon.cli import cli

    base = tmp_path / "base.safetensors"
    assert CliRunner().invoke(cli, ["train", "--model", "digits_cnn", "--epochs", "3", "-o", str(base)]).exit_code == 0
    args = [str(base), "--method", "dns", "--set", "c_rate=0.5", "--set", "epochs=3", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "netsurgeon", "compress", *args, "-o", str(tmp_path / "two.nsz")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("two.nsz:") == 1  # rank 0 reports and writes; rank 1 stays quiet
    one = CliRunner().invoke(cli, ["compress", *args, "-o", str(tmp_path / "one.nsz")])
    assert one.exit_code == 0, one.output
    a, b = ns.load_compressed(tmp_path / "one.nsz"), ns.load_compressed(tmp_path / "two.nsz")
    data = ns.data.digits(seed=0)
    acc_a, acc_b = ns.evaluate(a, data.test)[1], ns.evaluate(b, data.test)[1]
    assert abs(acc_a - acc_b) < 0.02, (acc_a, acc_b)
    kept = [float((p != 0).float().mean()) for m in (a, b) for p in [next(m.parameters())]]
    assert abs(kept[0] - kept[1]) < 0.02
