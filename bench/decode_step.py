"""The engine's decode step, timed and split by wall clock, for two source trees side by side.

One run (`--src DIR` puts DIR first on sys.path, so a copy of an older tree can be measured with
the same script): load `--base` in `--setting`, build an engine (16 resident random adapters by
default, every request on the base, prefix cache off where the tree has one), warm up, then
`--reps` times: submit `--rows` fresh prompts of `--prompt-tokens` tokens, step to the end
(`--new-tokens` each, greedy unless --sampling top_p, EOS ignored) and record every decode step's
wall time; with `--split`, one more run with timers around the step's parts. Prints one JSON line.

    python bench/decode_step.py --setting bfloat16 --rows 1 --split
    python bench/decode_step.py --ab /tmp/before/src src --setting bfloat16 --rows 1 --reps 5

`--ab A B`: runs A and B alternately (A B A B ..., `--rounds` each, each run its own process),
reads the 1-minute load average before each, and prints per tree the median and min of the
runs' median decode step (ms) and of their tokens/s (prefill included), and B / A.

Pass rule (issue 33, written before measuring): the decode step is "faster" when B's median of
medians is below A's AND B's worst run median is below A's best (no overlap); else "no clear
difference"."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="a source tree to import lorafleet from")
    ap.add_argument("--ab", nargs=2, metavar=("A_SRC", "B_SRC"), default=None)
    ap.add_argument("--rounds", type=int, default=5, help="--ab: runs per tree")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="--ab: seconds per run")
    ap.add_argument("--base", default="default")
    ap.add_argument("--setting", default="bfloat16", help="float32, bfloat16, bfloat16+int8, ...")
    ap.add_argument("--rows", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--adapters", type=int, default=16, help="resident (unused) adapters")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed runs inside one process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampling", choices=("greedy", "top_p"), default="greedy")
    ap.add_argument("--split", action="store_true", help="also a run with wall-clock timers")
    return ap.parse_args()


class Timers:
    """Wall-clock totals of wrapped callables (seconds per label); each label is its own span
    (a label inside another is counted in both)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.undo: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        old = getattr(owner, name)
        had = name in vars(owner)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return old(*args, **kwargs)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, name, timed)
        self.undo.append((owner, name, old, had))

    def restore(self) -> None:
        for owner, name, old, had in reversed(self.undo):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        self.undo = []


def one_tree(args: argparse.Namespace) -> dict:
    # The data beside this checkout, also for a tree copied elsewhere (--src).
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
    if os.path.isdir(data):
        os.environ.setdefault("LORAFLEET_DATA", os.path.abspath(data))
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    import inspect

    import torch

    torch.set_num_threads(args.threads)
    import lorafleet
    from lorafleet.bench.engine import gsm8k_prompts, random_adapters
    from lorafleet.bench.settings import parse_setting
    from lorafleet.models import load_base
    from lorafleet.serve.engine import Engine
    from lorafleet.serve.sequence import SamplingParams

    dtype, quantize = parse_setting(args.setting)
    loaded = load_base(args.base, dtype=dtype)
    loaded.model.eval()
    made = random_adapters(loaded.model, args.adapters, 16) if args.adapters else []
    length = args.prompt_tokens + args.new_tokens
    kwargs = {}
    if "prefix_cache_bytes" in inspect.signature(Engine).parameters:
        kwargs["prefix_cache_bytes"] = 0  # fresh prompts anyway; measure the step alone
    engine = Engine(
        loaded,
        max_slots=max(1, args.adapters),
        max_rank=16,
        max_batch_size=max(args.rows, 1),
        max_batch_tokens=max(args.rows * args.prompt_tokens, args.prompt_tokens + 1),
        max_seq_len=length + 8,
        quantize=quantize,
        **kwargs,
    )
    for i, adapter in enumerate(made):
        engine.load_adapter(f"a{i}", adapter)
    need = args.rows * (args.reps + 3)
    prompts = gsm8k_prompts(loaded.tokenizer, need, args.prompt_tokens)
    if args.sampling == "greedy":
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    else:
        params = SamplingParams(
            max_tokens=args.new_tokens, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True
        )
    used = [0]

    def run_once() -> tuple[list[float], float, int]:
        batch = prompts[used[0] : used[0] + args.rows]
        used[0] += args.rows
        for ids in batch:
            engine.add_request(ids, None, params)
        steps, tokens = [], 0
        start = time.perf_counter()
        while engine.has_unfinished():
            t = time.perf_counter()
            done = engine.step()
            steps.append(time.perf_counter() - t)
            tokens += sum(len(o.token_ids) for o in done)
        return steps[1:], time.perf_counter() - start, tokens  # steps[0] prefills

    run_once()  # warm-up on the real shapes
    medians, tok_s = [], []
    for _ in range(args.reps):
        decode, seconds, tokens = run_once()
        medians.append(1e3 * statistics.median(decode))
        tok_s.append(tokens / seconds)
    out = {
        "src": os.path.dirname(os.path.dirname(os.path.abspath(lorafleet.__file__))),
        "setting": args.setting,
        "rows": args.rows,
        "sampling": args.sampling,
        "threads": args.threads,
        "decode_step_ms": medians,
        "tok_s": tok_s,
    }
    if args.split:
        out["split_ms"] = split(engine, run_once)
    return out


