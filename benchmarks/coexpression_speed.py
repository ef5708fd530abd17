"""Co-expression graph: cellmtl's `coexpression_network` vs two references, on a real CellBench plate.

The contenders compute the Pearson r of every pair of correlated genes (detected in >= 10% of the cells) and keep the
pairs with r >= 0.7:
- `cellmtl`: `cellmtl.priors.coexpression_network` (gene blocks; dense BLAS on chunks of cells of at most 256 MB);
- `sparse_blocks`: the same gene blocks as a sparse x sparse product with a dense result (cellmtl's first version);
- `dense_full`: `np.corrcoef` of the whole dense matrix (the full G x G correlation the design warns about).
Each runs in a fresh child process on the same expression (prepared once by the parent, saved as CSR), so its peak RSS
is its own; all three must find the same edges. Prints one JSON line with the ratios.
"""
import argparse
import json
import os
import tempfile
import time

from _common import peak_rss_mb, run_child


def _contender(name: str, path: str, threshold: float) -> dict:
    "Build the graph with contender `name` on the CSR expression at `path`; return time, peak memory and the edge count."
    import numpy as np
    import scipy.sparse as sp
    X = sp.load_npz(path).tocsr()
    base = peak_rss_mb()
    start = time.perf_counter()
    if name == "cellmtl":
        import anndata as ad
        from cellmtl.priors import coexpression_network
        expression = ad.AnnData(X)
        expression.uns["prior_expression"] = {"input": "prepared by the benchmark"}  # used as it is
        expression.var["ensembl_id"] = ""
        n_edges = coexpression_network(expression, threshold=threshold, min_cells_fraction=0).n_edges
    elif name == "sparse_blocks":
        X = X.astype(np.float64); n, G = X.shape; columns = X.T.tocsr(); n_edges = 0
        mean = np.asarray(X.mean(axis=0)).ravel()
        sd = np.sqrt(np.maximum(np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean ** 2, 0))
        for s in range(0, G, 1024):
            e = min(s + 1024, G)
            r = ((columns[s:e] @ X).toarray() / n - np.outer(mean[s:e], mean)) / np.outer(sd[s:e], sd)
            r[np.arange(e - s), np.arange(s, e)] = -np.inf
            n_edges += int((r >= threshold).sum())
        n_edges //= 2
    else:
        r = np.corrcoef(X.toarray().T)  # (G, G)
        np.fill_diagonal(r, -np.inf)
        n_edges = int((r >= threshold).sum()) // 2
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss_mb": peak_rss_mb() - base, "n_edges": n_edges}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plate", default="sc_celseq2", help="CellBench plate (real data; needs CELLMTL_DATA_DIR or the download)")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--child"); p.add_argument("--matrix")
    a = p.parse_args()
    if a.child:
        print(json.dumps(_contender(a.child, a.matrix, a.threshold))); return
    import numpy as np
    import scipy.sparse as sp
    from cellmtl.datasets import cellbench
    from cellmtl.priors import prepare_expression
    expression = prepare_expression(cellbench([a.plate]))
    X = expression.X
    detected = np.bincount(X.indices, minlength=X.shape[1])
    X = X[:, np.flatnonzero(detected >= max(np.ceil(0.1 * X.shape[0]), 2))]  # the correlated genes, as coexpression_network picks them
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "expression.npz")
        sp.save_npz(path, sp.csr_matrix(X), compressed=False)
        for name in ("cellmtl", "sparse_blocks", "dense_full"):
            res[name] = run_child(__file__, "--child", name, "--matrix", path, "--threshold", a.threshold)
    assert len({r["n_edges"] for r in res.values()}) == 1, f"the contenders disagree on the edges: {res}"
    ours = res["cellmtl"]
    print(json.dumps({"benchmark": "coexpression_speed", "data": f"CellBench {a.plate} (real)", "cells": X.shape[0], "genes": X.shape[1],
                      "threshold": a.threshold, "n_edges": ours["n_edges"],
                      **{f"{k}_s": round(v["seconds"], 2) for k, v in res.items()},
                      **{f"{k}_extra_rss_mb": round(v["extra_rss_mb"], 1) for k, v in res.items()},
                      "speedup_vs_sparse_blocks": round(res["sparse_blocks"]["seconds"] / ours["seconds"], 1),
                      "speedup_vs_dense_full": round(res["dense_full"]["seconds"] / ours["seconds"], 2),
                      "memory_ratio_vs_dense_full": round(ours["extra_rss_mb"] / max(res["dense_full"]["extra_rss_mb"], 1e-9), 3)}))


if __name__ == "__main__":
    main()
