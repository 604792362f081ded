"""The HTTP API over a second ServingBackend, a fake with no model that answers canned tokens:
completions, chat, streaming, models, errors, admin, mixtures, merges and metrics work the same,
so the API (and the registry under it) depends on the backend Protocol only."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import torch
from conftest import ADMIN, KEYS, PUBLIC

from lorafleet.compose import merge_adapters
from lorafleet.errors import LorafleetError
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import AdapterRegistry, Engine, ServingBackend
from lorafleet.serve.api import AuthConfig, ServerConfig, ServerState
from lorafleet.serve.api.openai_routes import chat_prompt_ids
from lorafleet.serve.api.schemas import ChatCompletionRequest
from lorafleet.serve.api.server import ServerThread
from lorafleet.serve.sequence import SamplingParams, TokenEvent, resolve_adapter

WORDS = " apple river stone cloud maple quartz violet"


@dataclass
class FakeRequest:
    request_id: int
    prompt: list[int]
    label: str | None  # the adapter, or a mixture's label
    adapters: tuple[str, ...]
    params: SamplingParams
    on_token: object
    sent: int = 0
    cancelled: bool = False


class FakeBackend:
    """A ServingBackend without a model: request tokens are canned words picked by the
    prompt, the adapter (or mixture label) and the position; adapters are 'resident' in a
    table of slots filled through the attached source (the registry), as the engine's are."""

    def __init__(self, tokenizer, model_config, fingerprint: str, max_slots: int = 2):
        self.tokenizer, self.model_config = tokenizer, model_config
        self.vocab_size = len(tokenizer)
        self.max_seq_len, self.max_batch_tokens = 96, 64
        self.eos_ids = (tokenizer.eos_token_id,)
        self.max_slots, self.max_rank = max_slots, 8
        self.base_fingerprint, self.device = fingerprint, torch.device("cpu")
        self.words = tokenizer(WORDS, add_special_tokens=False)["input_ids"]
        self.seen: list[tuple[list[int], str | None]] = []  # (prompt, label) per request
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._source = None
        self._slots: dict[str, int] = {}
        self._waiting: list[FakeRequest] = []
        self._running: list[FakeRequest] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = self.generated = self.peak = 0

    def canned(self, prompt: list[int], label: str | None, n: int) -> list[int]:
        salt = len(label or "")  # the base and each adapter name length answer differently
        return [self.words[(sum(prompt) + salt + i) % len(self.words)] for i in range(n)]

    # -- requests --------------------------------------------------------------------------

    def add_request(self, prompt, adapter=None, params=None, on_token=None, *, tenant=None) -> int:
        label, mixture = resolve_adapter(adapter)
        adapters = mixture.names if mixture is not None else ((label,) if label else ())
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        req = FakeRequest(
            next(self._ids), ids, label, adapters, params or SamplingParams(), on_token
        )
        self.seen.append((ids, label))
        self._waiting.append(req)  # list.append is atomic: never waits for a step
        return req.request_id

    def cancel(self, request_id: int) -> bool:
        for req in [*self._waiting, *self._running]:
            if req.request_id == request_id:
                req.cancelled = True
                return True
        return False

    def stats(self) -> dict:
        return {
            "waiting": len(self._waiting),
            "running": len(self._running),
            "kv_free_slots": 64 - len(self._running),
            "adapters_loaded": len(self._slots),
            "adapter_slots": self.max_slots,
            "steps": self.steps,
            "generated_tokens": self.generated,
            "peak_running": self.peak,
        }

    def start(self, threads: int | None = None) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        while (self._waiting or self._running) and time.monotonic() < deadline:
            time.sleep(0.01)
        for req in [*self._waiting, *self._running]:
            req.cancelled = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set() or self._waiting or self._running:
            with self._lock:
                self._tick()
            time.sleep(0.002)

    def _tick(self) -> None:
        for req in list(self._waiting):
            problem = next(filter(None, map(self._prepare, req.adapters)), None)
            if problem or req.cancelled:
                self._waiting.remove(req)
                self._emit(req, None, "cancelled" if req.cancelled else "error", problem)
            elif all(name in self._slots for name in req.adapters):
                self._waiting.remove(req)
                self._running.append(req)
        self.peak = max(self.peak, len(self._running))
        for req in list(self._running):
            if req.cancelled:
                self._emit(req, None, "cancelled")
                continue
            token = self.canned(req.prompt, req.label, req.sent + 1)[-1]
            req.sent += 1
            self.generated += 1
            self._emit(req, token, "length" if req.sent >= req.params.max_tokens else None)
        self.steps += 1

    def _prepare(self, name: str) -> str | None:
        if name in self._slots:
            return None
        return self._source.prepare(name) if self._source else f"unknown adapter {name!r}"

    def _emit(self, req, token, reason, error=None) -> None:
        if reason is not None and req in self._running:
            self._running.remove(req)
        text = self.tokenizer.decode([token]) if token is not None else ""
        event = TokenEvent(req.request_id, token, text, reason is not None, reason, error)
        if req.on_token is not None:
            req.on_token(event)

    # -- adapter residency -------------------------------------------------------------------

    def attach_adapter_source(self, source) -> None:
        if self._source is not None and self._source is not source:
            raise LorafleetError("this backend already has an adapter source")
        self._source = source

    def detach_adapter_source(self, source) -> None:
        if self._source is source:
            self._source = None

    def exclusive(self):
        return self._lock

    def adapter_ready(self, name: str | None) -> bool:
        return name is None or name in self._slots

    def loaded_adapters(self) -> dict[str, int]:
        return dict(self._slots)

    def load_adapter(self, name, adapter, *, force=False) -> int:
        with self._lock:
            free = sorted(set(range(1, self.max_slots + 1)) - set(self._slots.values()))
            if name not in self._slots and not free:
                raise LorafleetError("no free slot")
            self._slots[name] = self._slots.get(name) or free[0]
            return self._slots[name]

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self.adapter_in_use(name):
                raise LorafleetError(f"adapter {name} is in use")
            del self._slots[name]

    def adapter_in_use(self, name: str) -> int:
        return sum(1 for req in list(self._running) if name in req.adapters)

    def waiting_adapters(self) -> list[tuple[str, ...]]:
        return [req.adapters for req in self._waiting]

    def running_adapters(self) -> set[str]:
        return {name for req in self._running for name in req.adapters}

    def check_slots(self, adapter) -> None:
        if not adapter.tensors:
            raise LorafleetError("an adapter without tensors")

    def slot_format(self):
        return (torch.device("cpu"), torch.float32)


