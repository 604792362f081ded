"""Concurrent streaming clients are batched and streamed together, not one after another."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import torch
from conftest import PUBLIC, start

CLIENTS, TOKENS = 16, 8
STEP_S = 0.2  # a real model's forward (GIL released, as in torch): the tiny one is too quick


async def stream_one(client: httpx.AsyncClient, url: str, i: int, log: list) -> None:
    """One streaming completion; appends ("first", i) and ("done", i) to `log` as they happen."""
    body = {
        "model": PUBLIC[i % len(PUBLIC)],
        "prompt": f"Client {i} writes",
        "seed": i,
        "max_tokens": TOKENS,
        "temperature": 0.9,
        "stream": True,
    }
    first = True
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            assert "error" not in event, event
            if first and event["choices"]:
                log.append(("first", i, time.perf_counter()))
                first = False
    log.append(("done", i, time.perf_counter()))


async def burst(url: str) -> list:
    log: list = []
    limits = httpx.Limits(max_connections=CLIENTS * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(stream_one(client, url, i, log) for i in range(CLIENTS)))
    return log


def slow_forward(engine) -> None:
    """Make every forward take STEP_S more, releasing the GIL as torch's kernels do."""
    run = engine.runner.run

    def slow(prefill, decode):
        time.sleep(STEP_S)
        return run(prefill, decode)

    engine.runner.run = slow


def test_streams_interleave_and_requests_share_steps(tokenizer, adapters_dir):
    srv = start(tokenizer, adapters_dir)
    slow_forward(srv.state.backend)
    try:
        log = asyncio.run(burst(srv.url))
        peak = srv.state.backend.stats()["peak_running"]
    finally:
        srv.stop()
    order = [kind for kind, _, _ in log]
    assert order.count("first") == CLIENTS and order.count("done") == CLIENTS
    # Streaming under load: most clients see their first chunk before a quarter of them have
    # finished (admitted one after another, later clients would start only as others end).
    quarter_done = [i for i, kind in enumerate(order) if kind == "done"][CLIENTS // 4 - 1]
    assert order[:quarter_done].count("first") >= CLIENTS * 3 // 4, order
    # Continuous batching through HTTP: requests that arrived during a step joined the next.
    assert peak >= CLIENTS * 3 // 4, peak


def hold_first_forward(engine, release: threading.Event, entered: threading.Event) -> None:
    """The first forward waits for `release` (a step that runs as long as the test wants)."""
    run = engine.runner.run

    def held(prefill, decode):
        if not release.is_set():
            entered.set()
            release.wait(60)
        return run(prefill, decode)

    engine.runner.run = held


def test_event_loop_never_waits_for_a_forward(tokenizer, adapters_dir):
    """While a forward runs, the server accepts a new request (it joins the next step) and
    answers a health check; before the fix both waited on the engine's lock."""
    srv = start(tokenizer, adapters_dir)
    release, entered = threading.Event(), threading.Event()
    hold_first_forward(srv.state.backend, release, entered)

    async def scenario() -> tuple[dict, list]:
        log: list = []
        async with httpx.AsyncClient(timeout=120) as client:
            first = asyncio.create_task(stream_one(client, srv.url, 0, log))
            assert await asyncio.to_thread(entered.wait, 30)  # the first step is in its forward
            second = asyncio.create_task(stream_one(client, srv.url, 1, log))
            health = await client.get(srv.url + "/health", timeout=10)
            for _ in range(100):  # the second request reaches the engine's inbox
                if health.json()["waiting"] == 1:
                    break
                await asyncio.sleep(0.02)
                health = await client.get(srv.url + "/health", timeout=10)
            assert not release.is_set()
            release.set()
            await asyncio.gather(first, second)
        return health.json(), log

    try:
        health, log = asyncio.run(scenario())
        stats = srv.state.backend.stats()
    finally:
        release.set()
        srv.stop()
    assert health["running"] == 1 and health["waiting"] == 1, health
    assert [kind for kind, _, _ in log].count("done") == 2
    assert stats["peak_running"] == 2  # the second joined the first's batch at the next step


def test_engine_threads_apply_to_the_forward_passes_only(tokenizer, adapters_dir):
    srv = start(tokenizer, adapters_dir, engine_threads=1)
    seen: list[int] = []
    run = srv.state.backend.runner.run

    def spy(prefill, decode):
        seen.append(torch.get_num_threads())
        return run(prefill, decode)

    srv.state.backend.runner.run = spy
    before = torch.get_num_threads()
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        srv.stop()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before  # the test's own thread is untouched
