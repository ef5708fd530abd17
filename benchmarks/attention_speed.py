"""Attention backends of cellmtl.nn / cellmtl.scgpt.model: PyTorch SDPA vs explicit math (and flash kernels on a GPU), in one run.

One attention layer (`MultiheadSelfAttention`: packed in-projection, attention, out-projection) at d_model 512,
8 heads, batch 4, sequence lengths 512 / 1024 / 2048, ~10% padding per cell (the padding mask is passed, as in
training; `sdpa-flash`, CUDA only, is PyTorch's own flash kernel forced with `sdpa_kernel(SDPBackend.FLASH_ATTENTION)`,
which takes no mask, so it runs without padding). For each (backend, length): forward + backward time (best of `--repeats`) and the peak memory the step
adds above its inputs. On CPU every measurement runs in its own child process, and memory is the growth of peak
RSS (ru_maxrss) during the step; on CUDA it is `torch.cuda.max_memory_allocated` above the inputs.

Whole model: `TransformerModel` (d_model 512, 8 heads, d_hid 512, 4 layers; scGPT's widths, fewer layers) training
tokens/s (forward + backward + Adam) at sequence length 1200 (scGPT's `max_seq_len`), batch 4, per backend.

Targets (on a CPU): at 2048, sdpa at least 2x faster and 4x leaner than math. Prints one JSON line.
"""
import argparse
import json
import contextlib
import sys

import _common


