"""Bad input, a full queue, client disconnects and shutdown: 4xx in OpenAI's shape, no leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import SETTINGS, sse_data_lines, start

from lorafleet.serve.api.server import free_port


def post(srv, path, **kw):
    return httpx.post(srv.url + path, timeout=60, **kw)


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "\n" not in err["message"] and "Traceback" not in err["message"]


BAD_BODIES = [
    b"{not json",
    b"[]",
    b'{"model": "tiny"}',  # no prompt
    b'{"model": "tiny", "prompt": "x", "max_tokens": "ten"}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": 0}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": -5}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": 99999999}',
    b'{"model": "tiny", "prompt": "x", "temperature": -1}',
    b'{"model": "tiny", "prompt": "x", "top_p": 0}',
    b'{"model": "tiny", "prompt": "x", "stream": "yes"}',
    b'{"model": "tiny", "prompt": "x", "n": 9}',
    b'{"model": 5, "prompt": "x"}',
    b'{"model": "tiny", "prompt": [99999999]}',
    b'{"model": "tiny", "prompt": []}',
    b'{"model": "tiny", "prompt": ""}',
    # found by the fuzzer: ints past 64 bits used to overflow inside torch / the tokenizer (500)
    b'{"model": "tiny", "prompt": "x", "seed": 1180591620717411303424}',
    b'{"model": "tiny", "prompt": "x", "top_k": 1180591620717411303424}',
    b'{"model": "tiny", "prompt": [1180591620717411303424], "echo": true}',
    b'{"model": "tiny", "prompt": [1180591620717411303424], "class_choices": ["a", "b"]}',
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_bad_completion_bodies_are_400(server, body):
    r = post(server, "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


def test_bad_chat_and_generate_bodies(server):
    for body in (
        {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "tiny", "messages": "hello"},
        {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
    ):
        assert_openai_error(post(server, "/v1/chat/completions", json=body), 400)
    assert_openai_error(post(server, "/generate", json={"inputs": ""}), 400)
    r = post(server, "/generate", json={"inputs": "x", "parameters": {"adapter_id": "zzz"}})
    assert_openai_error(r, 404)
    merged = {"ids": ["alpha", "beta"], "weights": [0.5, 0.5], "merge_strategy": "ties"}
    r = post(server, "/generate", json={"inputs": "x", "parameters": {"merged_adapters": merged}})
    assert_openai_error(r, 400)  # no merge backend here (see tests/serve/api/test_api_mixture.py)
    assert "not available" in r.json()["error"]["message"]


def test_lorax_generate_and_stream_agree(server):
    body = {"inputs": "Once upon a time", "parameters": {"adapter_id": "beta", "max_new_tokens": 6}}
    full = post(server, "/generate", json=body).json()
    stopped = full["details"]["finish_reason"] in ("eos_token", "stop_sequence")
    assert full["details"]["generated_tokens"] == 6 or stopped
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    import json

    events = [json.loads(line[5:]) for line in lines]
    assert events[-1]["generated_text"] == full["generated_text"]
    assert "".join(e["token"]["text"] for e in events if e["token"]) == full["generated_text"]


def test_a_bad_adapter_fails_only_its_requests(server):
    root = server.state.adapters_dir
    bad = root / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    try:
        r = post(server, "/v1/completions", json={"model": "broken", "prompt": "x"})
        assert_openai_error(r, 400)
        assert "broken" in r.json()["error"]["message"]
        ok = post(
            server, "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}
        )
        assert ok.status_code == 200
    finally:
        for f in bad.iterdir():
            f.unlink()
        bad.rmdir()


def test_queue_full_is_429_with_retry_after(tokenizer, adapters_dir):
    settings = type(SETTINGS)(**{**SETTINGS.__dict__, "max_batch_size": 1})
    srv = start(tokenizer, adapters_dir, settings=settings, max_waiting=1)
    try:
        import concurrent.futures as cf

        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        with cf.ThreadPoolExecutor(3) as pool:
            with srv.state.backend.exclusive():  # freeze the engine so requests pile up
                first = pool.submit(post, srv, "/v1/completions", json=body)
                deadline = time.monotonic() + 10
                while srv.state.backend.stats()["waiting"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                r = post(srv, "/v1/completions", json=body)
                assert_openai_error(r, 429)
                assert int(r.headers["Retry-After"]) >= 1
            # thawed: the queued request completes
            assert first.result(60).status_code == 200
    finally:
        srv.stop()


def test_client_disconnect_cancels_and_frees_kv(server):
    engine = server.state.backend
    free = engine.stats()["kv_free_slots"]
    body = {
        "model": "alpha",
        "prompt": "Tell me a long story",
        "max_tokens": 100,
        "stream": True,
        "temperature": 1.0,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 20
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0 and engine.stats()["kv_free_slots"] == free
    assert engine.stats()["generated_tokens"] > 0


# `lorafleet serve ARGS` with every engine step made at least STEP_S slower (the model is
# tiny): a request of N tokens then runs for at least N * STEP_S seconds, however fast the CPU.
STEP_S = 0.01
SLOW_SERVE = """
import sys, time
from lorafleet.serve.engine import Engine
from lorafleet.cli import main
step = Engine.step
def slow_step(self):
    time.sleep(float(sys.argv[1]))
    return step(self)
