"""PH-Map on a backed atlas vs the same atlas in memory: one training epoch, prediction throughput, peak memory, in one run.

Data: `simulate_hierarchy` (SIMULATED negative-binomial counts, 1M cells x 2,000 genes, density 0.1, the PH-Map paper's
(6, 19, 30, 55)-class tree), written once by the parent as a CSR .h5ad with its rows **sorted by fine type** (as many
atlases are stored: by sample, by cluster), so a loader that read consecutive rows without shuffling them would
train on one type at a time. The atlas is written, and each contender runs, in its own child process (its own peak RSS;
Linux keeps a process's peak RSS across fork and exec, so the parent never holds the matrix):

- memory: `anndata.read_h5ad` (the whole matrix in RAM) -> `HierarchicalAnnotator.fit(epochs=1)` with uniform per-cell
  shuffling (`block_size=None`, the in-memory default) -> `predict` on every cell;
- backed: `cellmtl.data.read_backed` (backed='r', the matrix stays on disk) -> the same `fit`, whose default
  `block_size="auto"` shuffles blocks of 256 consecutive cells, then the cells inside a buffer of 16 blocks, and reads
  each buffer's rows from HDF5 in one go -> `predict` on every cell (chunks of 8,192 consecutive rows);
- backed_uniform (with `--uniform`): backed with `block_size=None`, per-cell shuffling read straight from HDF5: the
  cost the block shuffle removes (slow: about 3.5x the in-memory epoch).

Both fits use the default split (80 % train, 20 % validation, stratified by the coarsest level, split seed 42) and one
epoch; the epoch time is the engine's (training plus the validation pass), calibration off. The validation accuracy
after that epoch is reported both ways: block shuffling should cost none. Prints one JSON line.
"""
import argparse
import json
import os
import time

from _common import peak_rss_mb, run_child

LEVELS = ["anno_lv1", "anno_lv2", "anno_lv3", "anno_lv4"]


