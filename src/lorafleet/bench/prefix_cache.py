"""Benchmark: adapter-aware prefix caching on and off, with a shared system prompt and without.

Workloads (issue 33), in-process on one engine per setting (the same base loaded twice, the same
adapters, `lorafleet serve`'s batch limits), each engine stepping on its own thread as a server's:
`clients` closed-loop client threads, client i on adapter i % `adapters`, each sending `rounds`
requests one after another (the next when the last finished), greedy, EOS ignored, `new_tokens`
generated each:

- "shared": every prompt is the same `system_tokens` system prompt (real text) and a user turn
  of `user_tokens` of its own;
- "distinct": prompts of the same length with nothing in common (each its own text).

Per run: TTFT (add -> first token) p50 over its requests, and generated tokens per second of
its wall time. Each repetition starts cold (the prefix cache emptied) and runs every
(workload, setting) pair, the settings' order alternating per repetition (ABBA), with the
1-minute load average per run; the figures are the median (and min) over repetitions.

Pass rule (issue 33, fixed before measuring): on "shared", TTFT p50 without the cache / with it
>= 4 (medians over repetitions); on "distinct", tokens/s with the cache / without it >= 0.95."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.errors import LorafleetError

TTFT_RULE = 4.0  # shared system prompt: TTFT p50 off / on >= this
THROUGHPUT_RULE = 0.95  # no shared prefix: tok/s on / off >= this
SETTINGS = ("cache_on", "cache_off")
WORKLOADS = ("shared", "distinct")


@dataclass
class PrefixBenchConfig:
    """The benchmark's sizes; checked on creation (one-line LorafleetError)."""

    base: str = "default"
    clients: int = 32
    adapters: int = 4
    system_tokens: int = 400
    user_tokens: int = 24
    new_tokens: int = 16
    rounds: int = 3
    reps: int = 5
    rank: int = 16
    dtype: str = "float32"
    quantize: str = "none"
    max_batch_tokens: int = 2048  # lorafleet serve's default
    prefix_cache_bytes: int = 256 * 1024**2  # the engine's default
    threads: int | None = None  # the engine thread's torch threads (None: serve's, cores - 1)
    workload: str = "both"  # shared | distinct | both

    def __post_init__(self):
        if self.workload not in (*WORKLOADS, "both"):
            raise LorafleetError(
                f"workload must be shared, distinct or both, got {self.workload!r}"
            )
        for name in ("clients", "adapters", "system_tokens", "user_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise LorafleetError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rounds", "reps", "rank", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise LorafleetError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.system_tokens + self.user_tokens > self.max_batch_tokens:
            raise LorafleetError("system_tokens + user_tokens must fit max_batch_tokens")


def prompts(tokenizer, cfg: PrefixBenchConfig) -> dict[str, list[list[int]]]:
    """workload -> one prompt per request (client-major: client c's round r is c * rounds + r),
    cut from real text (bench/engine.py's gsm8k rows): "shared" = one system prompt + a user
    turn each, "distinct" = prompts of the same length, disjoint text."""
    from lorafleet.bench.engine import gsm8k_prompts

    n = cfg.clients * cfg.rounds
    length = cfg.system_tokens + cfg.user_tokens
    chunks = gsm8k_prompts(tokenizer, 1 + 2 * n, length)
    system = chunks[0][: cfg.system_tokens]
    shared = [system + chunks[1 + i][: cfg.user_tokens] for i in range(n)]
    distinct = [chunks[1 + n + i] for i in range(n)]
    return {"shared": shared, "distinct": distinct}


def run_clients(engine, names: list[str], requests: list[list[int]], cfg: PrefixBenchConfig):
    """The closed-loop clients against a started engine: (TTFTs in seconds, generated tokens,
    wall seconds)."""
    from lorafleet.serve import SamplingParams

    params = SamplingParams(max_tokens=cfg.new_tokens, ignore_eos=True)
    ttfts: list[float] = []
    tokens = [0]
    failures: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(cfg.rounds):
            done, first = threading.Event(), []
            sent = time.perf_counter()

            def on_token(event, first=first, done=done, sent=sent) -> None:
                if event.token_id is not None:
                    if not first:
                        first.append(time.perf_counter() - sent)
                    with lock:
                        tokens[0] += 1
                if event.finished:
                    if event.error:
                        with lock:
                            failures.append(event.error)
                    done.set()

            ids = requests[c * cfg.rounds + r]
            engine.add_request(ids, names[c % len(names)], params, on_token)
            done.wait()
            with lock:
                ttfts.extend(first)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"a request failed: {failures[0]}")
    return ttfts, tokens[0], seconds


def _engine(cfg: PrefixBenchConfig, cache_bytes: int, made: list):
    """One engine over a fresh load of the base, the adapters a0.. loaded, started."""
    import torch

    from lorafleet.models import load_base
    from lorafleet.serve import Engine

    torch.manual_seed(0)
    loaded = load_base(cfg.base)
    loaded.model.eval()
    engine = Engine(
        loaded,
        max_slots=cfg.adapters,
        max_rank=cfg.rank,
        max_batch_size=cfg.clients,
        max_batch_tokens=cfg.max_batch_tokens,
        max_seq_len=cfg.system_tokens + cfg.user_tokens + cfg.new_tokens + 8,
        dtype=cfg.dtype,
        quantize=cfg.quantize,
        prefix_cache_bytes=cache_bytes,
    )
    for i, adapter in enumerate(made):
        engine.load_adapter(f"a{i}", adapter)
    engine.start(cfg.threads or max(1, (os.cpu_count() or 2) - 1))  # as `lorafleet serve`
    return engine


