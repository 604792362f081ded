"""Benchmark: fair share under a flood. Tenant A sends many streaming requests at once, tenant B
one a second while A's flood lasts; B's time to first token (TTFT) and the total tokens/s, under
`--schedule fcfs` and `--schedule fair`, beside B's TTFT on an idle server.

Both servers (`lorafleet serve --auth ... --schedule X`, own processes, the same settings) start
first; the runs alternate fcfs, fair, fcfs, fair ... and each figure is the median over the
repetitions. Pass rule (issue 32, fixed before measuring): under fair, B's TTFT p50 is at most
2x its idle TTFT p50 (same server), and the total tokens/s is at least 95 % of fcfs's."""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.bench.serve import ServerProcess
from lorafleet.bench.streaming import pct, sse_events

KEYS = {"A": "bench-tenant-a", "B": "bench-tenant-b"}
SCHEDULES = ("fcfs", "fair")
TTFT_RULE = 2.0  # fair: B's TTFT p50 <= 2x idle
THROUGHPUT_RULE = 0.95  # fair: total tok/s >= 95 % of fcfs
TEXT = (
    "the river carried small stones past the old mill while children counted boats and "
    "the baker sold warm bread to travellers who asked about the road north"
)
WORDS = TEXT.split()


def prompt(i: int, words: int) -> str:
    """A plain prompt of `words` words, different per `i`."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


async def _stream(http, url: str, key: str, text: str, max_tokens: int, t0: float) -> dict:
    """One streaming completion; times (seconds from t0) of its start, first token and end."""
    body = {
        "model": "base",
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = {"sent": time.perf_counter() - t0, "first": None, "tokens": 0}
    headers = {"Authorization": f"Bearer {key}"}
    async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
        async for event in sse_events(resp, "lorafleet"):
            if event.get("choices") and event["choices"][0].get("text") and rec["first"] is None:
                rec["first"] = time.perf_counter() - t0
            if event.get("usage"):
                rec["tokens"] = event["usage"]["completion_tokens"]
    rec["end"] = time.perf_counter() - t0
    rec["ttft"] = None if rec["first"] is None else rec["first"] - rec["sent"]
    return rec


async def _idle(url: str, n: int, words: int, max_tokens: int) -> list[float]:
    """B's TTFT, one request at a time on an otherwise idle server."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        out = []
        for i in range(n):
            rec = await _stream(http, url, KEYS["B"], prompt(1000 + i, words), max_tokens, 0.0)
            out.append(rec["ttft"])
        return out


