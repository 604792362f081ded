"""Each request is recorded once, by `record`: its status, its label only once resolved, 499s."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import httpx
import pytest

from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.recording import record


class FakeMetrics:
    def __init__(self):
        self.calls = []

    def finished(self, endpoint, adapter, status, stream=None):
        self.calls.append((endpoint, adapter, status, stream))


def recorded(body) -> list[tuple]:
    state = SimpleNamespace(metrics=FakeMetrics())
    with contextlib.suppress(APIError, RuntimeError):
        body(state)
    return state.metrics.calls


def test_one_record_per_request():
    def ok(state):
        with record(state, "chat") as rec:
            rec.started("sst2", "stream")

    def not_found(state):
        with record(state, "chat"):
            raise APIError(404, "no such model")

    def failed_after_resolve(state):
        with record(state, "generate") as rec:
            rec.started("sst2")
            raise APIError(400, "bad")

    def crashed(state):
        with record(state, "generate") as rec:
            rec.started("base")
            raise RuntimeError("bug")

    def left(state):
        with record(state, "completions") as rec:
            rec.started("sst2")
            reply = rec.client_closed()
            assert reply.status_code == 499 and reply.body == b"{}"

    assert recorded(ok) == [("chat", "sst2", 200, "stream")]
    assert recorded(not_found) == [("chat", "-", 404, None)]  # unknown names are no labels
    assert recorded(failed_after_resolve) == [("generate", "sst2", 400, None)]
    assert recorded(crashed) == [("generate", "base", 500, None)]
    assert recorded(left) == [("completions", "sst2", 499, None)]


def test_a_deferred_record_is_written_by_the_stream_once():
    state = SimpleNamespace(metrics=FakeMetrics())
    with record(state, "chat") as rec:
        rec.started("sst2")
        rec.defer()
    assert state.metrics.calls == []  # the block ended, the stream has not
    rec.finish(200)
    rec.finish(499)  # a second finish (e.g. a late disconnect) changes nothing
    assert state.metrics.calls == [("chat", "sst2", 200, None)]


@pytest.mark.parametrize(
    ("path", "body", "endpoint"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "Hi"}, "completions"),
        ("/generate", {"inputs": "Hi", "parameters": {"adapter_id": "nope"}}, "generate"),
    ],
)
def test_refused_requests_show_in_metrics(server, path, body, endpoint):
    assert httpx.post(server.url + path, json=body, timeout=30).status_code == 404
    text = httpx.get(server.url + "/metrics", timeout=30).text
    line = f'lorafleet_requests_total{{adapter="-",endpoint="{endpoint}",status="404"}}'
    assert line in text
    assert 'adapter="nope"' not in text