Engine.step = slow_step
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_drains_finishes_in_flight_streams_and_cuts_the_rest(
    tiny_base_dir, adapters_dir, tmp_path
):
    """The drain timeout (2 s) lets a short stream in flight finish (18 steps left) and cuts
    the long ones (4 x 2000 tokens: 20 s at the least, on any CPU)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-c",
        SLOW_SERVE,
        str(STEP_S),
        "serve",
        "--base",
        str(tiny_base_dir),
        "--adapters",
        str(adapters_dir),
        "--port",
        str(port),
        "--max-seq-len",
        "2048",
        "--max-rank",
        "8",
        "--drain-timeout",
        "2",
    ]
    log = (tmp_path / "server.log").open("w")  # closed in `finally`
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "server.log"
            ).read_text()
            time.sleep(0.3)
        # A long stream (4 x 2000 tokens, >= 20 s) that the 2 s drain timeout cuts ...
        long = {"model": "beta", "prompt": "Hi", "max_tokens": 2000, "n": 4, "stream": True}
        long_lines, started = [], threading.Event()

        def read_long() -> None:
            body = {**long, "ignore_eos": True, "temperature": 0}
            long_lines.extend(sse_data_lines(url, body, lambda n: n == 1 and started.set()))

        reader = threading.Thread(target=read_long)
        reader.start()
        assert started.wait(60)
        # ... and a short one in flight when SIGTERM comes, which finishes.
        body = {"model": "alpha", "prompt": "Hello", "max_tokens": 20, "temperature": 0}
        refused = []

        def on_line(n: int) -> None:
            if n == 2:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)  # the signal is taken on the server's next tick (0.1 s)
                health = httpx.get(url + "/health", timeout=10)
                new = httpx.post(url + "/v1/completions", json=body, timeout=10)
                refused.extend([health, new])

        lines = sse_data_lines(url, {**body, "stream": True}, on_line)
        assert lines[-1] == "data: [DONE]"
        text = "".join(lines)
        assert '"finish_reason":"length"' in text or '"finish_reason":"stop"' in text
        health, new = refused
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert_openai_error(new, 503)
        assert new.headers["retry-after"] and new.json()["error"]["code"] == "draining"
        reader.join(60)
        assert long_lines[-1] == "data: [DONE]", long_lines[-3:]  # not a dropped socket
        cut = [line for line in long_lines if '"error"' in line]
        assert len(cut) == 4 and '"code":"draining"' in cut[0]  # each choice says why
        assert len(long_lines) < 4 * 2000
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