def _inputs(torch, batch, length, d_model, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, d_model, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    n_pad = (torch.arange(batch) * length // (5 * batch))  # 0 .. ~20% padding
    padding = (torch.arange(length)[None] >= (length - n_pad)[:, None]).to(device)
    return x, padding


def measure_layer(backend, length, batch, d_model, nhead, repeats, device, dtype_name):
    "Child: forward+backward seconds (best of repeats) and the peak memory (MiB) the step adds."
    import torch
    from cellmtl.scgpt.model import MultiheadSelfAttention
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    forced_flash = backend == "sdpa-flash"  # PyTorch's flash kernel: no attention mask, so no padding
    layer = MultiheadSelfAttention(d_model, nhead, dropout=0.0, attention="sdpa" if forced_flash else backend).to(device=device, dtype=dtype)
    x, padding = _inputs(torch, batch, length, d_model, device, dtype)
    if forced_flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        padding, kernel = None, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else: kernel = contextlib.nullcontext
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: base = _common.peak_rss_mb()
    def step():
        x.grad = None; layer.zero_grad(set_to_none=True)
        with kernel(): layer(x, padding).float().pow(2).mean().backward()
    times = _common.repeat_timed(step, repeats, warmup=1, sync=_common.device_sync(device))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else _common.peak_rss_mb() - base
    return {"seconds": min(times), "peak_extra_mb": round(peak, 1)}


def measure_model(backend, length, batch, steps, device, dtype_name):
    "Child: training tokens/s of a 4-layer TransformerModel (MLM + MVC objectives, Adam)."
    import torch
    from cellmtl.scgpt.model import TransformerModel
    from cellmtl.scgpt.objectives import TransformerLoss
    torch.manual_seed(0)
    ntoken = 20000
    model = TransformerModel(ntoken, d_model=512, nhead=8, d_hid=512, nlayers=4, dropout=0.1, attention_dropout=0.0, do_mvc=True,
                             attention=backend).to(device)  # no dropout on attention weights: the fused CPU kernel has none
    g = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(3, ntoken, (batch, length), generator=g); gene_ids[:, 0] = 1
    target = torch.rand(batch, length, generator=g) * 10
    values = target.masked_fill(torch.rand(batch, length, generator=g) < 0.15, -1.0)
    values[:, 0] = 0
    padding = torch.zeros(batch, length, dtype=torch.bool)
    data = {k: v.to(device) for k, v in dict(gene_ids=gene_ids, values=values, target_values=target, src_key_padding_mask=padding).items()}
    loss_fn, optimizer = TransformerLoss(("mlm", "mvc")), torch.optim.Adam(model.parameters(), lr=1e-4)
    use_amp = device == "cuda" and dtype_name != "float32"
    def step():
        with torch.autocast("cuda", dtype=getattr(torch, dtype_name)) if use_amp else contextlib.nullcontext():
            loss = loss_fn(model, data)["loss"]
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    times = _common.repeat_timed(step, steps, warmup=1, sync=_common.device_sync(device))
    return {"tokens_per_s": round(batch * length / min(times), 1)}


def child(args):
    spec = json.loads(args.child)
    fn = measure_layer if spec.pop("what") == "layer" else measure_model
    print(json.dumps(fn(**spec)))


def run_child(spec) -> dict:
    "One measurement in a fresh process (its own peak memory)."
    return _common.run_child(__file__, "--child", json.dumps(spec))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--nhead", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-length", type=int, default=1200)
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child: return child(args)
    import torch
    from cellmtl.nn import FLASH_ATTN_AVAILABLE, resolve_attention_backend
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["math", "sdpa"] + (["flash"] if device == "cuda" and FLASH_ATTN_AVAILABLE else [])
    dtype = "float32" if device == "cpu" else "bfloat16"  # flash needs half precision; compare all backends in it on GPU
    result = {"device": device, "dtype": dtype, "batch": args.batch, "d_model": args.d_model, "nhead": args.nhead,
              "torch_threads": torch.get_num_threads(), "flash_attn_installed": FLASH_ATTN_AVAILABLE,
              "auto_picks": resolve_attention_backend("auto", torch.zeros(1, device=device, dtype=getattr(torch, dtype))),
              "layer": {}, "model": {}}
    layer_backends = backends + (["sdpa-flash"] if device == "cuda" else [])
    for length in args.lengths:
        for backend in layer_backends:
            r = run_child(dict(what="layer", backend=backend, length=length, batch=args.batch, d_model=args.d_model, nhead=args.nhead,
                               repeats=args.repeats, device=device, dtype_name=dtype))
            result["layer"][f"{backend}_{length}"] = r
            print(f"# layer {backend:10s} L={length:5d}: {r['seconds']*1e3:8.1f} ms  +{r['peak_extra_mb']:8.1f} MiB", file=sys.stderr)
    for backend in backends:
        r = run_child(dict(what="model", backend=backend, length=args.model_length, batch=args.batch, steps=args.model_steps,
                           device=device, dtype_name=dtype))
        result["model"][backend] = r
        print(f"# model {backend:5s} L={args.model_length}: {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    ratios = {}
    for length in args.lengths:
        m, s = result["layer"][f"math_{length}"], result["layer"][f"sdpa_{length}"]
        ratios[f"speedup_sdpa_vs_math_{length}"] = round(m["seconds"] / s["seconds"], 2)
        ratios[f"memory_ratio_math_vs_sdpa_{length}"] = round(m["peak_extra_mb"] / max(s["peak_extra_mb"], 0.1), 2)
        if "sdpa-flash" in layer_backends:
            ratios[f"speedup_sdpa_flash_kernel_vs_math_{length}"] = round(m["seconds"] / result["layer"][f"sdpa-flash_{length}"]["seconds"], 2)
        if "flash" in backends:
            f = result["layer"][f"flash_{length}"]
            ratios[f"speedup_flash_vs_sdpa_{length}"] = round(s["seconds"] / f["seconds"], 2)
            ratios[f"memory_ratio_sdpa_vs_flash_{length}"] = round(s["peak_extra_mb"] / max(f["peak_extra_mb"], 0.1), 2)
    ratios["model_tokens_per_s_sdpa_vs_math"] = round(result["model"]["sdpa"]["tokens_per_s"] / result["model"]["math"]["tokens_per_s"], 2)
    longest = max(args.lengths)
    result["ratios"] = ratios
    result["targets_met_at_longest"] = {"sdpa_2x_faster": ratios[f"speedup_sdpa_vs_math_{longest}"] >= 2,
                                        "sdpa_4x_less_memory": ratios[f"memory_ratio_math_vs_sdpa_{longest}"] >= 4}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
