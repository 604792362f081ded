"""Fair share and per-tenant limits over HTTP: a flooding tenant does not hold another back
(its first token comes before most of the flood's, where first come first served makes it
wait for all of them); concurrency and tokens-per-minute limits answer 429 with Retry-After
and let the tenant in again once capacity returns."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import pytest
from conftest import start

from lorafleet.errors import LorafleetError
from lorafleet.serve.api import AuthConfig
from lorafleet.serve.api.limits import Limits
from lorafleet.serve.api.server import EngineSettings

KEYS = {"flood": "flood-key", "light": "light-key", "capped": "capped-key", "metered": "m-key"}
ROOMY = 100_000
TENANTS = {
    "flood": {"keys": [KEYS["flood"]], "tokens_per_minute": ROOMY},
    "light": {"keys": [KEYS["light"]], "tokens_per_minute": ROOMY},
    "capped": {"keys": [KEYS["capped"]], "max_concurrent": 1, "tokens_per_minute": ROOMY},
    "metered": {"keys": [KEYS["metered"]]},  # tokens_per_minute: the server's default
}
FLOOD = 8
SMALL = EngineSettings(
    quantize="none", max_adapters=1, max_rank=8, max_batch_size=2, max_seq_len=64
)


def auth() -> AuthConfig:
    return AuthConfig(admin_keys=["admin-key-9"], tenants=TENANTS)


def hi_cost(tokenizer) -> int:
    """What a "Hi" request with max_tokens 6 is charged: prompt + max_tokens."""
    return len(tokenizer("Hi")["input_ids"]) + 6


@pytest.fixture(scope="module", params=["fair", "fcfs"])
def batch2(request, tokenizer, adapters_dir):
    """Two sequences per step, the given schedule, tenants with keys (some limited)."""
    settings = EngineSettings(**{**SMALL.__dict__, "schedule": request.param})
    per_minute = 2 * hi_cost(tokenizer) + hi_cost(tokenizer) // 2  # two "Hi" requests fit
    srv = start(tokenizer, adapters_dir, auth(), settings, tokens_per_minute_per_key=per_minute)
    yield srv
    srv.stop()


def body(max_tokens=6, stream=True, prompt="Once upon a time"):
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def post(srv, key, payload, path="/v1/completions"):
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(srv.url + path, json=payload, headers=headers, timeout=60)


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_flooding_tenant_does_not_hold_another_back(batch2):
    """With the engine held, tenant flood queues 8 streams, then tenant light one; released,
    light's first token precedes most of flood's under fair (all of them under fcfs)."""
    engine, schedule = batch2.state.backend, batch2.state.backend.scheduler.policy.name
    stamps, ticket, lock = {}, itertools.count(), threading.Lock()

    def stream(name: str, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream(
            "POST", batch2.url + "/v1/completions", json=body(), headers=headers, timeout=60
        ) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    with lock:
                        stamps.setdefault(name, next(ticket))

    threads = []
    with engine.exclusive():  # no step runs: every request waits in the engine's intake
        for i in range(FLOOD):
            threads.append(threading.Thread(target=stream, args=(f"a{i}", KEYS["flood"])))
            threads[-1].start()
        wait_for(lambda: engine.stats()["waiting"] == FLOOD, "the flood to queue")
        threads.append(threading.Thread(target=stream, args=("b", KEYS["light"])))
        threads[-1].start()
        wait_for(lambda: engine.stats()["waiting"] == FLOOD + 1, "light's request")
    for thread in threads:
        thread.join(60)
    assert len(stamps) == FLOOD + 1
    ahead = sum(1 for name, stamp in stamps.items() if name != "b" and stamp < stamps["b"])
    if schedule == "fair":
        assert ahead < FLOOD // 2, stamps  # admitted in the first step, beside flood's first
    else:
        assert ahead >= FLOOD - 1, stamps  # behind every wave of the flood


def test_concurrency_limit_is_429_with_retry_after_then_lets_in(batch2):
    engine, limits = batch2.state.backend, batch2.state.limits
    result = {}
    with engine.exclusive():  # hold the first request in flight
        first = threading.Thread(
            target=lambda: result.update(r=post(batch2, KEYS["capped"], body(stream=False)))
        )
        first.start()
        wait_for(lambda: limits.in_flight("capped") == 1, "the first request")
        r = post(batch2, KEYS["capped"], body(stream=False))
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("rate_limit_error", "concurrency_limit_exceeded")
        assert "max_concurrent 1" in err["message"]
        assert int(r.headers["Retry-After"]) >= 1
        stream = dict(body(), stream=True)
        assert post(batch2, KEYS["capped"], stream).status_code == 429
        lorax = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        assert post(batch2, KEYS["capped"], lorax, "/generate").status_code == 429
    first.join(60)
    assert result["r"].status_code == 200
    assert limits.in_flight("capped") == 0
    assert post(batch2, KEYS["capped"], body(stream=False)).status_code == 200
    with httpx.stream(
        "POST",
        batch2.url + "/v1/completions",
        json=body(),
        headers={"Authorization": f"Bearer {KEYS['capped']}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    assert post(batch2, KEYS["capped"], body(stream=False)).status_code == 200  # released


def test_tokens_per_minute_is_429_with_the_seconds_until_the_window_frees(batch2, tokenizer):
    """Two requests fit the minute, a third gets 429 with Retry-After = when the first one
    leaves the window (a clock the test moves), and succeeds once it has."""
    limits, cost = batch2.state.limits, hi_cost(tokenizer)
    now = [1000.0]
    real_clock, limits.clock = limits.clock, lambda: now[0]
    small = body(stream=False, prompt="Hi")
    try:
        for _ in range(2):
            assert post(batch2, KEYS["metered"], small).status_code == 200
        now[0] += 10
        r = post(batch2, KEYS["metered"], small)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "tokens_limit_exceeded"
        assert r.headers["Retry-After"] == "50"  # the first charge leaves at 1000 + 60
        assert post(batch2, KEYS["light"], small).status_code == 200  # others unaffected
        big = dict(small, max_tokens=3 * cost)  # more than a whole minute's tokens
        too_big = post(batch2, KEYS["metered"], big)
        assert too_big.status_code == 400 and "Retry-After" not in too_big.headers
        assert too_big.json()["error"]["code"] == "request_too_large"
        now[0] += 50
        assert post(batch2, KEYS["metered"], small).status_code == 200
    finally:
        limits.clock = real_clock


def test_limits_in_the_auth_file_are_checked():
    config = auth()
    assert config.limits_for("capped") == Limits(1, ROOMY)
    assert config.limits_for("metered") == Limits()  # no default: unlimited
    assert config.limits_for("metered", Limits(5, 100)) == Limits(5, 100)
    assert config.limits_for("flood", Limits(5, 100)) == Limits(5, ROOMY)
    for bad in (0, -1, "3", 1.5, True):
        with pytest.raises(LorafleetError, match="tenant x: max_concurrent must be an integer"):
            AuthConfig(tenants={"x": {"keys": ["k"], "max_concurrent": bad}})
    with pytest.raises(LorafleetError, match="tokens_per_minute must be an integer"):
        AuthConfig(tenants={"x": {"keys": ["k"], "tokens_per_minute": 0}})
    with pytest.raises(LorafleetError, match="unknown field"):
        AuthConfig(tenants={"x": {"keys": ["k"], "rpm": 3}})