def split(engine, run_once) -> dict:
    """Mean ms per decode step of each part (one run with timers; the prefill step left out)."""
    import torch.nn.functional as F

    import lorafleet.serve.engine as engine_mod
    from lorafleet.layers.linear import MultiLoRALinear

    timers = Timers()
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.runner, "build", "build_inputs")
    timers.wrap(engine.runner, "forward", "forward")
    timers.wrap(engine.runner, "attend", "attention")
    timers.wrap(engine.runner, "write_kv", "kv_write")
    timers.wrap(F, "linear", "linear")
    timers.wrap(MultiLoRALinear, "add_adapters", "lora_check")
    timers.wrap(engine_mod, "sample", "sampling")
    timers.wrap(engine_mod, "sampled_logprobs", "sampling_logprobs")
    timers.wrap(engine, "_append", "append_detok_emit")
    original_step = engine.step
    step_times: list[float] = []

    def timed_step():
        start = time.perf_counter()
        try:
            return original_step()
        finally:
            step_times.append(time.perf_counter() - start)

    engine.step = timed_step
    try:
        run_once()
    finally:
        engine.step = original_step
        timers.restore()
    # The first step prefilled: take its share out by scaling every part over all steps.
    n = len(step_times)
    prefill_share = step_times[0] / sum(step_times)
    per_step = {k: 1e3 * v * (1 - prefill_share) / (n - 1) for k, v in timers.total.items()}
    per_step["step"] = 1e3 * sum(step_times[1:]) / (n - 1)
    per_step["linear_calls_per_step"] = timers.calls.get("linear", 0) / n
    return per_step


def ab(args: argparse.Namespace) -> None:
    a_src, b_src = args.ab
    cleaned = [
        *("--base", args.base, "--setting", args.setting, "--rows", str(args.rows)),
        *("--adapters", str(args.adapters), "--prompt-tokens", str(args.prompt_tokens)),
        *("--new-tokens", str(args.new_tokens), "--reps", str(args.reps)),
        *("--threads", str(args.threads), "--sampling", args.sampling),
    ]
    runs: dict[str, list[dict]] = {a_src: [], b_src: []}
    for r in range(args.rounds):
        for src in (a_src, b_src):
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--src", src, *cleaned]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=args.run_timeout
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode or not line:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"run of {src} failed")
            result = json.loads(line[-1])
            result["load1"] = load
            runs[src].append(result)
            print(
                f"round {r + 1} {src:>20}: decode step median "
                f"{statistics.median(result['decode_step_ms']):.2f} ms, "
                f"{statistics.median(result['tok_s']):.1f} tok/s, load {load:.2f}",
                flush=True,
            )
    summary = {}
    for src, results in runs.items():
        step = [statistics.median(x["decode_step_ms"]) for x in results]
        tok = [statistics.median(x["tok_s"]) for x in results]
        summary[src] = {
            "decode_step_ms_median": statistics.median(step),
            "decode_step_ms_min": min(step),
            "decode_step_ms_max": max(step),
            "tok_s_median": statistics.median(tok),
            "tok_s_min": min(tok),
            "loads": [round(x["load1"], 2) for x in results],
        }
    a, b = summary[a_src], summary[b_src]
    faster = (
        b["decode_step_ms_median"] < a["decode_step_ms_median"]
        and b["decode_step_ms_max"] < a["decode_step_ms_min"]
    )
    summary["b_over_a_tok_s"] = b["tok_s_median"] / a["tok_s_median"]
    summary["a_over_b_step"] = a["decode_step_ms_median"] / b["decode_step_ms_median"]
    summary["verdict"] = "faster" if faster else "no clear difference"
    print(json.dumps(summary))


def main() -> None:
    args = parse()
    if args.ab:
        ab(args)
    else:
        print(json.dumps(one_tree(args)))


if __name__ == "__main__":
    main()
