"""Graceful drain (what SIGTERM starts): 503 + Retry-After for new requests, /health draining,
in-flight requests finish, those past the drain timeout end with an SSE error event."""

from __future__ import annotations

import json
import threading
import time

import httpx
from conftest import sse_data_lines
from serve_helpers import tiny_base

from lorafleet.serve.api import AuthConfig, ServerConfig
from lorafleet.serve.api.server import EngineSettings, ServerThread, build_state

LONG = EngineSettings(
    quantize="none", max_adapters=2, max_rank=8, max_batch_tokens=512, max_seq_len=512
)
STEP_S = 0.01  # each engine step made this much slower: requests stay in flight long enough


def slow_server(tokenizer, adapters_dir, **config):
    """A server whose engine steps at most ~100 times a second (the model itself is tiny)."""
    state = build_state(
        tiny_base(tokenizer),
        adapters_dir,
        AuthConfig.off(),
        LONG,
        ServerConfig(model_name="tiny", **config),
    )
    step = state.backend.step

    def slow_step():
        time.sleep(STEP_S)
        return step()

    state.backend.step = slow_step  # read by Engine.start, when the app starts
    return ServerThread(state).start()


def body(max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": "alpha",
        "prompt": "Hello",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def assert_draining(srv) -> None:
    health = httpx.get(srv.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    r = httpx.post(srv.url + "/v1/completions", json=body(4, stream=False), timeout=10)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    err = r.json()["error"]
    assert err["code"] == "draining" and err["type"] == "service_unavailable"
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    assert "lorafleet_draining 1.0" in metrics


def test_drain_refuses_new_requests_and_lets_in_flight_ones_finish(tokenizer, adapters_dir):
    srv = slow_server(tokenizer, adapters_dir, drain_timeout_s=30)
    try:
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"

        def on_line(n: int) -> None:
            if n == 2:
                srv.drain()
                assert_draining(srv)

        lines = sse_data_lines(srv.url, body(100), on_line)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[5:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 90  # not cut short
        srv.thread.join(20)
        assert not srv.thread.is_alive()  # drained: the server stopped by itself
    finally:
        srv.stop()


def test_drain_timeout_cuts_streams_with_an_error_event(tokenizer, adapters_dir):
    srv = slow_server(tokenizer, adapters_dir, drain_timeout_s=0.5)
    try:
        plain: dict = {}

        def non_streamed() -> None:
            plain["r"] = httpx.post(srv.url + "/v1/completions", json=body(400, False), timeout=60)

        waiter = threading.Thread(target=non_streamed)
        waiter.start()
        # It must be running when the drain starts (else it is refused, not cut, and the
        # assertions below on the cut would hold for the wrong reason).
        deadline = time.monotonic() + 30
        while srv.state.backend.stats()["running"] < 1:
            assert time.monotonic() < deadline, "the non-streamed request never started"
            time.sleep(0.01)
        began = []

        def on_line(n: int) -> None:
            if n == 2:
                began.append(time.monotonic())
                srv.drain()

        lines = sse_data_lines(srv.url, body(400), on_line)
        waiter.join(30)
        assert time.monotonic() - began[0] < 10  # cut at the timeout, not after 400 steps
        assert lines[-1] == "data: [DONE]"  # the stream ends properly ...
        events = [json.loads(line[5:]) for line in lines[:-1]]
        errors = [e["error"] for e in events if "error" in e]
        assert len(errors) == 1 and errors[0]["code"] == "draining"  # ... saying why
        assert "drain timeout" in errors[0]["message"]
        assert len(lines) < 300
        r = plain["r"]  # the non-streamed request in flight: 503, OpenAI's shape
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "draining"
        assert "drain timeout" in r.json()["error"]["message"]  # cut, not refused at the door
        srv.thread.join(20)
        assert not srv.thread.is_alive()
        stats = srv.state.backend.stats()
        assert stats["running"] == stats["waiting"] == stats["kv_used_slots"] == 0
    finally:
        srv.stop()


class FakeStreams:
    def __init__(self):
        self.cuts = []

    def cut_all(self, message: str, retry_after_s: int) -> int:
        self.cuts.append((message, retry_after_s))
        return 3


def fake_drain(timeout_s: float):
    from types import SimpleNamespace

    from lorafleet.serve.api.drain import Drain

    now = [100.0]
    state = SimpleNamespace(
        config=ServerConfig(model_name="m", drain_timeout_s=timeout_s), streams=FakeStreams()
    )
    return Drain(state, clock=lambda: now[0]), now, state.streams


def test_drain_ticks_wait_for_the_timeout_then_cut_then_flush():
    from lorafleet.serve.api.drain import CUT_FLUSH_S

    drain, now, streams = fake_drain(10)
    drain.request()
    drain.in_flight = 2
    now[0] += 9.9
    assert not drain.tick() and not streams.cuts  # within the timeout: wait
    now[0] += 0.2
    assert not drain.tick() and drain.cut == 3  # the timeout: cut, then flush
    assert "drain timeout (10 s)" in streams.cuts[0][0] and streams.cuts[0][1] == 1
    now[0] += CUT_FLUSH_S
    assert drain.tick() and len(streams.cuts) == 1  # flushed long enough: stop
    drain.in_flight = 0
    assert drain.tick()


def test_nothing_in_flight_stops_at_once_and_a_second_signal_cuts_now():
    drain, now, streams = fake_drain(30)
    drain.request()
    assert drain.tick() and not streams.cuts
    drain, now, streams = fake_drain(30)
    drain.request()
    drain.in_flight = 1
    assert not drain.tick()
    drain.hurry()
    assert not drain.tick() and "second shutdown signal" in streams.cuts[0][0]