def measure(cfg: PrefixBenchConfig) -> dict:
    """Every run's record and the summary (medians, mins, ratios, verdicts)."""
    from lorafleet.bench.engine import random_adapters
    from lorafleet.models import load_base

    source = load_base(cfg.base)
    made = random_adapters(source.model, cfg.adapters, cfg.rank)
    work = prompts(source.tokenizer, cfg)
    del source
    engines = {
        "cache_on": _engine(cfg, cfg.prefix_cache_bytes, made),
        "cache_off": _engine(cfg, 0, made),
    }
    names = [f"a{i}" for i in range(cfg.adapters)]
    try:
        for engine in engines.values():  # warm-up: one short request per adapter
            run_clients(engine, names, [p[:8] for p in work["distinct"]], _warm(cfg))
        runs = []
        for rep in range(cfg.reps):
            order = SETTINGS if rep % 2 == 0 else SETTINGS[::-1]
            for workload in [w for w in WORKLOADS if cfg.workload in (w, "both")]:
                for setting in order:
                    engine = engines[setting]
                    engine.clear_prefix_cache()
                    before = engine.stats()
                    ttfts, tokens, seconds = run_clients(engine, names, work[workload], cfg)
                    after = engine.stats()
                    runs.append(
                        {
                            "rep": rep,
                            "workload": workload,
                            "setting": setting,
                            "ttft_p50_s": statistics.median(ttfts),
                            "ttft_p99_s": _pct(ttfts, 99),
                            "tok_s": tokens / seconds,
                            "seconds": seconds,
                            "hit_tokens": after["prefix_cache_hit_tokens"]
                            - before["prefix_cache_hit_tokens"],
                            "load_1m": os.getloadavg()[0],
                        }
                    )
                    print(_line(runs[-1]), flush=True)
    finally:
        for engine in engines.values():
            engine.stop(grace_s=0)
    return {"config": asdict(cfg), "runs": runs, "summary": summarize(runs)}


def _warm(cfg: PrefixBenchConfig) -> PrefixBenchConfig:
    return PrefixBenchConfig(
        **{**asdict(cfg), "rounds": 1, "clients": cfg.adapters, "new_tokens": 2}
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _line(run: dict) -> str:
    return (
        f"rep {run['rep']} {run['workload']:<8} {run['setting']:<9} "
        f"TTFT p50 {run['ttft_p50_s']:.3f} s  {run['tok_s']:.1f} tok/s  "
        f"reused {run['hit_tokens']} tokens  load {run['load_1m']:.2f}"
    )


def summarize(runs: list[dict]) -> dict:
    """Per (workload, setting): median and min of TTFT p50 and tok/s over repetitions; the
    ratios the pass rule reads and its verdicts."""
    rows = {}
    for workload in WORKLOADS:
        for setting in SETTINGS:
            mine = [r for r in runs if r["workload"] == workload and r["setting"] == setting]
            if not mine:
                continue
            ttft = [r["ttft_p50_s"] for r in mine]
            tok = [r["tok_s"] for r in mine]
            rows[f"{workload}/{setting}"] = {
                "workload": workload,
                "setting": setting,
                "ttft_p50_s": statistics.median(ttft),
                "ttft_p50_min_s": min(ttft),
                "tok_s": statistics.median(tok),
                "tok_s_min": min(tok),
                "loads": [round(r["load_1m"], 2) for r in mine],
            }
    out: dict = {"rows": rows}
    if "shared/cache_on" in rows and "shared/cache_off" in rows:
        ratio = rows["shared/cache_off"]["ttft_p50_s"] / rows["shared/cache_on"]["ttft_p50_s"]
        out["shared_ttft_ratio"] = ratio
        out["shared_ttft_met"] = ratio >= TTFT_RULE
        out["shared_tok_s_ratio"] = (
            rows["shared/cache_on"]["tok_s"] / rows["shared/cache_off"]["tok_s"]
        )
    if "distinct/cache_on" in rows and "distinct/cache_off" in rows:
        ratio = rows["distinct/cache_on"]["tok_s"] / rows["distinct/cache_off"]["tok_s"]
        out["distinct_tok_s_ratio"] = ratio
        out["distinct_tok_s_met"] = ratio >= THROUGHPUT_RULE
    return out


def run(cfg: PrefixBenchConfig, json_out: str | Path) -> dict:
    """Measure, print the table and the verdicts, write JSON; returns the figures."""
    figures = measure(cfg)
    summary = figures["summary"]
    print_table(
        list(summary["rows"].values()),
        ["workload", "setting", "ttft_p50_s", "ttft_p50_min_s", "tok_s", "tok_s_min", "loads"],
    )
    if "shared_ttft_ratio" in summary:
        verdict = "met" if summary["shared_ttft_met"] else "NOT met"
        print(
            f"shared system prompt: TTFT p50 {summary['shared_ttft_ratio']:.2f}x lower with the "
            f"cache (target >= {TTFT_RULE:g}x: {verdict}); tok/s "
            f"{summary['shared_tok_s_ratio']:.2f}x"
        )
    if "distinct_tok_s_ratio" in summary:
        verdict = "met" if summary["distinct_tok_s_met"] else "NOT met"
        print(
            f"no shared prefix: tok/s with the cache {summary['distinct_tok_s_ratio']:.3f}x of "
            f"without (target >= {THROUGHPUT_RULE:g}: {verdict})"
        )
    path = write_json(json_out, figures)
    print(f"wrote {path}")
    return figures
