"""Measurements every benchmark script shares: peak memory, wall-clock timing, a matmul GFLOP/s reference, child processes.

Imported by the scripts in this folder as `import _common` (Python puts a script's own folder first on `sys.path`).
Torch is imported only inside the functions that need it, so a parent process that only spawns children stays light.
"""
import json
import resource
import subprocess
import sys
import time
from typing import Callable


def peak_rss_mb() -> float:
    "Peak resident set size of this process in MiB (`ru_maxrss`; Linux reports KiB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_sync(device: str = "cpu") -> Callable[[], None]:
    "A function that waits for queued GPU work on a CUDA `device` (timings must include it); a no-op on the CPU."
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.synchronize
    return lambda: None


def timed(f: Callable, sync: Callable[[], None] | None = None) -> float:
    "Wall-clock seconds of one call `f()`, with `sync()` before the start and before the stop (pass `device_sync(device)`)."
    sync = sync or (lambda: None)
    sync(); start = time.perf_counter()
    f()
    sync(); return time.perf_counter() - start


def repeat_timed(f: Callable, repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
    "Seconds of `repeats` calls of `f()` after `warmup` untimed calls (allocations, caches, optimizer state)."
    for _ in range(warmup): f()
    if sync: sync()
    return [timed(f, sync) for _ in range(repeats)]


def median(values) -> float:
    "The median (upper median for an even count) of a list of timings: robust to one slow outlier."
    values = sorted(values)
    if not values: raise ValueError("median of no timings: run at least one repeat.")
    return values[len(values) // 2]


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    "Best GFLOP/s of an (n x n) @ (n x n) float32 matmul in this process: the machine's attainable rate, to read model GFLOP/s against."
    import torch
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = min(repeat_timed(lambda: a @ b, repeats, warmup=1, sync=device_sync(device)))
    return 2 * n**3 / best / 1e9


def run_child(script: str, *args, env: dict | None = None) -> dict:
    "Run `python script *args` in a fresh process (its own peak RSS) and return the JSON object on its last stdout line."
    import os
    done = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"benchmark child `{' '.join(map(str, args))}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    if not lines: raise RuntimeError(f"benchmark child `{' '.join(map(str, args))}` printed nothing; stderr:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])
