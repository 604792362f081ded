"""lorafleet on Ray Serve, on the tiny model: two replicas behind the same HTTP API, the
`openai` client's greedy answers equal to the single-process server's, metrics summed over
replicas, an adapter uploaded through admin served by the fleet, and a replica SIGKILLed
while clients stream: its streams end with an error naming the replica failure, later
requests go to the survivor, Ray restarts the replica, and the uploaded adapter still serves."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray")  # the only reason these tests skip: `make install` installs Ray
pytest.importorskip("ray.serve")

from helpers import write_random_lora  # noqa: E402

from lorafleet.models import load_base  # noqa: E402
from lorafleet.serve.api import AuthConfig, ServerConfig  # noqa: E402
from lorafleet.serve.api.config import EngineSettings  # noqa: E402
from lorafleet.serve.api.server import ServerThread, build_state  # noqa: E402
from lorafleet.serve.ray import start_fleet  # noqa: E402

ADMIN, KEY = "admin-key-ray", "tenant-key-ray"
SETTINGS = EngineSettings(
    quantize="none",
    max_adapters=2,
    max_rank=8,
    max_batch_size=16,
    max_batch_tokens=256,
    max_seq_len=512,
)
PROMPTS = ["Once upon a time", "The capital of France is"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The shared adapters dir (alpha, beta), an adapter to upload later (delta), auth."""
    root = tmp_path_factory.mktemp("ray-fleet")
    base = load_base("tiny", device="cpu")
    for seed, name in enumerate(["alpha", "beta"]):
        write_random_lora(base, root / "adapters" / name, 300 + seed)
    write_random_lora(base, root / "upload" / "delta", 399)
    auth = root / "auth.json"
    auth.write_text(json.dumps({"admin_keys": [ADMIN], "tenants": {"t": {"keys": [KEY]}}}))
    return root


@pytest.fixture(scope="module")
def single(dirs):
    """The single-process server over the same base and adapters (the reference)."""
    state = build_state(
        load_base("tiny", device="cpu"),
        dirs / "adapters",
        AuthConfig.load(dirs / "auth.json"),
        SETTINGS,
        ServerConfig(model_name="tiny"),
    )
    with ServerThread(state) as srv:
        yield srv


@pytest.fixture(scope="module")
def fleet(dirs):
    config = ServerConfig(model_name="tiny", drain_timeout_s=1.0)
    auth = AuthConfig.load(dirs / "auth.json")
    # float32 as the single server (bfloat16, `auto` on some CPUs, depends on the batching)
    with start_fleet(
        "tiny",
        dirs / "adapters",
        replicas=2,
        settings=SETTINGS,
        config=config,
        auth=auth,
        dtype="float32",
    ) as fleet:
        fleet.start_http()
        yield fleet


def answers(url: str) -> list[str]:
    """Greedy answers of the `openai` client: completions and streamed chat, two adapters."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    out = []
    for model in ("alpha", "beta"):
        for prompt in PROMPTS:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
            out.append(r.choices[0].text)
            chunks = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=10,
                temperature=0,
                stream=True,
            )
            out.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    return out


def settled_stats(fleet, done, timeout_s: float = 5.0) -> list[dict]:
    """The replicas' rows once `done(rows)` holds or the timeout passes: a replica posts its
    counters to the board every REPORT_EVERY_S, so a request just answered may not be in yet."""
    deadline = time.monotonic() + timeout_s
    rows = fleet.replica_stats()
    while not done(rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = fleet.replica_stats()
    return rows


def test_the_fleet_answers_as_the_single_process_server(fleet, single):
    got = answers(fleet.url)
    assert got == answers(single.url)
    assert all(got)
    rows = settled_stats(fleet, lambda rows: sum(row["requests"] for row in rows) >= len(got))
    assert len(rows) == 2 and len({row["pid"] for row in rows}) == 2
    assert sum(row["requests"] for row in rows) >= len(got)


def test_models_and_metrics_over_the_replicas(fleet):
    headers = {"Authorization": f"Bearer {KEY}"}
    ids = {m["id"] for m in httpx.get(fleet.url + "/v1/models", headers=headers).json()["data"]}
    assert ids == {"tiny", "alpha", "beta"}
    fleet.replica_stats()  # fresh
    text = httpx.get(fleet.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert "lorafleet_replicas 2.0" in text
    assert "lorafleet_replica_adapter_loads_total{" in text
    assert 'lorafleet_requests_total{adapter="alpha",endpoint="completions",status="200"}' in text
    mixed = {"model": "mix:alpha*0.3+beta*0.7", "prompt": "Hi", "max_tokens": 3}
    r = httpx.post(fleet.url + "/v1/completions", json=mixed, headers=headers)
    assert r.status_code == 200, r.text  # a mixture, routed by its heaviest part (beta)


def upload(fleet, name: str, folder) -> httpx.Response:
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = {f: (f, (folder / f).read_bytes()) for f in names}
    return httpx.post(
        fleet.url + "/admin/adapters",
        data={"name": name},
        files=files,
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=60,
    )


def complete(fleet, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **extra}
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(fleet.url + "/v1/completions", json=body, headers=headers, timeout=60)


class Streamer(threading.Thread):
    """One streaming client: its data payloads, `started` once the first one came."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.payloads, self.started = url, [], threading.Event()

    def run(self):
        body = {"model": "alpha", "prompt": "Tell me", "max_tokens": 450, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        url = self.url + "/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.payloads.append(line[6:])
                    self.started.set()
        self.started.set()

    @property
    def error(self) -> dict | None:
        found = [json.loads(p) for p in self.payloads if p != "[DONE]" and '"error"' in p]
        return found[0]["error"] if found else None


def test_a_killed_replica_fails_its_streams_and_the_fleet_recovers(fleet, dirs):
    r = upload(fleet, "delta", dirs / "upload" / "delta")
    assert r.status_code == 201, r.text
    assert complete(fleet, "delta").status_code == 200
    streams = [Streamer(fleet.url) for _ in range(4)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60)
    # The replica running most of them (routed by adapter, all of them, unless Ray spread);
    # replicas post their stats every half second.
    deadline = time.monotonic() + 10
    victim = {"running": 0}
    while victim["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        victim = max(fleet.replica_stats(), key=lambda row: row["running"])
    assert victim["running"] > 0
    os.kill(victim["pid"], signal.SIGKILL)
    for s in streams:
        s.join(120)
    errors = [s.error for s in streams if s.error is not None]
    assert errors, "no stream was in flight on the killed replica"
    for err in errors:
        assert err["code"] == "replica_failed" and err["message"].startswith("replica failed")
    for s in streams:  # every stream ends cleanly: an error event or its whole answer
        assert s.payloads[-1] == "[DONE]"
    # Later requests go to the survivor (or are retried until Ray routes them there).
    for model in ("alpha", "beta", "delta"):
        r = complete(fleet, model)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while True:  # Ray starts a new replica in the killed one's place
        pids = {row["pid"] for row in fleet.replica_stats()}
        if len(pids) == 2 and victim["pid"] not in pids:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {pids}"
        time.sleep(1)
    for _ in range(4):  # the uploaded adapter serves from the fleet, new replica included
        assert complete(fleet, "delta").status_code == 200
