"""One rank of the distributed tests (tests/test_distributed.py launches it with torchrun).

    torchrun --nproc_per_node 2 tests/dist_worker.py SCENARIO OUT_DIR

Scenarios:
  methods     every training-time method for a few steps; each rank saves the state it ends with
  woodfisher  sharded WoodFisher (and WoodTaylor) fit + prune; each rank saves the pruned state
  train       DNS training with periodic checkpoints (``--resume`` continues one; a 4th number kills the last rank
              once a checkpoint past that step exists); each rank saves the end
  plain       plain training, each rank saves the end (compared with a 1-rank run)
  loader      DNS and AutoPrune on DataLoaders with a DistributedSampler (each rank its own samples)
  diverge     rank 1 perturbs its weights: the run must stop with the tensor named
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

import netsurgeon as ns
from netsurgeon import distributed as ddp

# every training-time method, a few steps each (options that make a few steps meaningful)
METHODS = {  # name -> (registered method, options)
    "dns": ("dns", {"c_rate": 1.0, "gamma": 0.5}),
    "autoprune": ("autoprune", {"mu": 5.0, "m_lr": 0.05, "val_batch": 64}),
    "magnitude": ("magnitude", {"sparsity": 0.8, "rounds": 2}),
    "gradual": ("gradual", {"target": 0.8, "start": 0, "end": 10, "every": 2}),
    "gradual_woodfisher": ("gradual", {"target": 0.8, "start": 0, "end": 10, "every": 5, "scorer": "woodfisher",
                                       "num_grads": 16, "block_size": 200}),
    "binaryconnect": ("binaryconnect", {"stochastic": True}),
    "bnn": ("bnn", {}),
    "xnor": ("xnor", {}),
    "lab": ("lab", {}),
    "soft_sharing": ("soft_sharing", {"init_std": 0.005}),  # random weights: narrow, or all go to zero
    "distill": ("distill", {}),
    "qat": ("qat", {}),
    "hashednets": ("hashednets", {}),
    "fixed_point": ("fixed_point", {"rounding": "stochastic"}),
    "fewmult": ("fewmult", {}),
    "hwgq": ("hwgq", {}),
    "ssl": ("ssl", {"lam_filter": 0.01}),
    "biased_decay": ("biased_decay", {}),
    "distort": ("distort", {}),
}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    ddp.init_from_env()
    rank, size = ddp.world()
    (out / f"pid{rank}").write_text(str(os.getpid()))
    data = ns.data.digits(seed=0)
    torch.manual_seed(0)
    base = ns.build_model("digits_cnn", data.input_shape)
    torch.optim.SGD(base.parameters(), lr=0.1)  # the first optimizer imports torch._inductor after the group exists
    if scenario == "methods":
        names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(METHODS)
        for name in names:
            model = copy.deepcopy(base)
            method, extra = METHODS[name]
            opts = {"epochs": 2, "max_steps": 12, "batch_size": 32, "lr": 0.05, **extra}
            ns.Pipeline.from_spec([{method: opts}]).run(model, data)
            torch.save(state(model), out / f"{name}_rank{rank}.pt")
    elif scenario == "woodfisher":
        from netsurgeon.pruning.woodfisher import FisherConfig, OneShotPruner

        for method, update in (("woodfisher", "single"), ("woodfisher", "joint"), ("woodtaylor", "single")):
            model = copy.deepcopy(base)
            fisher = FisherConfig(num_grads=37, block_size=300, damp=1e-3 if method == "woodfisher" else 0.1)
            pruner = OneShotPruner(method, fisher, update).fit(model, data.train)
            pruner.prune(model, 0.7)
            torch.save({**state(model), "_shard": torch.tensor(pruner.shard_ or (0, 0))},
                       out / f"{method}_{update}_rank{rank}.pt")
    elif scenario == "train":
        steps = int(sys.argv[3])
        kill_after = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4].isdigit() else 0
        resume = "--resume" in sys.argv
        ckpt = out / "ckpt.pt"
        cb = ns.pruning.dns.DNS(c_rate=1.0, gamma=0.5)
        cfg = ns.TrainConfig(epochs=100, max_steps=steps, batch_size=32, lr=0.05, seed=3)
        class Kill(ns.Callback):  # always present (a checkpoint records how many callbacks a run has)
            def after_step(self, trainer=None) -> None:
                if kill_after and rank == size - 1 and trainer.step > kill_after and ckpt.is_file():
                    os.kill(os.getpid(), 9)  # this rank dies abruptly, as a lost machine would

        callbacks = [cb, Kill()]
        ns.train(base, data, cfg, callbacks=callbacks, checkpoint=ckpt, checkpoint_every=5, resume=resume)
        cb.finalize(base)
        torch.save(state(base), out / f"final_rank{rank}.pt")
    elif scenario == "loader":  # the user's DataLoaders with DistributedSampler: each rank its own samples
        from torch.utils.data import DataLoader, TensorDataset
        from torch.utils.data.distributed import DistributedSampler

        def loader(split, shuffle: bool) -> DataLoader:
            ds = TensorDataset(split.x, split.y)
            return DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds, shuffle=shuffle, seed=0))

        tr = loader(data.train, True)
        seen = []
        class Rows(ns.Callback):  # the first batch this rank trained on
            def loss(self, out, batch, trainer=None):
                if not seen:
                    seen.append(batch[1].clone())
                return None

        loaders = ns.data.from_loaders(tr, loader(data.val, False))
        for name, cb in (("dns", ns.pruning.dns.DNS(c_rate=1.0, gamma=0.5)),
                         ("autoprune", ns.pruning.autoprune.AutoPrune(mu=5.0, m_lr=0.05, val_batch=64))):
            model = copy.deepcopy(base)
            seen.clear()
            ns.train(model, loaders, ns.TrainConfig(epochs=2, lr=0.05, seed=3), callbacks=[cb, Rows()])
            cb.finalize(model)
            torch.save({**state(model), "_first_labels": seen[0]}, out / f"loader_{name}_rank{rank}.pt")
    elif scenario == "plain":  # plain training: compared with a 1-rank run
        ns.train(base, data, ns.TrainConfig(epochs=1, max_steps=30, batch_size=32, lr=0.05, seed=3))
        torch.save(state(base), out / f"final_rank{rank}.pt")
    elif scenario == "diverge":  # rank 1 changes its weights on its own: the epoch-end check must stop the run
        class Drift(ns.Callback):
            def after_step(self, trainer=None) -> None:
                if rank == 1 and trainer.step == 3:
                    with torch.no_grad():
                        next(base.parameters()).add_(1e-3)

        ns.train(base, data, ns.TrainConfig(epochs=1, batch_size=256, lr=0.05), callbacks=[Drift()])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    ddp.barrier()
    ddp.leave()  # what the exit handler does; the threads left afterwards are recorded for the tests
    (out / f"threads_rank{rank}.txt").write_text("\n".join(_thread_names()))


def _thread_names() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else []


if __name__ == "__main__":
    main()
