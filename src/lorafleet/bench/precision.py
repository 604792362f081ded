"""Benchmark: the engine's speed in float32, bfloat16 and with int8 / int4 base linears
(and, with a setting ending in "+unfused", without the fused q/k/v and gate/up GEMMs).

One process holds an engine per setting (each on its own copy of the base, the same random
adapters loaded into each) and runs every scenario on every engine in turn, `reps` rounds,
best of: their ratios then hold under other load on the machine. Scenarios: `requests`
requests over `adapters` adapters (request i uses adapter i % k), the same requests all on
the base, and a single stream (one request on the base). Greedy, EOS ignored, so every
request generates `new_tokens` tokens; tokens/s is over generation only (loading excluded)."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.bench import print_table, write_json

DEFAULT_SETTINGS = ("float32", "bfloat16", "int8", "int4", "bfloat16+int8", "bfloat16+int4")
SCENARIOS = ("adapters", "all_base", "single_stream")


def _engines(base: str, settings, adapters: int, rank: int, requests: int, length: int) -> dict:
    from lorafleet.bench.engine import random_adapters
    from lorafleet.bench.settings import parse_setting
    from lorafleet.layers import weight_bytes
    from lorafleet.models import load_base
    from lorafleet.serve import Engine

    made = random_adapters(load_base(base).model, adapters, rank)
    out = {}
    for text in settings:
        clean, fuse = split_fuse(text)
        dtype, quantize = parse_setting(clean)
        loaded = load_base(base, dtype=dtype)
        engine = Engine(
            loaded,
            max_slots=adapters,
            max_rank=rank,
            max_batch_size=requests,
            max_batch_tokens=max(requests * length, 64),
            max_seq_len=length + 8,
            quantize=quantize,
            fuse=fuse,
        )
        for i, adapter in enumerate(made):
            engine.load_adapter(f"a{i}", adapter)
        out[f"{dtype}+{quantize}" + ("" if fuse else "+unfused")] = (
            engine,
            weight_bytes(loaded.model),
        )
    return out


def split_fuse(text: str) -> tuple[str, bool]:
    """'float32+unfused' -> ('float32', False): the engine without fused q/k/v and gate/up
    GEMMs (layers/fused.py); any other setting -> (setting, True)."""
    parts = str(text).split("+")
    kept = [p for p in parts if p.lower() != "unfused"]
    return "+".join(kept) or "float32", len(kept) == len(parts)


def _requests(scenario: str, prompts: list[list[int]], adapters: int, new_tokens: int) -> list:
    from lorafleet.serve import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    if scenario == "single_stream":
        return [(prompts[0], None, params)]
    if scenario == "all_base":
        return [(p, None, params) for p in prompts]
    return [(p, f"a{i % adapters}", params) for i, p in enumerate(prompts)]


def _timed(engine, reqs: list) -> tuple[int, float]:
    start = time.perf_counter()
    outs = engine.generate(reqs)
    seconds = time.perf_counter() - start
    bad = [o.error for o in outs if o.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"engine request failed: {bad[0]}")
    return sum(len(o.token_ids) for o in outs), seconds


def run(
    base: str = "default",
    settings=DEFAULT_SETTINGS,
    requests: int = 32,
    adapters: int = 16,
    prompt_tokens: int = 100,
    new_tokens: int = 64,
    rank: int = 16,
    reps: int = 2,
    json_out: str | Path = "bench/results/precision.json",
) -> dict:
    """tokens/s per (setting, scenario) and each setting's ratio to float32; table + JSON."""
    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.bench.settings import parse_setting

    for text in settings:
        parse_setting(split_fuse(text)[0])  # a bad name fails before anything loads
    settings = tuple(dict.fromkeys(("float32", *settings)))  # float32 first: the reference
    engines = _engines(base, settings, adapters, rank, requests, prompt_tokens + new_tokens)
    first = next(iter(engines.values()))[0]
    prompts = gsm8k_prompts(first.tokenizer, requests, prompt_tokens)
    for engine, _ in engines.values():  # warm up every path once
        engine.generate(_requests("adapters", prompts[:2], adapters, 2))
    best: dict[tuple[str, str], tuple[int, float]] = {}
    for rep in range(reps):
        for scenario in SCENARIOS:
            for key, (engine, _) in engines.items():
                tokens, seconds = _timed(engine, _requests(scenario, prompts, adapters, new_tokens))
                if seconds < best.get((key, scenario), (0, float("inf")))[1]:
                    best[(key, scenario)] = (tokens, seconds)
                print(
                    f"  round {rep + 1}: {key:<16} {scenario:<14} {tokens / seconds:7.1f} tok/s",
                    flush=True,
                )
    rows = []
    for key, (_, size) in engines.items():
        row = {"setting": key, "weight_mb": size / 2**20}
        for scenario in SCENARIOS:
            tokens, seconds = best[(key, scenario)]
            ref_tokens, ref_seconds = best[(next(iter(engines)), scenario)]
            row[f"{scenario}_tok_s"] = tokens / seconds
            row[f"{scenario}_vs_fp32"] = (tokens / seconds) / (ref_tokens / ref_seconds)
        rows.append(row)
    figures = {
        "benchmark": "precision",
        "base": base,
        "requests": requests,
        "adapters": adapters,
        "rank": rank,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "reps": reps,
        "rows": rows,
    }
    columns = ["setting", "weight_mb"]
    columns += [f"{s}_{what}" for s in SCENARIOS for what in ("tok_s", "vs_fp32")]
    print_table(rows, columns)
    print(f"wrote {write_json(json_out, figures)}")
    return figures
