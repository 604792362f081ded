"""Benchmark: what bfloat16 and int8 / int4 base linears cost in quality against float32.

Every setting is an engine on its own copy of the base, run in lockstep with the float32
reference on the same prompts (real text, `prompt_tokens` ids each):

- logit error, teacher-forced: every engine prefills the prompts, then decodes the reference's
  greedy tokens for `new_tokens` steps (the serving paths: packed prefill, batched decode
  rows); at each of these 1 + new_tokens positions: max and mean |logit - reference logit|
  over the vocabulary, and top-1 kept (the setting's argmax equals the reference's).
- greedy agreement, free-running: each setting decodes greedily on its own; per prompt, the
  length of the prefix its tokens share with the reference's, over `new_tokens` (1.0 = the
  same tokens throughout; tokens after a first divergence are not compared, they continue
  another text). Also the share of prompts whose tokens are all the same.

Pass rule (PASS_RULE): top-1 kept >= 0.95 and mean greedy agreement >= 0.8."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.bench import print_table, write_json

SETTINGS = (
    ("bfloat16", "none"),
    ("float32", "int8"),
    ("float32", "int4"),
    ("bfloat16", "int8"),
    ("bfloat16", "int4"),
)
PASS_TOP1, PASS_AGREEMENT = 0.95, 0.8
PASS_RULE = f"top1_kept >= {PASS_TOP1} and greedy_agreement >= {PASS_AGREEMENT}"


def parse_setting(text: str) -> tuple[str, str]:
    """'bfloat16', 'int8', 'bfloat16+int4' -> (dtype, quantize); one-line error otherwise."""
    from lorafleet.layers import check_quantize
    from lorafleet.models import parse_dtype

    dtype, quantize = "float32", "none"
    for part in str(text).lower().split("+"):
        if part in ("int8", "int4", "none"):
            quantize = check_quantize(part)
        else:
            dtype = str(parse_dtype(part)).removeprefix("torch.")
    return dtype, quantize


def _engine(base: str, dtype: str, quantize: str, n: int, length: int):
    from lorafleet.models import load_base
    from lorafleet.serve import Engine

    loaded = load_base(base, dtype=dtype)
    return Engine(
        loaded,
        max_slots=0,
        max_batch_size=n,
        max_batch_tokens=max(n * length, 64),
        max_seq_len=length + 2,
        quantize=quantize,
        seed=0,
    )


def _lockstep(engines: dict, prompts: list[list[int]], new_tokens: int, progress) -> dict:
    """Teacher-forced logit figures of every engine against engines["reference"]."""
    from lorafleet.serve import SamplingParams, Sequence

    seqs = {}
    for key, engine in engines.items():
        seqs[key] = [Sequence(i, ids, None, SamplingParams()) for i, ids in enumerate(prompts)]
        for s in seqs[key]:
            s.kv_slot, s.lora_slot = engine.kv.allocate(), 0
    stats = {k: {"max": 0.0, "sum": 0.0, "count": 0, "top1": 0, "rows": 0} for k in engines}
    for step in range(new_tokens + 1):
        logits = {}
        for key, engine in engines.items():
            prefill, decode = (seqs[key], []) if step == 0 else ([], seqs[key])
            logits[key] = engine.forward(prefill, decode).float()  # [n, vocab]
        ref = logits["reference"]
        top = ref.argmax(dim=-1)  # [n]: the reference's greedy tokens, fed to every engine
        for key, out in logits.items():
            err, s = (out - ref).abs(), stats[key]
            s["max"] = max(s["max"], err.max().item())
            s["sum"] += err.sum().item()
            s["count"] += err.numel()
            s["top1"] += int((out.argmax(dim=-1) == top).sum())
            s["rows"] += top.numel()
            for seq, token in zip(seqs[key], top.tolist(), strict=True):
                seq.num_cached = seq.num_tokens
                seq.generated.append(token)
        progress()
    for key, engine in engines.items():  # give the KV rows back for the greedy runs
        for seq in seqs[key]:
            engine.kv.free(seq.kv_slot)
    return {
        k: {
            "max_logit_error": s["max"],
            "mean_logit_error": s["sum"] / s["count"],
            "top1_kept": s["top1"] / s["rows"],
        }
        for k, s in stats.items()
    }


def _greedy(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from lorafleet.serve import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [list(o.token_ids) for o in engine.generate([(p, None, params) for p in prompts])]


def _agreement(ref: list[list[int]], got: list[list[int]], n: int) -> tuple[float, float]:
    """(mean shared-prefix share, share of prompts identical throughout)."""
    shares = []
    for a, b in zip(ref, got, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), n)
        shares.append(same / n)
    return sum(shares) / len(shares), sum(s == 1.0 for s in shares) / len(shares)


def run(
    base: str = "default",
    settings=SETTINGS,
    prompts: int = 32,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    json_out: str | Path = "bench/results/quality.json",
) -> dict:
    """Every setting against float32 (see the module doc); prints a table, writes JSON."""
    from rich.progress import Progress

    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.layers import weight_bytes

    start = time.perf_counter()
    length = prompt_tokens + new_tokens
    engines = {"reference": _engine(base, "float32", "none", prompts, length)}
    for dtype, quantize in settings:
        engines[f"{dtype}+{quantize}"] = _engine(base, dtype, quantize, prompts, length)
    ids = gsm8k_prompts(engines["reference"].tokenizer, prompts, prompt_tokens)
    with Progress(transient=True) as bar:
        task = bar.add_task("teacher-forced steps", total=new_tokens + 1)
        logit = _lockstep(engines, ids, new_tokens, lambda: bar.advance(task))
        task = bar.add_task("greedy runs", total=len(engines))
        greedy = {}
        for key, engine in engines.items():
            greedy[key] = _greedy(engine, ids, new_tokens)
            bar.advance(task)
    rows = []
    for key, engine in engines.items():
        agree, exact = _agreement(greedy["reference"], greedy[key], new_tokens)
        row = {
            "setting": key,
            "weight_mb": weight_bytes(engine.base.model) / 2**20,
            **logit[key],
            "greedy_agreement": agree,
            "prompts_identical": exact,
        }
        row["passes"] = row["top1_kept"] >= PASS_TOP1 and agree >= PASS_AGREEMENT
        rows.append(row)
    figures = {
        "benchmark": "quality",
        "base": base,
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "pass_rule": PASS_RULE,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    print_table(
        rows,
        [
            "setting",
            "weight_mb",
            "max_logit_error",
            "mean_logit_error",
            "top1_kept",
            "greedy_agreement",
            "prompts_identical",
            "passes",
        ],
    )
    print(f"pass rule: {PASS_RULE}")
    print(f"wrote {write_json(json_out, figures)}")
    return figures