def _contender(name: str, path: str, seed: int, block_size, buffer_blocks: int) -> dict:
    "Open the atlas as `name` says, fit one epoch, predict every cell; return the measurements."
    import anndata as ad
    import numpy as np
    from cellmtl.data import read_backed
    from cellmtl.mtl import HierarchicalAnnotator
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path) if name == "memory" else read_backed(path)
    out = {"open_s": time.perf_counter() - t0, "rss_after_open_mb": peak_rss_mb()}
    block_size = None if name in ("memory", "backed_uniform") else block_size
    annotator = HierarchicalAnnotator(label_keys=LEVELS)
    t0 = time.perf_counter()
    annotator.fit(adata, epochs=1, patience=None, calibrate=False, progress=False, seed=seed,
                  block_size=block_size, **({} if buffer_blocks is None else {"buffer_blocks": buffer_blocks}))
    out["fit_s"] = time.perf_counter() - t0
    row = annotator.history_.df.iloc[-1]
    out["epoch_s"], out["train_cells"], out["val_cells"] = float(row["seconds"]), len(annotator.train_indices_), len(annotator.val_indices_)
    out["val_mean_acc"] = float(row["val_mean_acc"])
    out["val_fine_acc"] = float(row[f"val_{LEVELS[-1]}_acc"]) if f"val_{LEVELS[-1]}_acc" in row else None
    out["fit_peak_rss_mb"] = peak_rss_mb()
    t0 = time.perf_counter()
    predictions = annotator.predict(adata)
    out["predict_s"] = time.perf_counter() - t0
    out["predict_cells_per_s"] = adata.n_obs / out["predict_s"]
    truth = adata.obs[LEVELS[-1]].astype(str).to_numpy()
    out["predict_fine_acc_all_cells"] = float(np.mean(predictions[f"predicted_{LEVELS[-1]}"].astype(str).to_numpy() == truth))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _write_atlas(path: str, n_cells: int, n_genes: int, density: float, seed: int) -> dict:
    "Simulate the atlas, sort its rows by fine type, write it as a CSR .h5ad; return its sizes and the seconds spent."
    import numpy as np
    from cellmtl.datasets import simulate_hierarchy
    t0 = time.perf_counter()
    adata = simulate_hierarchy(n_cells, n_genes, n_classes=(6, 19, 30, 55), density=density, seed=seed)
    simulated = time.perf_counter() - t0
    adata = adata[np.argsort(adata.obs[LEVELS[-1]].cat.codes.to_numpy(), kind="stable")].copy()  # rows grouped by fine type
    t0 = time.perf_counter()
    adata.write_h5ad(path)
    return {"simulate_s": round(simulated, 1), "write_s": round(time.perf_counter() - t0, 1), "nnz": int(adata.X.nnz),
            "h5ad_mb": round(os.path.getsize(path) / 2**20, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000, help="cells in the simulated atlas (80 %% train)")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uniform", action="store_true", help="also run backed with per-cell shuffling (block_size=None): the old cost")
    p.add_argument("--dir", default=None, help="folder for the temporary .h5ad (default: the system's temp folder; needs ~2.5 GB at 1M cells)")
    p.add_argument("--block-size", default="auto", help="fit's block_size for the backed run (default: fit's own, 'auto')")
    p.add_argument("--buffer-blocks", type=int, default=None, help="fit's buffer_blocks for the backed run (default: fit's own)")
    p.add_argument("--child", choices=["write", "memory", "backed", "backed_uniform"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "write":  # in a child: the parent stays small, so the contenders it starts do not inherit its peak RSS
        print(json.dumps(_write_atlas(a.path, a.cells, a.genes, a.density, a.seed))); return
    if a.child:
        block_size = a.block_size if a.block_size == "auto" else int(a.block_size)
        print(json.dumps(_contender(a.child, a.path, a.seed, block_size, a.buffer_blocks))); return
    import tempfile
    names = ["memory", "backed"] + (["backed_uniform"] if a.uniform else [])
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = os.path.join(tmp, "atlas.h5ad")
        atlas = run_child(__file__, "--child", "write", "--path", path, "--cells", a.cells, "--genes", a.genes, "--density", a.density,
                          "--seed", a.seed)
        blocks = ["--block-size", a.block_size] + (["--buffer-blocks", a.buffer_blocks] if a.buffer_blocks else [])
        res = {name: run_child(__file__, "--child", name, "--path", path, "--seed", a.seed, *blocks) for name in names}
    memory, backed = res["memory"], res["backed"]
    line = {
        "benchmark": "backed_speed", "data": "simulate_hierarchy (simulated), rows sorted by fine type", "cells": a.cells, "genes": a.genes,
        "density": a.density, **atlas, "train_cells": backed["train_cells"], "val_cells": backed["val_cells"],
        "memory_epoch_s": round(memory["epoch_s"], 1), "backed_epoch_s": round(backed["epoch_s"], 1),
        "backed_epoch_time_ratio": round(backed["epoch_s"] / memory["epoch_s"], 3),
        "memory_predict_cells_per_s": round(memory["predict_cells_per_s"]), "backed_predict_cells_per_s": round(backed["predict_cells_per_s"]),
        "backed_predict_ratio": round(backed["predict_cells_per_s"] / memory["predict_cells_per_s"], 3),
        "memory_peak_rss_mb": round(memory["peak_rss_mb"], 1), "backed_peak_rss_mb": round(backed["peak_rss_mb"], 1),
        "memory_val_mean_acc": round(memory["val_mean_acc"], 4), "backed_val_mean_acc": round(backed["val_mean_acc"], 4),
        "memory_fine_acc_all_cells": round(memory["predict_fine_acc_all_cells"], 4), "backed_fine_acc_all_cells": round(backed["predict_fine_acc_all_cells"], 4),
        "memory_open_s": round(memory["open_s"], 1), "backed_open_s": round(backed["open_s"], 2),
    }
    if a.uniform:
        uniform = res["backed_uniform"]
        line |= {"backed_uniform_epoch_s": round(uniform["epoch_s"], 1), "backed_uniform_epoch_time_ratio": round(uniform["epoch_s"] / memory["epoch_s"], 3),
                 "backed_uniform_val_mean_acc": round(uniform["val_mean_acc"], 4)}
    line["targets"] = {"backed_epoch_time_ratio": "<= 1.5", "backed_predict_cells_per_s": ">= 150000", "backed_peak_rss_mb": "< 3072"}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
