"""RayBackend over a fake deployment handle (no Ray): events relayed under the ingress's ids,
the multiplexed model id by routing, a replica that dies before the first token retried,
one that dies mid-stream reported as a replica failure, cancel, and summed stats."""

from __future__ import annotations

import threading

import pytest

from lorafleet.serve.backend import REPLICA_FAILED
from lorafleet.serve.ray.backend import RayBackend
from lorafleet.serve.sequence import Mixture, SamplingParams, TokenEvent

INFO = {
    "tokenizer": None,
    "vocab_size": 100,
    "max_seq_len": 64,
    "max_batch_tokens": 64,
    "eos_ids": (0,),
    "max_slots": 2,
    "max_rank": 8,
    "base_fingerprint": "fp",
    "model_config": None,
}


class ActorDiedError(Exception):
    pass


class FakeHandle:
    """`options(...).generate.remote(request)`: canned event streams, one script per call
    ("ok": 3 tokens then finished; "die-first": dies before a token; "die-mid": after one;
    "slow": tokens until cancelled)."""

    def __init__(self, scripts):
        self.scripts, self.calls = list(scripts), []
        self.generate = self

    def options(self, stream: bool, multiplexed_model_id: str):
        assert stream
        self.calls.append(multiplexed_model_id)
        return self

    def remote(self, request):
        return FakeStream(self.scripts.pop(0), request)


class FakeStream:
    def __init__(self, script, request):
        self.script, self.request, self.stop = script, request, threading.Event()

    def cancel(self):
        self.stop.set()

    def __iter__(self):
        if self.script == "die-first":
            raise ActorDiedError("The actor died unexpectedly before finishing this task.\nmore")
        for i in range(3):
            if self.script == "die-mid" and i == 1:
                raise ActorDiedError("The actor died unexpectedly")
            yield TokenEvent(77, 10 + i, f"t{i}", i == 2 and self.script == "ok", "length")
        while self.script == "slow" and not self.stop.wait(0.01):
            yield TokenEvent(77, 5, "x", False)


def run(backend, adapter="alpha"):
    events, done = [], threading.Event()

    def on_token(event):
        events.append(event)
        if event.finished:
            done.set()

    rid = backend.add_request([1, 2], adapter, SamplingParams(max_tokens=3), on_token)
    return rid, events, done


@pytest.fixture
def rows():
    return [{"replica": "b", "pid": 2, "waiting": 1, "running": 2}, {"replica": "a", "pid": 1}]


def test_events_come_back_under_the_ingress_id_routed_by_adapter(rows):
    handle = FakeHandle(["ok", "ok", "ok"])
    backend = RayBackend(handle, lambda: rows, INFO)
    for adapter in ("alpha", Mixture((("alpha", 0.2), ("beta", 0.8))), None):
        rid, events, done = run(backend, adapter)
        assert done.wait(5)
        assert [e.token_id for e in events] == [10, 11, 12]
        assert {e.request_id for e in events} == {rid} and events[-1].finish_reason == "length"
    assert handle.calls == ["alpha", "beta", ""]
    stats = backend.stats()
    assert (stats["waiting"], stats["running"]) == (1, 2)
    assert [row["replica"] for row in backend.replica_stats()] == ["a", "b"]
    blind = RayBackend(FakeHandle(["ok"]), lambda: rows, INFO, routing="round_robin")
    assert run(blind)[2].wait(5) and blind.handle.calls == [""]


def test_a_replica_dying_before_the_first_token_is_retried_after_it_is_an_error(rows):
    backend = RayBackend(FakeHandle(["die-first", "ok"]), lambda: rows, INFO)
    _, events, done = run(backend)
    assert done.wait(5) and [e.token_id for e in events] == [10, 11, 12]
    backend = RayBackend(FakeHandle(["die-mid", "ok"]), lambda: rows, INFO)
    _, events, done = run(backend)
    assert done.wait(5)
    assert [e.token_id for e in events] == [10, None]
    last = events[-1]
    assert last.finish_reason == "error" and last.error.startswith(REPLICA_FAILED)
    assert "ActorDiedError" in last.error and "\n" not in last.error
    backend = RayBackend(FakeHandle(["die-first"] * 3), lambda: rows, INFO, retries=2)
    _, events, done = run(backend)
    assert done.wait(10) and events[-1].finish_reason == "error"


def test_cancel_ends_the_stream_with_cancelled(rows):
    backend = RayBackend(FakeHandle(["slow"]), lambda: rows, INFO)
    rid, events, done = run(backend)
    while len(events) < 4:
        threading.Event().wait(0.01)
    assert backend.cancel(rid)
    assert done.wait(5) and events[-1].finish_reason == "cancelled"
    assert not backend.cancel(rid)
