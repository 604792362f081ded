"""Benchmark: the serving engine on each model family's tiny random base (`tiny`, `tiny-qwen3`,
...), one row per family: tokens/s with K adapters in the batch, on the base alone, with every
request mixing two adapters, and against transformers + PEFT one request at a time.

Each family runs `bench.engine`'s engine pair and sequential-PEFT variants (each in its own
process, on the same gsm8k prompts, greedy, EOS ignored; see bench/engine.py). The tiny bases
are 2-layer, 64-wide models: the figures compare the families' runners (windows, biases, q/k
norms, fused projections) under one load, not real model speed."""

from __future__ import annotations

from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.bench.engine import run as run_engine
from lorafleet.models.sources import TINY

VARIANTS = ("engine_pair", "sequential_peft")
COLUMNS = [
    "base",
    "family",
    "engine_tok_s",
    "all_base_tok_s",
    "vs_sequential",
    "vs_all_base",
    "mix2_vs_single",
    "parity",
]


def run(
    bases: list[str],
    requests: int = 32,
    adapters: int = 16,
    prompt_tokens: int = 100,
    new_tokens: int = 64,
    rank: int = 16,
    json_out: str | Path = "bench/results/families.json",
    quick: bool = False,
) -> dict:
    """One engine run per base (each base's own figures beside json_out, as
    `<stem>-<base>.json`), then the table of all of them, written to json_out."""
    json_out = Path(json_out)
    rows = []
    for base in bases:
        print(f"== {base}", flush=True)
        figures = run_engine(
            base=base,
            requests=requests,
            adapters=adapters,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            rank=rank,
            json_out=json_out.with_name(f"{json_out.stem}-{base}.json"),
            quick=quick,
            variants_to_run=VARIANTS,
        )
        base_only = (figures["variants"].get("engine_all_base") or {}).get("tokens_per_s")
        rows.append(
            {
                "base": base,
                "family": TINY.get(base, "?"),
                "engine_tok_s": figures["tokens_per_s"],
                "all_base_tok_s": base_only,
                "vs_sequential": figures["vs_sequential"],
                "vs_all_base": figures["vs_all_base"],
                "mix2_vs_single": figures["mix2_vs_single"],
                "parity": figures["parity_request0"],
            }
        )
    print_table(rows, COLUMNS)
    last = figures if bases else {}
    settings = {
        k: last.get(k) for k in ("requests", "adapters", "rank", "prompt_tokens", "new_tokens")
    }
    print(f"wrote {write_json(json_out, {'benchmark': 'families', 'rows': rows, **settings})}")
    return {"rows": rows, **settings}
