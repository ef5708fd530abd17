"""CSRBatchLoader vs the seed-style dense reference: one epoch of binarised mini-batches.

Data: `simulate_hierarchy` (SIMULATED negative-binomial counts, density 0.1), simulated once by the parent and
saved as a CSR .npz. Each contender runs in its own child process that loads that file, so its peak RSS
(ru_maxrss) is its own: interpreter + CSR matrix + whatever the contender allocates. Prints one JSON line.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    "Peak resident set size of this process in MiB (Linux reports KiB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _contender(name: str, path: str, batch_size: int, seed: int, epochs: int) -> dict:
    "Run one contender in this process on the CSR matrix saved at `path` and return its measurements."
    import numpy as np
    import scipy.sparse as sp
    import torch
    X = sp.load_npz(path).tocsr()
    cells, genes = X.shape
    base_mb = _peak_rss_mb()
    out = {"nnz": int(X.nnz), "csr_mb": (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20,
           "dense_mb": cells * genes * 4 / 2**20, "rss_after_load_mb": base_mb}
    if name == "reference":
        # the seed's path: densify the whole matrix once, binarise, TensorDataset -> DataLoader(batch, shuffle)
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
    times = []
    for epoch in range(epochs):  # several epochs: one is too short to time reliably
        if hasattr(loader, "set_epoch"): loader.set_epoch(epoch)
        t0 = time.perf_counter(); n = 0; checksum = 0.0
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch["x"]  # (B, G) float32
            n += x.shape[0]; checksum += float(x[:, 0].sum())
        times.append(time.perf_counter() - t0)
    epoch_s = sorted(times)[len(times) // 2]  # median epoch
    out.update(setup_s=setup_s, epoch_s=epoch_s, cells_seen=n, nonzero_first_gene=checksum, peak_rss_mb=_peak_rss_mb())
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
    simulate_s, simulate_peak_mb = time.perf_counter() - t0, _peak_rss_mb()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counts.npz")
        sp.save_npz(path, X, compressed=False); del X
        for name in ("reference", "cellmtl"):
            cmd = [sys.executable, __file__, "--child", name, "--matrix", path, "--batch-size", str(a.batch_size), "--seed", str(a.seed),
                   "--epochs", str(a.epochs)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref, new = res["reference"], res["cellmtl"]
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
        "extra_rss_ratio": round(max(new["peak_rss_mb"] - new["rss_after_load_mb"], 0) / (ref["peak_rss_mb"] - ref["rss_after_load_mb"]), 3),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
