"""CSRBatchLoader vs the dense reference of the published PH-Map code: one epoch of binarised mini-batches.

Data: `simulate_hierarchy` (SIMULATED negative-binomial counts, density 0.1), simulated once by the parent and
saved as a CSR .npz. Each contender runs in its own child process that loads that file, so its peak RSS
(ru_maxrss) is its own: interpreter + CSR matrix + whatever the contender allocates. Prints one JSON line.
"""
import argparse
import json
import os
import time

from _common import median, peak_rss_mb, run_child, timed


def _contender(name: str, path: str, batch_size: int, seed: int, epochs: int) -> dict:
    "Run one contender in this process on the CSR matrix saved at `path` and return its measurements."
    import numpy as np
    import scipy.sparse as sp
    import torch
    X = sp.load_npz(path).tocsr()
    cells, genes = X.shape
    base_mb = peak_rss_mb()
    out = {"nnz": int(X.nnz), "csr_mb": (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20,
           "dense_mb": cells * genes * 4 / 2**20, "rss_after_load_mb": base_mb}
    if name == "reference":
        # the published PH-Map data path: densify the whole matrix once, binarise, TensorDataset -> DataLoader(batch, shuffle)
        t0 = time.perf_counter()
        dense = torch.from_numpy((X.toarray() > 0).astype(np.float32))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(dense), batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        setup_s = time.perf_counter() - t0
    else:
        from cellmtl.data import CSRBatchLoader
        t0 = time.perf_counter()
        loader = CSRBatchLoader(X, batch_size=batch_size, shuffle=True, seed=seed, transform="binarize")
        setup_s = time.perf_counter() - t0
    seen = {}
    def one_epoch():
        "Iterate the loader once; count the cells and sum the first gene (a checksum both contenders must agree on)."
        n, checksum = 0, 0.0
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch["x"]  # (B, G) float32
            n += x.shape[0]; checksum += float(x[:, 0].sum())
        seen.update(n=n, checksum=checksum)
    times = []
    for epoch in range(epochs):  # several epochs: one is too short to time reliably
        if hasattr(loader, "set_epoch"): loader.set_epoch(epoch)
        times.append(timed(one_epoch))
    out.update(setup_s=setup_s, epoch_s=median(times), cells_seen=seen["n"], nonzero_first_gene=seen["checksum"], peak_rss_mb=peak_rss_mb())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5, help="epochs per contender; the median epoch time is reported")
    p.add_argument("--child", choices=["reference", "cellmtl"], help=argparse.SUPPRESS)
    p.add_argument("--matrix", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_contender(a.child, a.matrix, a.batch_size, a.seed, a.epochs))); return
    import tempfile
    import scipy.sparse as sp
    from cellmtl.datasets import simulate_hierarchy
    t0 = time.perf_counter()
    X = simulate_hierarchy(a.cells, a.genes, density=a.density, seed=a.seed).X
    simulate_s, simulate_peak_mb = time.perf_counter() - t0, peak_rss_mb()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counts.npz")
        sp.save_npz(path, X, compressed=False); del X
        for name in ("reference", "cellmtl"):
            res[name] = run_child(__file__, "--child", name, "--matrix", path, "--batch-size", a.batch_size, "--seed", a.seed,
                                  "--epochs", a.epochs)
    ref, new = res["reference"], res["cellmtl"]
    extra = lambda r: max(r["peak_rss_mb"] - r["rss_after_load_mb"], 0.0)  # MiB a contender allocates above the loaded matrix
    assert ref["cells_seen"] == new["cells_seen"] == a.cells and abs(ref["nonzero_first_gene"] - new["nonzero_first_gene"]) < 0.5
    line = {
        "benchmark": "loader_speed", "data": "simulate_hierarchy (simulated)", "cells": a.cells, "genes": a.genes,
        "density": a.density, "batch_size": a.batch_size, "epochs": a.epochs, "csr_mb": round(new["csr_mb"], 1), "dense_mb": round(new["dense_mb"], 1),
        "simulate_s": round(simulate_s, 2), "simulate_peak_rss_mb": round(simulate_peak_mb, 1),
        "reference_setup_s": round(ref["setup_s"], 2), "reference_epoch_s": round(ref["epoch_s"], 3),
        "cellmtl_epoch_s": round(new["epoch_s"], 3),
        "epoch_speedup": round(ref["epoch_s"] / new["epoch_s"], 1),
        "epoch_speedup_incl_setup": round((ref["setup_s"] + ref["epoch_s"]) / (new["setup_s"] + new["epoch_s"]), 1),
        "reference_extra_rss_mb": round(ref["peak_rss_mb"] - ref["rss_after_load_mb"], 1),
        "cellmtl_extra_rss_mb": round(new["peak_rss_mb"] - new["rss_after_load_mb"], 1),
        "reference_peak_rss_mb": round(ref["peak_rss_mb"], 1), "cellmtl_peak_rss_mb": round(new["peak_rss_mb"], 1),
        "peak_rss_ratio": round(new["peak_rss_mb"] / ref["peak_rss_mb"], 3),
        "extra_rss_ratio": round(extra(new) / extra(ref), 3) if extra(ref) > 0 else None,  # None: too small to allocate measurably
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
