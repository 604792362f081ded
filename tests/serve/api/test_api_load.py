"""Load: 64 concurrent streaming clients over 16 adapters on a tiny model; none lost, no errors."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import SETTINGS, make_adapter, start

from lorafleet.adapters import write_adapter

CLIENTS, ADAPTERS, TOKENS = 64, 16, 16


@pytest.fixture(scope="module")
def many_adapters(tmp_path_factory, tokenizer, api_fp):
    root = tmp_path_factory.mktemp("load-adapters")
    for i in range(ADAPTERS):
        write_adapter(root / f"load{i:02d}", make_adapter(tokenizer, api_fp, 500 + i))
    return root


async def one_client(url: str, i: int) -> dict:
    body = {
        "model": f"load{i % ADAPTERS:02d}",
        "prompt": f"Client {i} says hello and",
        "max_tokens": TOKENS,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start_t = time.perf_counter()
    first = None
    chunks, usage, done = [], None, False
    async with (
        httpx.AsyncClient(timeout=300) as client,
        client.stream("POST", url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            assert "error" not in event, event
            if event["choices"]:
                first = first or time.perf_counter()
                chunks.append(event)
            elif event.get("usage"):
                usage = event["usage"]
    return {
        "done": done,
        "usage": usage,
        "chunks": chunks,
        "ttft": (first or 0) - start_t,
        "latency": time.perf_counter() - start_t,
    }


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def test_64_streaming_clients_over_16_adapters(tokenizer, many_adapters):
    settings = type(SETTINGS)(**{**SETTINGS.__dict__, "max_adapters": 8, "max_batch_size": 32})
    srv = start(tokenizer, many_adapters, settings=settings)  # 8 slots for 16 adapters: evictions
    try:

        async def burst():
            return await asyncio.gather(*(one_client(srv.url, i) for i in range(CLIENTS)))

        began = time.perf_counter()
        results = asyncio.run(burst())
        wall = time.perf_counter() - began
        assert len(results) == CLIENTS
        assert all(r["done"] for r in results)  # none lost: every stream reached [DONE]
        for r in results:
            finals = [
                c["choices"][0]["finish_reason"]
                for c in r["chunks"]
                if c["choices"][0]["finish_reason"]
            ]
            assert len(finals) == 1 and r["usage"]["completion_tokens"] >= 1
            assert finals[0] == "stop" or r["usage"]["completion_tokens"] == TOKENS
        stats = srv.state.backend.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert stats["kv_free_slots"] == settings.max_batch_size  # all KV memory reclaimed
        reg = srv.state.registry.stats()
        assert reg["loads"] >= ADAPTERS and reg["evictions_slot"] >= ADAPTERS - 8
        lat = [r["latency"] for r in results]
        ttft = [r["ttft"] for r in results]
        tokens = sum(r["usage"]["completion_tokens"] for r in results)
        print(
            f"\n{CLIENTS} clients x {ADAPTERS} adapters: {tokens} tokens in {wall:.1f} s "
            f"({tokens / wall:.1f} tok/s); latency p50 {pct(lat, 50):.2f} s p99 "
            f"{pct(lat, 99):.2f} s; TTFT p50 {pct(ttft, 50):.2f} s "
            f"p99 {pct(ttft, 99):.2f} s"
        )
    finally:
        srv.stop()
