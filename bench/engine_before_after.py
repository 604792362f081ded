"""The engine's throughput from two source trees, interleaved in one run (issue 28's check).

Each repetition runs every tree once, in the order A B, B A, A B, ... (ABBA, so that a drift
of the machine's speed favours neither), each in a fresh process with
PYTHONPATH set to that tree's `src/`, on the workload of `lorafleet bench engine` (32 requests of
100 prompt tokens cut from gsm8k text, 64 greedy tokens each, EOS ignored, 16 random rank-16
all-linear adapters, one process per measurement). A process times the engine with the 16
adapters (request i uses adapter i % 16) and on the base alone, after one warm-up request.
Medians over the repetitions are printed and written as JSON.

    python bench/engine_before_after.py --tree before=/work/base --tree after=. --reps 5

Only public names of the engine are used (`Engine`, `load_adapter`, `generate`, `SamplingParams`),
so any two trees with the same engine API can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
import torch
from lorafleet.bench.engine import gsm8k_prompts, random_adapters
from lorafleet.models import load_base
from lorafleet.serve.engine import Engine
from lorafleet.serve.sequence import SamplingParams

cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
loaded = load_base(cfg["base"])
loaded.model.eval()
n, p, new, k = cfg["requests"], cfg["prompt_tokens"], cfg["new_tokens"], cfg["adapters"]
prompts = gsm8k_prompts(loaded.tokenizer, n, p)
made = random_adapters(loaded.model, k, cfg["rank"])
engine = Engine(loaded, max_slots=k, max_rank=cfg["rank"], max_batch_size=n,
                max_batch_tokens=n * p, max_seq_len=p + new + 8)
names = [f"a{i}" for i in range(k)]
for name, adapter in zip(names, made):
    engine.load_adapter(name, adapter)
params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
engine.generate([(prompts[0][:8], names[0], SamplingParams(max_tokens=2, ignore_eos=True))])
out = {}
for kind in ("adapters", "base"):
    reqs = [(ids, names[i % k] if kind == "adapters" else None, params)
            for i, ids in enumerate(prompts)]
    start = time.perf_counter()
    outs = engine.generate(reqs)
    seconds = time.perf_counter() - start
    assert all(o.finish_reason != "error" for o in outs), outs[0]
    out[kind] = sum(len(o.token_ids) for o in outs) / seconds
print("RESULT " + json.dumps(out))
"""


def measure(tree: Path, cfg: dict) -> dict:
    """One fresh process on `tree`'s sources: tokens/s with adapters and on the base."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{tree}: the measurement failed\n{done.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--base", default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default="bench/results/engine_before_after.json")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    cfg = {
        "base": args.base,
        "requests": args.requests,
        "adapters": args.adapters,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rank": args.rank,
    }
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for rep in range(args.reps):
        # ABBA: odd repetitions run the trees in reverse order, so a drift of the machine's
        # speed over the run favours neither tree.
        order = list(trees.items())
        for name, path in order if rep % 2 == 0 else order[::-1]:
            result = measure(Path(path).resolve(), cfg)
            runs[name].append(result)
            print(f"rep {rep + 1} {name}: {result}", flush=True)
    medians = {
        name: {kind: statistics.median(r[kind] for r in rs) for kind in ("adapters", "base")}
        for name, rs in runs.items()
    }
    for name, m in medians.items():
        print(f"{name}: median tok/s with adapters {m['adapters']:.1f}, base {m['base']:.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"config": cfg, "runs": runs, "medians": medians}))


if __name__ == "__main__":
    main()
