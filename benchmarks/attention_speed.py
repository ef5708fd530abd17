"""Attention backends of cellmtl.transformer: PyTorch SDPA vs explicit math (and flash-attn on a GPU), in one run.

One attention layer (`MultiheadSelfAttention`: packed in-projection, attention, out-projection) at d_model 512,
8 heads, batch 4, sequence lengths 512 / 1024 / 2048, ~10% padding per cell (the padding mask is passed, as in
training). For each (backend, length): forward + backward time (best of `--repeats`) and the peak memory the step
adds above its inputs. On CPU every measurement runs in its own child process, and memory is the growth of peak
RSS (ru_maxrss) during the step; on CUDA it is `torch.cuda.max_memory_allocated` above the inputs.

Whole model: `TransformerModel` (d_model 512, 8 heads, d_hid 512, 4 layers; scGPT's widths, fewer layers) training
tokens/s (forward + backward + Adam) at sequence length 1200 (scGPT's `max_seq_len`), batch 4, per backend.

Targets (issue 5, on this CPU): at 2048, sdpa at least 2x faster and 4x leaner than math. Prints one JSON line.
"""
import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(torch, batch, length, d_model, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, d_model, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    n_pad = (torch.arange(batch) * length // (5 * batch))  # 0 .. ~20% padding
    padding = (torch.arange(length)[None] >= (length - n_pad)[:, None]).to(device)
    return x, padding


def measure_layer(backend, length, batch, d_model, nhead, repeats, device, dtype_name):
    "Child: forward+backward seconds (best of repeats) and the peak memory (MiB) the step adds."
    import torch
    from cellmtl.transformer import MultiheadSelfAttention
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    layer = MultiheadSelfAttention(d_model, nhead, dropout=0.0, attention=backend).to(device=device, dtype=dtype)
    x, padding = _inputs(torch, batch, length, d_model, device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: base = _peak_rss_mb()
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        x.grad = None; layer.zero_grad(set_to_none=True)
        sync(); t0 = time.perf_counter()
        layer(x, padding).float().pow(2).mean().backward()
        sync(); times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else _peak_rss_mb() - base
    return {"seconds": min(times[1:]), "peak_extra_mb": round(peak, 1)}


def measure_model(backend, length, batch, steps, device, dtype_name):
    "Child: training tokens/s of a 4-layer TransformerModel (MLM + MVC objectives, Adam)."
    import torch
    from cellmtl.objectives import TransformerLoss
    from cellmtl.transformer import TransformerModel
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
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    amp = torch.autocast("cuda", dtype=getattr(torch, dtype_name)) if device == "cuda" and dtype_name != "float32" else None
    times = []
    for _ in range(steps + 1):
        sync(); t0 = time.perf_counter()
        with (amp if amp is not None else _null()):
            loss = loss_fn(model, data)["loss"]
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        sync(); times.append(time.perf_counter() - t0)
    return {"tokens_per_s": round(batch * length / min(times[1:]), 1)}


class _null:
    def __enter__(self): return self
    def __exit__(self, *a): return False


def child(args):
    spec = json.loads(args.child)
    fn = measure_layer if spec.pop("what") == "layer" else measure_model
    print(json.dumps(fn(**spec)))


def run_child(spec) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode: raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    from cellmtl.transformer import FLASH_ATTN_AVAILABLE
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["math", "sdpa"] + (["flash"] if device == "cuda" and FLASH_ATTN_AVAILABLE else [])
    dtype = "float32" if device == "cpu" else "bfloat16"  # flash needs half precision; compare all backends in it on GPU
    result = {"device": device, "dtype": dtype, "batch": args.batch, "d_model": args.d_model, "nhead": args.nhead,
              "torch_threads": torch.get_num_threads(), "layer": {}, "model": {}}
    for length in args.lengths:
        for backend in backends:
            r = run_child(dict(what="layer", backend=backend, length=length, batch=args.batch, d_model=args.d_model, nhead=args.nhead,
                               repeats=args.repeats, device=device, dtype_name=dtype))
            result["layer"][f"{backend}_{length}"] = r
            print(f"# layer {backend:5s} L={length:5d}: {r['seconds']*1e3:8.1f} ms  +{r['peak_extra_mb']:8.1f} MiB", file=sys.stderr)
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
