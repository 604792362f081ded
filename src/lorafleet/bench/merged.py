"""Benchmark: one adapter served merged into the base vs unmerged (A Note on LoRA's trade-off).

Same model, prompts and greedy decoding: prefill tokens/s (one forward over the prompt batch)
and decode tokens/s (generate, EOS ignored) with the adapter attached through PEFT (unmerged:
x W + s x A^T B^T per layer) and with s B A folded into W (`lorafleet merge --into-base`).
Variants alternate, best of `reps`, so their ratio holds under other load."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from lorafleet.bench import print_table, write_json


def _timed(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def _prefill(model, ids):
    with torch.no_grad():
        model(input_ids=ids)


def _decode(model, ids, new_tokens: int):
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )


def run(
    base: str = "default",
    rank: int = 16,
    batch: int = 8,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    reps: int = 3,
    json_out: str | Path = "bench/results/merged.json",
) -> list[dict]:
    from lorafleet.adapters import attach
    from lorafleet.bench.engine import gsm8k_prompts, random_adapters
    from lorafleet.compose import dense_deltas
    from lorafleet.compose.export import fold_deltas
    from lorafleet.models import load_base

    loaded = load_base(base)
    adapter = random_adapters(loaded.model, 1, rank)[0]
    merged = copy.deepcopy(loaded.model)
    fold_deltas(merged, dense_deltas(adapter))
    unmerged = attach(loaded.model, adapter)
    ids = torch.tensor(gsm8k_prompts(loaded.tokenizer, batch, prompt_tokens))
    models = {"unmerged (PEFT)": unmerged, "merged (--into-base)": merged}
    for m in models.values():  # warm up
        _decode(m, ids[:, :8], 2)
    rows = {
        name: {"variant": name, "prefill_s": float("inf"), "decode_s": float("inf")}
        for name in models
    }
    for _ in range(reps):  # alternate the variants
        for name, m in models.items():
            row = rows[name]
            row["prefill_s"] = min(row["prefill_s"], _timed(lambda m=m: _prefill(m, ids), 1))
            decode = _timed(lambda m=m: _decode(m, ids, new_tokens), 1)
            row["decode_s"] = min(row["decode_s"], decode)
    for r in rows.values():
        r["prefill_tok_s"] = batch * prompt_tokens / r["prefill_s"]
        r["decode_tok_s"] = batch * new_tokens / r["decode_s"]
    un, me = rows["unmerged (PEFT)"], rows["merged (--into-base)"]
    for r in rows.values():
        r["prefill_vs_unmerged"] = r["prefill_tok_s"] / un["prefill_tok_s"]
        r["decode_vs_unmerged"] = r["decode_tok_s"] / un["decode_tok_s"]
    table = list(rows.values())
    print_table(
        table,
        ["variant", "prefill_tok_s", "prefill_vs_unmerged", "decode_tok_s", "decode_vs_unmerged"],
    )
    write_json(
        json_out,
        {
            "base": base,
            "rank": rank,
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "reps": reps,
            "rows": table,
            "merged_speedup_decode": me["decode_vs_unmerged"],
            "merged_speedup_prefill": me["prefill_vs_unmerged"],
        },
    )
    print(f"wrote {json_out}")
    return table
