"""lorafleet's decode GEMV (src/lorafleet/kernels) against torch's kernels, side by side.

Over one model's block linears and head (SmolLM2-135M's shapes by default: per block q/k/v
fused [960, 576], o [576, 576], gate and up [1536, 576] each, down [576, 1536]; 30 blocks; head
[49152, 576]), random weights, for each weight kind and row count M: the time to run every
linear once, lorafleet then torch, interleaved, `--reps` times; prints the medians, the weight
bytes per second and lorafleet / torch. Weights are not reused between calls within a pass (30
blocks' worth), so they stream from memory as in a decode step.

    python bench/decode_gemv.py                       # float32, bfloat16; M 1 2 4 6 8 32
    python bench/decode_gemv.py --kinds float32 --rows 1 --reps 9

Torch's side is what the engine ran before: F.linear (MKL for float32, oneDNN for bfloat16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lorafleet import kernels

BLOCK_SHAPES = [(960, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # [N, K]
HEAD_SHAPE = (49152, 576)


def make_weights(kind: str, blocks: int) -> list[dict]:
    """Every linear of `blocks` blocks plus the head, as {"w", "k", "bytes"} in `kind`."""
    shapes = BLOCK_SHAPES * blocks + [HEAD_SHAPE]
    out = []
    for n, k in shapes:
        w = (torch.randn(n, k) * 0.05).to(getattr(torch, kind))
        out.append({"w": w, "k": k, "bytes": w.numel() * w.element_size()})
    return out


def run_all(weights: list[dict], xs: dict, ours: bool) -> float:
    """Seconds to run every linear once on its x."""
    start = time.perf_counter()
    for spec in weights:
        x = xs[spec["k"]]
        if ours:
            kernels.linear(x, spec["w"])
        else:
            F.linear(x, spec["w"])
    return time.perf_counter() - start


def measure(kind: str, rows: int, blocks: int, reps: int) -> dict:
    weights = make_weights(kind, blocks)
    x_dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    xs = {k: torch.randn(rows, k).to(x_dtype) for k in {576, 1536}}
    run_all(weights, xs, True), run_all(weights, xs, False)  # warm-up
    ours, theirs = [], []
    for _ in range(reps):  # interleaved
        ours.append(run_all(weights, xs, True))
        theirs.append(run_all(weights, xs, False))
    total = sum(s["bytes"] for s in weights)
    a, b = statistics.median(ours), statistics.median(theirs)
    return {
        "kind": kind,
        "rows": rows,
        "lorafleet_ms": round(a * 1e3, 2),
        "torch_ms": round(b * 1e3, 2),
        "lorafleet_GiBps": round(total / a / 2**30, 1),
        "torch_GiBps": round(total / b / 2**30, 1),
        "speedup": round(b / a, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 6, 8, 32])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    if not kernels.available():
        raise SystemExit(f"lorafleet's kernels are unavailable: {kernels.unavailable_reason()}")
    saved = dict(kernels.MAX_ROWS)
    for dtype in kernels.MAX_ROWS:  # time the GEMV at every M asked, not only where it runs
        kernels.MAX_ROWS[dtype] = max(args.rows)
    with torch.inference_mode():
        for kind in args.kinds:
            for rows in args.rows:
                print(json.dumps(measure(kind, rows, args.blocks, args.reps)), flush=True)
    kernels.MAX_ROWS.update(saved)
    print(
        json.dumps(
            {"threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability()}
        )
    )


if __name__ == "__main__":
    main()