async def _flood(url: str, cfg: dict) -> dict:
    """A's flood at t=0, B's requests every `b_every` s from `b_delay` s while it lasts."""
    import httpx

    limits = httpx.Limits(max_connections=cfg["a_requests"] + cfg["b_requests"] + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        flood = [
            asyncio.create_task(
                _stream(http, url, KEYS["A"], prompt(i, cfg["words"]), cfg["a_tokens"], t0)
            )
            for i in range(cfg["a_requests"])
        ]
        done = asyncio.gather(*flood)
        b_tasks = []
        await asyncio.sleep(cfg["b_delay"])
        for j in range(cfg["b_requests"]):
            if done.done():
                break  # only requests that meet the flood count
            text = prompt(500 + j, cfg["words"])
            b_tasks.append(
                asyncio.create_task(_stream(http, url, KEYS["B"], text, cfg["b_tokens"], t0))
            )
            await asyncio.sleep(cfg["b_every"])
        a_recs = await done
        b_recs = list(await asyncio.gather(*b_tasks))
    records = a_recs + b_recs
    wall = max(r["end"] for r in records)
    ttft = [r["ttft"] for r in b_recs if r["ttft"] is not None]
    return {
        "b_sent": len(b_recs),
        "b_ttft_p50": pct(ttft, 50),
        "b_ttft_p99": pct(ttft, 99),
        "a_ttft_p50": pct([r["ttft"] for r in a_recs if r["ttft"] is not None], 50),
        "tokens": sum(r["tokens"] for r in records),
        "seconds": wall,
        "tokens_per_s": sum(r["tokens"] for r in records) / wall,
    }


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def run(
    base: str = "default",
    a_requests: int = 64,
    a_tokens: int = 64,
    b_requests: int = 10,
    b_every: float = 1.0,
    b_delay: float = 1.0,
    b_tokens: int = 32,
    prompt_words: int = 24,
    idle_requests: int = 5,
    reps: int = 3,
    max_batch_size: int = 16,
    threads: int | None = None,
    json_out: str | Path = "bench/results/fairness.json",
) -> dict:
    """`reps` alternating rounds of (fcfs, fair): per server B's idle TTFT, then the flood."""
    cfg = {
        "a_requests": a_requests,
        "a_tokens": a_tokens,
        "b_requests": b_requests,
        "b_every": b_every,
        "b_delay": b_delay,
        "b_tokens": b_tokens,
        "words": prompt_words,
    }
    runs: dict[str, list[dict]] = {s: [] for s in SCHEDULES}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        auth = root / "auth.json"
        tenants = {name: {"keys": [key]} for name, key in KEYS.items()}
        auth.write_text(json.dumps({"admin_keys": [], "tenants": tenants}))
        (root / "adapters").mkdir()
        servers = {}
        try:
            for schedule in SCHEDULES:
                settings = {"auth": auth, "schedule": schedule, "max_batch_size": max_batch_size}
                if threads:
                    settings["threads"] = threads
                servers[schedule] = ServerProcess(base, root / "adapters", settings, "base")
            for schedule, server in servers.items():
                server.wait_ready()
                asyncio.run(_idle(server.url, 2, prompt_words, 4))  # warm-up
                print(f"{schedule} server ready at {server.url}", flush=True)
            for rep in range(reps):
                for schedule, server in servers.items():
                    print(f"round {rep + 1}/{reps}: {schedule}", flush=True)
                    idle = asyncio.run(_idle(server.url, idle_requests, prompt_words, b_tokens))
                    out = asyncio.run(_flood(server.url, cfg))
                    out.update(schedule=schedule, rep=rep + 1, idle_ttft_p50=pct(idle, 50))
                    runs[schedule].append(out)
        finally:
            for server in servers.values():
                server.stop()
    return _report(base, cfg, max_batch_size, runs, json_out)


def _report(base, cfg, max_batch_size, runs: dict[str, list[dict]], json_out) -> dict:
    columns = ["schedule", "rep", "b_sent", "b_ttft_p50", "b_ttft_p99", "idle_ttft_p50"]
    columns += ["a_ttft_p50", "tokens_per_s"]
    print_table([r for pair in zip(*runs.values(), strict=True) for r in pair], columns)
    keys = ("b_ttft_p50", "b_ttft_p99", "idle_ttft_p50", "a_ttft_p50", "tokens_per_s")
    medians = {s: {k: _median(rs, k) for k in keys} for s, rs in runs.items()}
    print_table([{"schedule": s, **m} for s, m in medians.items()], ["schedule", *keys])
    fair, fcfs = medians["fair"], medians["fcfs"]
    ttft_ratio = fair["b_ttft_p50"] / fair["idle_ttft_p50"]
    throughput_ratio = fair["tokens_per_s"] / fcfs["tokens_per_s"]
    verdict = ttft_ratio <= TTFT_RULE and throughput_ratio >= THROUGHPUT_RULE
    print(
        f"fair: B's TTFT p50 {fair['b_ttft_p50']:.3f} s = {ttft_ratio:.2f}x idle "
        f"({fair['idle_ttft_p50']:.3f} s; rule <= {TTFT_RULE:g}x); fcfs: "
        f"{fcfs['b_ttft_p50']:.3f} s = {fcfs['b_ttft_p50'] / fcfs['idle_ttft_p50']:.2f}x idle"
    )
    print(
        f"total tok/s fair / fcfs = {throughput_ratio:.3f} (rule >= {THROUGHPUT_RULE:g}): "
        f"{'PASS' if verdict else 'FAIL'} (both rules)"
    )
    result = {
        "benchmark": "fairness",
        "base": base,
        "max_batch_size": max_batch_size,
        "workload": cfg,
        "runs": runs,
        "medians": medians,
        "fair_b_ttft_vs_idle": ttft_ratio,
        "fair_vs_fcfs_tokens_per_s": throughput_ratio,
        "rule": f"fair B TTFT p50 <= {TTFT_RULE:g}x idle and tok/s >= {THROUGHPUT_RULE:g}x fcfs",
        "pass": verdict,
    }
    print(f"wrote {write_json(json_out, result)}")
    return result
