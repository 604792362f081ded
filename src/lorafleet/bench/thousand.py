"""Benchmark: many adapters on disk (e.g. 1,000) behind a few resident slots through the tiered
registry, requests drawn uniformly and by Zipf(1.0) popularity, against 16 adapters kept
resident, each variant in its own spawned process (so its peak RSS is its own).

The adapters (LoRA rank `rank` on q_proj and v_proj, random weights with fixed seeds) are
written once to `cache_dir` and reused while the base, rank and count match. tokens/s is the
generated tokens over the wall time of generation (cold loads included: the tiered runs start
with an empty CPU tier); time to first token counts from when all requests were added."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.bench.child import run_in_child

SEED = 4321
SCALE = 0.02
TARGETS = ["q_proj", "v_proj"]
POPULARITIES = ("uniform", "zipf")
MANIFEST = "bench-adapters.json"


def adapter_names(count: int) -> list[str]:
    return [f"t{i:04d}" for i in range(count)]


def ensure_adapters(base: str, count: int, rank: int, cache_dir: Path) -> Path:
    """Write `count` random adapters for `base` into `cache_dir` (once; reused when the
    manifest matches), with a progress bar; returns the directory."""
    import torch
    from tqdm.auto import tqdm

    from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter, write_adapter
    from lorafleet.fsutil import atomic_write_json
    from lorafleet.models import load_base

    cache_dir = Path(cache_dir)
    want = {"base": base, "rank": rank, "targets": TARGETS, "seed": SEED, "scale": SCALE}
    names = adapter_names(count)
    manifest = cache_dir / MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want and have.get("count", 0) >= count:
            return cache_dir
    loaded = load_base(base)
    config = MethodConfig(method="lora", rank=rank, alpha=2.0 * rank, targets=TARGETS)
    peft_model = new_adapter(loaded.model, config)
    lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    for i, name in enumerate(tqdm(names, desc=f"adapters -> {cache_dir}", unit="adapter")):
        if (cache_dir / name / "adapter_model.safetensors").is_file():
            continue  # written by an earlier, interrupted run
        gen = torch.Generator().manual_seed(SEED + i)
        with torch.no_grad():
            for _, p in lora:
                p.copy_(SCALE * torch.randn(p.shape, generator=gen))
        adapter = adapter_from_model(peft_model, base_fingerprint=loaded.fingerprint)
        write_adapter(cache_dir / name, adapter)
    peft_model.unload()
    atomic_write_json(manifest, {**want, "count": count})
    return cache_dir


def draw(popularity: str, adapters: int, requests: int, seed: int = SEED) -> list[int]:
    """Adapter index per request: uniform, Zipf(1.0) over a shuffled ranking (p_k ~ 1/k), or
    `fixed` (request i uses i % adapters)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if popularity == "fixed":
        return [i % adapters for i in range(requests)]
    if popularity == "uniform":
        return rng.integers(0, adapters, requests).tolist()
    if popularity == "zipf":
        weights = 1.0 / np.arange(1, adapters + 1)
        ranked = rng.permutation(adapters)  # the most popular adapter is a random one
        return ranked[rng.choice(adapters, requests, p=weights / weights.sum())].tolist()
    raise ValueError(f"unknown popularity {popularity!r}")