def protocol_members() -> set[str]:
    names = set(getattr(ServingBackend, "__annotations__", {}))
    return names | {n for n in vars(ServingBackend) if not n.startswith("_")}


@pytest.fixture(scope="module")
def fake_server(tokenizer, adapters_dir, auth_file, api_fp, tmp_path_factory):
    own = tmp_path_factory.mktemp("fake") / "adapters"
    shutil.copytree(adapters_dir, own)
    fake = FakeBackend(tokenizer, tiny_llama(0, vocab_size=len(tokenizer)).config, api_fp)
    registry = AdapterRegistry(fake, own, merge=merge_adapters)
    state = ServerState(
        backend=fake,
        registry=registry,
        auth=AuthConfig.load(auth_file),
        config=ServerConfig(model_name="fake"),
    )
    srv = ServerThread(state).start()
    yield srv
    srv.stop()
    registry.close()


def call(srv, method, path, key=KEYS["acme"], **kw):
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, srv.url + path, headers=headers, timeout=60, **kw)


def complete(srv, model, prompt, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": 5, **extra}
    return call(srv, "POST", "/v1/completions", json=body)


def canned_text(srv, prompt_ids, label, n=5) -> str:
    fake = srv.state.backend
    return "".join(fake.tokenizer.decode([t]) for t in fake.canned(prompt_ids, label, n))


def test_the_fake_and_the_engine_both_implement_the_protocol(fake_server, tokenizer):
    from serve_helpers import tiny_base

    missing = [n for n in protocol_members() if not hasattr(fake_server.state.backend, n)]
    assert not missing
    engine = Engine(tiny_base(tokenizer), max_slots=1, max_seq_len=32)
    assert not [n for n in protocol_members() if not hasattr(engine, n)]
    assert {"add_request", "load_adapter", "attach_adapter_source", "tokenizer"} <= (
        protocol_members()
    )


def test_completions_and_chat_answer_the_backends_tokens(fake_server, tokenizer):
    r = complete(fake_server, "alpha", "Once upon a time")
    assert r.status_code == 200, r.text
    ids = tokenizer("Once upon a time")["input_ids"]
    choice = r.json()["choices"][0]
    assert choice["text"] == canned_text(fake_server, ids, "alpha")
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 5,
        "total_tokens": len(ids) + 5,
    }
    base = complete(fake_server, "fake", "Once upon a time").json()["choices"][0]["text"]
    assert base == canned_text(fake_server, ids, None) != choice["text"]
    body = {"model": "beta", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4}
    r = call(fake_server, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ids = chat_prompt_ids(tokenizer, ChatCompletionRequest.model_validate(body).messages)
    assert fake_server.state.backend.seen[-1] == (ids, "beta")
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": canned_text(fake_server, ids, "beta", 4)}


def test_streaming_sends_each_token_then_done(fake_server, tokenizer):
    body = {"model": "gamma", "prompt": "Stream me", "max_tokens": 5, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    with httpx.stream(
        "POST", fake_server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    ids = tokenizer("Stream me")["input_ids"]
    assert "".join(c["text"] for c in chunks) == canned_text(fake_server, ids, "gamma")
    assert chunks[-1]["finish_reason"] == "length"


def test_models_tenancy_and_errors(fake_server):
    ids = {m["id"] for m in call(fake_server, "GET", "/v1/models").json()["data"]}
    assert ids == {"fake", *PUBLIC, "acme-secret"}
    hidden = complete(fake_server, "globex-secret", "Hi")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    long = complete(fake_server, "alpha", "word " * 200)
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert call(fake_server, "GET", "/v1/models", key="wrong").status_code == 401
    mixed = complete(fake_server, "mix:alpha*0.5+beta*0.5", "Mix")
    assert mixed.status_code == 200, mixed.text
    assert fake_server.state.backend.seen[-1][1] == "alpha*0.5+beta*0.5"  # a Mixture


def test_merges_are_the_registrys_tier_over_any_backend(fake_server):
    merged = {"ids": ["alpha", "beta"], "merge_strategy": "ties", "density": 0.5}
    body = {"inputs": "Hi", "parameters": {"merged_adapters": merged, "max_new_tokens": 3}}
    for _ in range(2):
        r = call(fake_server, "POST", "/generate", json=body)
        assert r.status_code == 200, r.text
    label = fake_server.state.backend.seen[-1][1]
    assert label.startswith("merged:ties:") and label in fake_server.state.backend.loaded_adapters()
    assert fake_server.state.registry.merged.stats()["merges"] == 1  # merged once


def test_admin_adds_serves_and_removes_an_adapter(fake_server):
    root = fake_server.state.registry.adapters_dir
    shutil.copytree(root / "alpha", root / "alpha-copy")
    r = call(
        fake_server, "POST", "/admin/adapters", ADMIN, json={"name": "a2", "path": "alpha-copy"}
    )
    assert r.status_code == 201, r.text
    assert complete(fake_server, "a2", "Hi", max_tokens=2).status_code == 200
    listed = call(fake_server, "GET", "/admin/adapters", ADMIN).json()["adapters"]
    row = {"name": "a2", "state": "resident", "private_to": None, "kind": "adapter", "reason": None}
    assert row in listed
    assert call(fake_server, "DELETE", "/admin/adapters/a2", ADMIN).status_code == 200
    assert "a2" not in fake_server.state.backend.loaded_adapters()
    assert complete(fake_server, "a2", "Hi").status_code == 404


def test_health_and_metrics_read_the_backends_stats(fake_server):
    assert complete(fake_server, "alpha", "Count me", max_tokens=3).status_code == 200
    health = httpx.get(fake_server.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "fake"
    text = call(fake_server, "GET", "/metrics", ADMIN).text
    assert "lorafleet_queue_depth 0.0" in text and "lorafleet_resident_adapters" in text
    assert 'lorafleet_requests_total{adapter="alpha",endpoint="completions",status="200"}' in text
    assert "lorafleet_merged_adapters" in text and "lorafleet_adapter_cache_hits_total" in text
