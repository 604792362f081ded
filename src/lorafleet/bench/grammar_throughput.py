"""Benchmark: what structured output costs in the batch. The same `requests` rows (same prompts,
adapters and lengths, greedy, EOS ignored) run unconstrained, and with every other row
constrained to a JSON schema (four schemas, rows spread over `adapters` random LoRAs): decode
throughput of each, interleaved runs in one engine, medians of `reps`.

The constrained rows' schemas are arrays of at least MIN_ITEMS objects, which no row finishes
within `new_tokens`, so every row generates exactly `new_tokens` tokens in both runs (checked)
and the ratio is the masks' cost alone."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from lorafleet.bench import machine, print_table, write_json
from lorafleet.bench.grammar_engines import SCHEMAS

MIN_ITEMS = 100  # items per constrained array: far more tokens than any run generates


def constrained_specs() -> list:
    """The four schemas (nested, enum, array, numbers) as arrays that cannot end early."""
    from lorafleet.serve.grammar import GrammarSpec

    return [
        GrammarSpec.json_schema({"type": "array", "items": schema, "minItems": MIN_ITEMS})
        for name, schema, _ in SCHEMAS
        if name != "json_object"
    ]


def run(
    base: str,
    requests: int,
    adapters: int,
    prompt_tokens: int,
    new_tokens: int,
    reps: int,
    threads: int | None,
    json_out: Path | None,
) -> dict:
    import torch

    from lorafleet.bench.engine import gsm8k_prompts, random_adapters
    from lorafleet.models import load_base
    from lorafleet.serve.engine import Engine
    from lorafleet.serve.sequence import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = load_base(base)
    loaded.model.eval()
    prompts = gsm8k_prompts(loaded.tokenizer, requests, prompt_tokens)
    made = random_adapters(loaded.model, adapters, 16) if adapters else []
    engine = Engine(
        loaded,
        max_slots=max(1, adapters),
        max_rank=16,
        max_batch_size=requests,
        max_batch_tokens=max(requests * prompt_tokens, prompt_tokens + 1),
        max_seq_len=prompt_tokens + new_tokens + 8,
    )
    names = [f"a{i}" for i in range(len(made))]
    for name, adapter in zip(names, made, strict=True):
        engine.load_adapter(name, adapter)
    specs = constrained_specs()
    plain = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def batch(kind: str) -> list:
        out = []
        for i, ids in enumerate(prompts):
            params = plain
            if kind == "half_constrained" and i % 2 == 1:
                params = SamplingParams(
                    max_tokens=new_tokens,
                    temperature=0.0,
                    ignore_eos=True,
                    grammar=specs[(i // 2) % len(specs)],
                )
            out.append((ids, names[i % len(names)] if names else None, params))
        return out

    # Warm up: the first constrained request pays the tokenizer setup and the compiles.
    engine.generate([(r[0][:8], r[1], r[2]) for r in batch("half_constrained")[:8]])
    seconds: dict[str, list[float]] = {"unconstrained": [], "half_constrained": []}
    tokens: dict[str, int] = {}
    for _ in range(reps):
        for kind in seconds:
            reqs = batch(kind)
            start = time.perf_counter()
            outs = engine.generate(reqs)
            seconds[kind].append(time.perf_counter() - start)
            bad = [o for o in outs if o.finish_reason == "error"]
            if bad:
                raise RuntimeError(f"engine request failed: {bad[0].error}")
            short = [o for o in outs if len(o.token_ids) != new_tokens]
            if short:
                raise RuntimeError(f"a row ended early ({len(short[0].token_ids)} tokens)")
            tokens[kind] = sum(len(o.token_ids) for o in outs)
    rows = []
    for kind, times in seconds.items():
        median = statistics.median(times)
        rows.append(
            {
                "run": kind,
                "rows": requests,
                "constrained": requests // 2 if kind == "half_constrained" else 0,
                "tokens": tokens[kind],
                "median_s": median,
                "tok_per_s": tokens[kind] / median,
            }
        )
    ratio = rows[1]["tok_per_s"] / rows[0]["tok_per_s"]
    print_table(rows, ["run", "rows", "constrained", "tokens", "median_s", "tok_per_s"])
    print(f"half constrained / unconstrained throughput: {ratio:.3f} (target >= 0.85)")
    print(machine())
    result = {
        "base": base,
        "requests": requests,
        "adapters": adapters,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "reps": reps,
        "runs": rows,
        "all_seconds": seconds,
        "ratio": ratio,
    }
    if json_out is not None:
        write_json(json_out, result)
        print(f"wrote {json_out}")
    return result