def _variant(cfg: dict) -> dict:
    """One run in this (child) process: engine + registry over the adapters directory."""
    import torch

    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.models import load_base
    from lorafleet.serve import AdapterRegistry, Engine
    from lorafleet.serve.sequence import SamplingParams

    torch.manual_seed(0)
    loaded = load_base(cfg["base"])
    loaded.model.eval()
    n, p, new = cfg["requests"], cfg["prompt_tokens"], cfg["new_tokens"]
    prompts = gsm8k_prompts(loaded.tokenizer, n, p)
    engine = Engine(
        loaded,
        max_slots=cfg["slots"],
        max_rank=cfg["rank"],
        max_batch_size=cfg["batch"],
        max_batch_tokens=max(cfg["batch"] * p, p + 1),
        max_seq_len=p + new + 8,
    )
    registry = AdapterRegistry(
        engine, cfg["dir"], cpu_cache_bytes=cfg["cpu_cache"], loader_threads=cfg["loaders"]
    )
    names = adapter_names(cfg["adapters"])
    picks = [names[i] for i in draw(cfg["popularity"], cfg["adapters"], n)]
    engine.generate([(prompts[0][:8], None, SamplingParams(max_tokens=2))])  # warm the kernels
    if cfg["popularity"] == "fixed":  # the reference: its adapters resident before timing
        engine.generate([(prompts[0][:8], a, SamplingParams(max_tokens=1)) for a in set(picks)])
    before, loads_before = registry.stats(), registry.load_times.count
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    first: dict[int, float] = {}

    def on_token(event, _first=first):
        _first.setdefault(event.request_id, time.perf_counter())

    start = time.perf_counter()
    reqs = [(ids, a, params, on_token) for ids, a in zip(prompts, picks, strict=True)]
    outs = engine.generate(reqs)
    seconds = time.perf_counter() - start
    bad = [o for o in outs if o.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"request failed: {bad[0].error}")
    stats = registry.stats()
    registry.close()
    counts = {
        k: stats[k] - before[k]
        for k in ("hits", "cpu_hits", "misses", "evictions_cpu", "evictions_slot")
    }
    ttft = sorted(t - start for t in first.values())
    # The timed run's cold loads only (the last 4096 are kept: more than a run here makes).
    cold = sorted(list(registry.load_times.recent)[loads_before:])
    return {
        "tokens": sum(len(o.token_ids) for o in outs),
        "seconds": seconds,
        "distinct": len(set(picks)),
        **counts,
        "slot_hit_rate": _rate(
            counts["hits"], counts["hits"] + counts["cpu_hits"] + counts["misses"]
        ),
        "cpu_hit_rate": _rate(counts["cpu_hits"], counts["cpu_hits"] + counts["misses"]),
        "no_disk_read_share": 1 - counts["misses"] / n,
        "cold_load_p50_ms": _ms(_quantile(cold, 0.5)),
        "cold_load_p99_ms": _ms(_quantile(cold, 0.99)),
        "cpu_mb_end": stats["cpu_bytes"] / 2**20,
        "ttft_p50_s": _quantile(ttft, 0.5),
        "ttft_p99_s": _quantile(ttft, 0.99),
    }


def _quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted `values` (None when empty)."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.5) - 1))]


def _rate(a: int, b: int) -> float | None:
    return a / b if b else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def run(
    base: str = "default",
    adapters: int = 1000,
    slots: int = 32,
    requests: int = 256,
    popularity: tuple[str, ...] = POPULARITIES,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    rank: int = 8,
    cache_dir: str | Path | None = None,
    cpu_cache: str = "512MB",
    loaders: int = 1,
    reference_adapters: int = 16,
    json_out: str | Path = "bench/results/thousand.json",
    limit_s: float = 3600.0,
) -> dict:
    """The reference (`reference_adapters` resident, request i uses i % k), then one run per
    popularity over all `adapters`; tokens/s relative to the reference."""
    from lorafleet.serve.adapter_store import parse_size

    parse_size(cpu_cache)  # a bad size fails now, not in a child
    cache_dir = Path(cache_dir or f"runs/bench-adapters/{base}-r{rank}-qv")
    ensure_adapters(base, max(adapters, reference_adapters), rank, cache_dir)
    common = {
        "base": base,
        "slots": slots,
        "batch": slots,
        "requests": requests,
        "rank": rank,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "dir": str(cache_dir),
        "cpu_cache": cpu_cache,
        "loaders": loaders,
    }
    plan = [("fixed", min(reference_adapters, slots))] + [(p, adapters) for p in popularity]
    rows, variants = [], {}
    for pop, count in plan:
        label = f"{count} adapters, {pop}"
        print(f"running {label} ...", flush=True)
        r = run_in_child(
            _variant, {**common, "popularity": pop, "adapters": count}, limit_s=limit_s
        )
        if "error" in r:
            print(f"  {label}: {r['error']}", flush=True)
        else:
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
        variants[label] = r
        rows.append({"variant": label, **r})
    ref = variants[f"{plan[0][1]} adapters, fixed"].get("tokens_per_s")
    for row in rows:
        tps = row.get("tokens_per_s")
        row["vs_reference"] = tps / ref if tps and ref else None
        variants[row["variant"]]["vs_reference"] = row["vs_reference"]
    print_table(
        rows,
        [
            "variant",
            "distinct",
            "tokens_per_s",
            "vs_reference",
            "slot_hit_rate",
            "cpu_hit_rate",
            "misses",
            "no_disk_read_share",
            "cold_load_p50_ms",
            "cold_load_p99_ms",
            "ttft_p50_s",
            "ttft_p99_s",
            "peak_rss_mb",
        ],
    )
    figures = {
        "benchmark": "thousand",
        **common,
        "adapters": adapters,
        "reference_adapters": plan[0][1],
        "variants": variants,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
