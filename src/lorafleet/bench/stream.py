"""Benchmark: STREAM-like memory bandwidth (copy, scale, add, triad over arrays far larger than
the caches), the ceiling that memory-bound decode steps are read against."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.bench import print_table, write_json

# (kernel, arrays read + written per element): STREAM's own byte counts.
KERNELS = (("copy", 2), ("scale", 2), ("add", 3), ("triad", 3))


def measure(mb: int = 256, reps: int = 5, threads: int | None = None) -> dict[str, float]:
    """GB/s (10^9 bytes/s) per kernel, best of `reps`, over float32 arrays of `mb` MiB each."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n = mb * 2**20 // 4
        a, b, c = (torch.full((n,), v, dtype=torch.float32) for v in (1.0, 2.0, 0.0))
        ops = {
            "copy": lambda: c.copy_(a),
            "scale": lambda: torch.mul(c, 3.0, out=b),
            "add": lambda: torch.add(a, b, out=c),
            "triad": lambda: torch.add(b, c, alpha=3.0, out=a),
        }
        out = {}
        for name, arrays in KERNELS:
            ops[name]()  # first touch
            best = min(_timed(ops[name]) for _ in range(reps))
            out[name] = arrays * n * 4 / best / 1e9
        return out
    finally:
        torch.set_num_threads(old)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(
    mb: int = 256,
    reps: int = 5,
    threads: tuple[int, ...] = (),
    json_out: str | Path = "bench/results/stream.json",
) -> dict:
    """The probe at each thread count (default: 1 and torch's current count)."""
    import torch

    counts = threads or tuple(sorted({1, torch.get_num_threads()}))
    rows = []
    for t in counts:
        rows.append({"threads": t, **measure(mb, reps, t)})
        print(f"  {t} thread(s): triad {rows[-1]['triad']:.1f} GB/s", flush=True)
    print_table(rows, ["threads", *(k for k, _ in KERNELS)])
    figures = {
        "benchmark": "stream",
        "array_mb": mb,
        "unit": "GB/s (1e9 bytes/s)",
        "rows": rows,
        "best_gb_s": max(max(r[k] for k, _ in KERNELS) for r in rows),
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
