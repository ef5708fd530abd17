"""Pre-train and fit a GeneTokenAnnotator on real CellBench cells, alone or under torchrun (gloo on CPU).

Used by tests/test_genetoken.py: under `torchrun --nproc_per_node=2` both stages go through DistributedDataParallel
(the frozen-backbone fit included) and every rank must end with the same weights. Writes OUT/weights_rank<r>.pt and
OUT/history_rank<r>.json.
"""
import json, os, sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cellmtl.datasets import cellbench
from cellmtl.genetoken import GeneTokenAnnotator

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
if int(os.environ.get("WORLD_SIZE", 1)) > 1: dist.init_process_group("gloo")  # one group for both stages (fit reuses it)
rank = dist.get_rank() if dist.is_initialized() else 0
data = cellbench(["sc_dropseq"], singlets_only=True)
detected = np.asarray((data.X > 0).sum(0)).ravel()
cells = data[:96, np.sort(np.argsort(-detected, kind="stable")[:32])].copy()  # (96, 32) raw counts
model = GeneTokenAnnotator(label_key="cell_line", n_top_genes=None, d_model=8, n_heads=2, d_hid=16, n_layers=1)
model.pretrain(cells, epochs=2, batch_size=8, device="cpu").fit(cells, epochs=2, batch_size=8, device="cpu")
torch.save(model.model_.state_dict(), out / f"weights_rank{rank}.pt")
(out / f"history_rank{rank}.json").write_text(json.dumps({"pretrain": model.pretrain_history_.df["train_loss"].tolist(),
                                                          "fit": model.history_.df["train_loss"].tolist(), "finetune": model.finetune_}))
if dist.is_initialized(): dist.destroy_process_group()
