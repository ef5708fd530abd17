"""Gene-token transformer (`cellmtl.genetoken`) training speed and memory: tokens/s of one step, sdpa vs math attention.

One training step (forward + backward + Adam step) of `GeneTokenTransformer` at the module's default widths (d_model 64,
4 heads, d_hid 128, 2 layers), batch 8 cells, for 500 and 2,000 genes (tokens = cells x genes), in two stages:
- `pretrain`: masked pre-training, `MaskedValueLoss(mask_fraction=0.15)`, the whole backbone trained;
- `classify`: `set_trainable("classify", "head")` (frozen backbone), a 5-class head, `ClassificationLoss`'s cross-entropy.
Each with the `sdpa` and the explicit `math` attention of `cellmtl.nn`; math is the reference measured in the same run
(sdpa/math speed and memory ratios), beside the attainable float32 GFLOP/s of a large matmul (`_common.matmul_gflops`).
The values are SIMULATED sparse log1p values (~90% zeros, log-normal counts elsewhere) and random labels: the speed
does not depend on which genes they are. For each (stage, genes, backend): best-of-`--repeats` seconds per step,
tokens/s, and the peak memory the step adds above the model and the batch, each measurement in its own child process:
on CPU the growth of peak RSS (ru_maxrss), on CUDA `torch.cuda.max_memory_allocated`. Next to it `estimate_memory`
for the same settings (training=True, as `check_memory` uses it for pre-training, and training=False, as it uses it for a
head on a frozen backbone, which keeps no backbone activation for backward), so readers see how good the estimate is.

Targets (on a CPU, pre-training at the largest gene count): sdpa no slower than math and at least 4x leaner;
`estimate_memory` within a factor 2 of the measured memory for both backends. Prints one JSON line.
"""
import argparse
import json
import os
import sys

import _common

CLASSES = 5


def measure(stage, n_genes, attention, batch, repeats, threads, device):
    "Child: best-of-repeats seconds of one training step, the peak memory (MiB) it adds, and estimate_memory's figures."
    import torch
    from cellmtl.genetoken import ClassificationLoss, GeneTokenConfig, GeneTokenTransformer, MaskedValueLoss, estimate_memory
    torch.set_num_threads(threads); torch.manual_seed(0)
    config = GeneTokenConfig(n_genes=n_genes, attention=attention, n_classes=CLASSES if stage == "classify" else 0)
    model = GeneTokenTransformer(config).to(device)
    model.set_trainable(stage, "head")  # pretrain: the whole backbone; classify: the head only, the encoder frozen (eval mode)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    expressed = torch.rand(batch, n_genes, generator=g) < 0.1  # ~90% zeros, as in a real cell
    x = torch.where(expressed, torch.log1p(torch.randn(batch, n_genes, generator=g).exp() * 3), 0.0)  # (B, G) log1p values
    data = {"x": x.to(device), "labels": {"cell_type": torch.randint(0, CLASSES, (batch,), generator=g).to(device)}}
    loss_fn = MaskedValueLoss(0.15) if stage == "pretrain" else ClassificationLoss("cell_type")
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: base = _common.peak_rss_mb()

    def step():
        loss = loss_fn(model, data)["loss"]
        optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()

    times = _common.repeat_timed(step, repeats, warmup=1, sync=_common.device_sync(device))  # warm-up: allocations, Adam state
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else _common.peak_rss_mb() - base
    c = config
    estimate = lambda training: estimate_memory(n_genes, batch, c.d_model, c.n_heads, c.d_hid, c.n_layers, attention, training) / 2**20
    seconds = min(times)
    return {"seconds_per_step": round(seconds, 4), "tokens_per_s": round(batch * n_genes / seconds, 1), "peak_extra_mb": round(peak, 1),
            "estimate_mb": round(estimate(True), 1), "estimate_inference_mb": round(estimate(False), 1),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--stages", nargs="+", default=["pretrain", "classify"], choices=["pretrain", "classify"])
    p.add_argument("--attention", nargs="+", default=["sdpa", "math"], help="math is the reference: keep it in the list for the ratios")
    p.add_argument("--batch", type=int, default=8, help="cells per step")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per setting (best reported), after one warm-up step")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: this machine's cores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: print(json.dumps(measure(**json.loads(a.child)))); return
    import torch
    from cellmtl.genetoken import GeneTokenConfig
    torch.set_num_threads(a.threads)
    c = GeneTokenConfig(n_genes=1)  # the module's default widths, which the children use
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {}
    for stage in a.stages:
        for n_genes in a.genes:
            for attention in a.attention:  # each in a fresh process: its own peak memory
                spec = dict(stage=stage, n_genes=n_genes, attention=attention, batch=a.batch, repeats=a.repeats, threads=a.threads, device=device)
                r = settings[f"{stage}_{attention}_{n_genes}"] = _common.run_child(__file__, "--child", json.dumps(spec))
                print(f"# {stage:8s} {attention:4s} G={n_genes:5d}: {r['seconds_per_step']*1e3:8.1f} ms/step  {r['tokens_per_s']:9.0f} tokens/s  "
                      f"+{r['peak_extra_mb']:7.1f} MiB (estimate {r['estimate_inference_mb' if stage == 'classify' else 'estimate_mb']:.1f})", file=sys.stderr)
    ratios = {}
    for key, r in settings.items():  # how good the estimate check_memory uses is: estimate / measured (a frozen backbone: the inference one)
        used = r["estimate_inference_mb"] if key.startswith("classify") else r["estimate_mb"]
        ratios[f"estimate_vs_measured_{key}"] = round(used / max(r["peak_extra_mb"], 0.1), 2)
    if {"sdpa", "math"} <= set(a.attention):
        for stage in a.stages:
            for n_genes in a.genes:
                s, m = settings[f"{stage}_sdpa_{n_genes}"], settings[f"{stage}_math_{n_genes}"]
                ratios[f"speedup_sdpa_vs_math_{stage}_{n_genes}"] = round(m["seconds_per_step"] / s["seconds_per_step"], 2)
                ratios[f"memory_ratio_math_vs_sdpa_{stage}_{n_genes}"] = round(m["peak_extra_mb"] / max(s["peak_extra_mb"], 0.1), 2)
    result = {"benchmark": "genetoken_speed", "device": device, "threads": a.threads, "batch": a.batch, "repeats": a.repeats,
              "widths": {"d_model": c.d_model, "n_heads": c.n_heads, "d_hid": c.d_hid, "n_layers": c.n_layers}, "data": "simulated sparse log1p (~90% zeros)",
              "matmul_gflops": round(_common.matmul_gflops(device=device), 1), "settings": settings, "ratios": ratios}
    largest = max(a.genes)
    if "pretrain" in a.stages and {"sdpa", "math"} <= set(a.attention):
        within2 = lambda key: 0.5 <= ratios[f"estimate_vs_measured_pretrain_{key}_{largest}"] <= 2
        result["targets_met_pretrain_at_largest"] = {
            "sdpa_no_slower": ratios[f"speedup_sdpa_vs_math_pretrain_{largest}"] >= 1,
            "sdpa_4x_less_memory": ratios[f"memory_ratio_math_vs_sdpa_pretrain_{largest}"] >= 4,
            "estimate_within_2x": within2("sdpa") and within2("math")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
