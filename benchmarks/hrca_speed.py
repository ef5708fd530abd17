"""HRCA Gene-AE pre-training speed at HRCA's published widths: seconds per step (batch 128, forward + backward + Adam).

For 2,000 and 20,000 genes (input_width 5000, d_model 1024, d_ff 2048, 8 heads, 8 encoder layers), on random
counts (SIMULATED, Poisson; only the shapes matter here), with the `sdpa` and the explicit `math` attention of
`cellmtl.nn` (HRCA's feature-token attention calls it). Also measured in the same process: a large float32 matmul,
so the achieved GFLOP/s can be read against it. Prints one JSON line.
"""
import argparse
import json

import torch

import _common


def measure(n_genes: int, attention: str, batch_size: int, steps: int, device: str) -> dict:
    from cellmtl.hrca import DenoisingLoss, GeneAE, GeneAEConfig
    torch.manual_seed(0)
    model = GeneAE(GeneAEConfig(n_genes=n_genes, attention=attention)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DenoisingLoss(0.7)
    batch = {"x": torch.poisson(torch.full((batch_size, n_genes), 0.5)).to(device)}  # (B, G) counts

    def step():
        loss = loss_fn(model, batch)["loss"]
        optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()

    seconds = _common.median(_common.repeat_timed(step, steps, warmup=1, sync=_common.device_sync(device)))  # warm-up: allocations, Adam state
    n_params = sum(p.numel() for p in model.parameters())
    return {"genes": n_genes, "attention": attention, "params": n_params, "seconds_per_step": round(seconds, 4),
            "cells_per_s": round(batch_size / seconds, 1), "approx_gflops": round(6 * n_params * batch_size / seconds / 1e9, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--attention", nargs="+", default=["sdpa", "math"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    rows = [measure(g, att, a.batch_size, a.steps, a.device) for g in a.genes for att in a.attention]
    print(json.dumps({"benchmark": "hrca_speed", "device": a.device, "threads": torch.get_num_threads(), "batch_size": a.batch_size,
                      "matmul_gflops": round(_common.matmul_gflops(device=a.device), 1), "peak_rss_mb": round(_common.peak_rss_mb(), 1),
                      "settings": rows,
                      "note": "approx_gflops = 6 x params x batch / step time (dense-equivalent; attention FLOPs not counted)"}))


if __name__ == "__main__":
    main()
