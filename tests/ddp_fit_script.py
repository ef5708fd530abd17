"""Train a small MLP on two seeded Gaussian blobs with `cellmtl.train.fit`.

Run it directly (one process) or under `torchrun --nproc_per_node=N` (DistributedDataParallel, gloo on CPU).
Used by tests/test_train_ddp.py: N processes with per-rank batches of B must reproduce one process with
batches of N*B. Writes to OUT: weights.pt (rank 0, final model state) and history_rank<r>.json (every rank).
"""
import argparse, json, math, os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cellmtl.train import fit, get_device, seed_everything, setup_distributed, teardown_distributed


def make_blobs(n, seed, shift=1.0):
    "Two overlapping seeded 2-D Gaussian blobs at +-(shift, shift): x (n, 2) float32, y (n,) int64."
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 2, generator=generator) + (2 * y[:, None] - 1) * shift  # (n, 2)
    return x, y


class ShardedLoader:
    "Dict batches; order a pure function of (seed, epoch); rank r takes perm[r::world_size] (padded by wrapping)."
    def __init__(self, x, y, batch_size, shuffle=True, seed=0):
        self.x, self.y, self.batch_size, self.shuffle, self.seed, self.epoch = x, y, batch_size, shuffle, seed, 0

    def _place(self):  # resolved lazily: fit creates the process group after the loader is built
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def set_epoch(self, epoch): self.epoch = epoch

    def __len__(self):
        return math.ceil(math.ceil(len(self.x) / self._place()[1]) / self.batch_size)

    def __iter__(self):
        rank, world_size = self._place()
        n = len(self.x)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        per_rank = math.ceil(n / world_size)
        order = torch.cat([order, order[: per_rank * world_size - n]])[rank::world_size]
        for start in range(0, per_rank, self.batch_size):
            index = order[start:start + self.batch_size]
            yield {"x": self.x[index], "y": self.y[index]}  # x: (B, 2), y: (B,)


def loss_fn(model, batch):
    logits = model(batch["x"])  # (B, 2)
    labels = batch["y"] if "y" in batch else batch["labels"]["blob"]
    return {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(1) == labels).float().mean()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="samples per batch on each rank")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--loader", choices=["toy", "csr"], default="toy")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))

    x_train, y_train = make_blobs(512, seed=0)
    x_val, y_val = make_blobs(256, seed=1)
    context = None
    if args.loader == "csr":  # CSRBatchLoader reads rank/world_size when built: join the group first
        import scipy.sparse as sp
        from cellmtl.data import CSRBatchLoader
        context = setup_distributed(get_device("cpu"))
        def csr(x, y, **kwargs):
            return CSRBatchLoader(sp.csr_matrix(x.numpy()), labels={"blob": y.numpy()}, **kwargs)
        train_loader = csr(x_train, y_train, batch_size=args.batch_size, shuffle=True, seed=0)
        val_loader = csr(x_val, y_val, batch_size=64, shuffle=False)
    else:
        train_loader = ShardedLoader(x_train, y_train, args.batch_size, shuffle=True, seed=0)
        val_loader = ShardedLoader(x_val, y_val, 64, shuffle=False)

    seed_everything(0)  # identical initial weights in every process (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))  # no dropout: runs must agree exactly
    history = fit(model, loss_fn, train_loader, val_loader, epochs=args.epochs, lr=0.01, device="cpu",
                  patience=10, lr_schedule="plateau", lr_patience=1, lr_factor=0.5,
                  checkpoint_dir=args.out / "checkpoints", checkpoint_every=2, tensorboard=False, progress=False)
    if context is not None: teardown_distributed(context)

    table = history.df.drop(columns="seconds")
    (args.out / f"history_rank{rank}.json").write_text(json.dumps(
        {"records": table.reset_index().to_dict(orient="records"), "best_epoch": history.best_epoch,
         "stopped_early": history.stopped_early}))
    if rank == 0: torch.save(model.state_dict(), args.out / "weights.pt")


if __name__ == "__main__":
    main()
