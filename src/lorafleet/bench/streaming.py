"""Streamed-request workloads shared by `bench serve` and `bench peers`: the request plan, the
engine stepped in-process on it, the SSE reader of an HTTP stream, and the latency summary."""

from __future__ import annotations

import json
import time

from lorafleet.errors import LorafleetError


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(records: list[dict], wall: float) -> dict:
    """Per-request records (ttft, tokens, last) -> total tok/s, TTFT and TPOT p50/p99."""
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    tpot = [(r["last"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall if wall else None,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
    }


# -- the requests ------------------------------------------------------------------------------


def plan(
    clients: int,
    names: list[str | None],
    prompts: list[list[int]],
    new_tokens: int,
    temperature: float,
) -> list[dict]:
    """One request per client: adapter i % len(names), prompt i % len(prompts), seed i."""
    return [
        {
            "adapter": names[i % len(names)],
            "prompt": prompts[i % len(prompts)],
            "max_tokens": new_tokens,
            "temperature": temperature,
            "seed": i,
        }
        for i in range(clients)
    ]


# -- in-process ----------------------------------------------------------------------------------


def in_process(engine, requests: list[dict]) -> dict:
    """Submit every request at once and step the engine until all finish."""
    from lorafleet.serve.sequence import SamplingParams

    records = [{"ttft": None, "tokens": 0, "last": None} for _ in requests]
    start = time.perf_counter()

    def on_token(i):
        def record(event) -> None:
            if event.token_id is None:
                return
            now = time.perf_counter() - start
            rec = records[i]
            rec["tokens"] += 1
            rec["last"] = now
            rec["ttft"] = now if rec["ttft"] is None else rec["ttft"]

        return record

    for i, r in enumerate(requests):
        params = SamplingParams(
            max_tokens=r["max_tokens"],
            temperature=r["temperature"],
            seed=r["seed"],
            ignore_eos=True,
        )
        engine.add_request(r["prompt"], r["adapter"], params, on_token(i))
    while engine.has_unfinished():
        engine.step()
        if not engine.stats()["running"]:
            time.sleep(0.001)  # only waiting for an adapter the registry is loading
    return summarise(records, time.perf_counter() - start)


async def sse_events(resp, who: str):
    """The JSON events of a server-sent-event response (`data: {...}` lines, `[DONE]` skipped);
    an HTTP error or an event carrying "error" raises one LorafleetError naming `who`."""
    if resp.status_code != 200:
        raise LorafleetError(f"{who} HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
    async for line in resp.aiter_lines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        event = json.loads(line[5:])
        if "error" in event:
            raise LorafleetError(f"{who} stream error: {event['error']}")
        yield event
